"""What is in a cache: datasets, encoders, views, rows, failures, disk size, source changes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from embedstore.encode.sources import list_source
from embedstore.errors import CorruptStoreError, EmbedstoreError
from embedstore.store.cache import Cache, short_digest
from embedstore.store.store import Store, damage_detail


@dataclass
class StoreInfo:
    """One image store as :func:`describe_cache` reports it."""

    dataset: str
    encoder: str
    view: str
    rows: int
    failures: dict[str, dict[str, Any]]
    bytes: int
    generation: int
    source: Optional[str]
    source_status: str
    path: Path
    weights: str = ""


def describe_encoder(card: dict[str, Any], encoder_id: str) -> str:
    """``model (pretrained)`` of a raw encoder card (the encoder id when the card is missing)."""
    spec = card.get("spec", {})
    return spec.get("model", encoder_id) + (f" ({spec['pretrained']})" if spec.get("pretrained") else "")


def describe_weights(card: dict[str, Any]) -> str:
    """Which weights an encoder card records: ``RANDOM (seed 0)``, or the checkpoint file name(s) and
    the start of the weights digest, e.g. ``open_clip_model.safetensors sha256:1a2b3c4d5e6f``."""
    from embedstore.encode.encoders.weights import is_random_init

    digest = str(card.get("weights_digest", ""))
    if not digest:
        return "unknown (no encoder card)"
    if is_random_init(digest):
        seed = digest.split(":")[0].removeprefix("random-init-seed")
        return f"RANDOM (seed {seed})"
    files = [Path(w["path"]).name for w in card.get("weights_files", [])]
    name = files[0] if len(files) == 1 else f"{len(files)} files" if files else ""
    return f"{name} {short_digest(digest)}".strip()


def source_status(store_manifest: dict[str, Any], meta: dict[str, Any]) -> str:
    """``unchanged``, ``changed (N new, M modified, K deleted)``, ``missing`` or ``not checked``."""
    location = (store_manifest.get("source") or {}).get("location")
    if not location:
        return "not recorded"
    from embedstore.encode.sources_shards import is_shard_location

    if not Path(location).exists() and not is_shard_location(location):
        return "missing"
    try:
        source = list_source(location)
    except EmbedstoreError as exc:
        return f"unreadable ({exc})"
    failures = store_manifest.get("failures", {})
    new = modified = 0
    for item in source.items:
        row = meta.get(item.key)
        if row is None:
            if item.key not in failures:
                new += 1
            elif (failures[item.key].get("size"), failures[item.key].get("mtime_ns")) != (item.state.size, item.state.mtime_ns):
                modified += 1
        elif (row.size, row.mtime_ns) != (item.state.size, item.state.mtime_ns):
            modified += 1
    keys = {item.key for item in source.items}
    deleted = sum(1 for k in meta if k not in keys)
    if new == modified == deleted == 0:
        return "unchanged"
    return f"changed ({new} new, {modified} modified, {deleted} deleted)"


def bank_weights(manifest: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """The weights a store or text bank was encoded with (its fingerprint's digest; file names
    from the encoder card when the card still describes those weights), for :func:`describe_weights`."""
    digest = (manifest.get("fingerprint") or {}).get("encoder", {}).get("weights_digest", "")
    files = card.get("weights_files", []) if card.get("weights_digest") == digest else []
    return {"weights_digest": digest, "weights_files": files}


def describe_cache(cache: Cache, check_source: bool = True) -> list[StoreInfo]:
    """One :class:`StoreInfo` per image store in the cache."""
    cards = cache.encoder_cards()
    out = []
    for loc in cache.stores():
        store = Store(loc.path)
        card = cards.get(loc.encoder_id, {})
        encoder = describe_encoder(card, loc.encoder_id)
        try:
            manifest = store.manifest()
            status = source_status(manifest, store.row_metadata()) if check_source else "not checked"
        except CorruptStoreError as exc:  # listed as damaged; the other stores are still shown
            out.append(StoreInfo(loc.dataset, encoder, loc.view_key, 0, {}, 0, -1, None,
                                 f"damaged ({damage_detail(exc)}): run `embedstore verify`", loc.path))
            continue
        out.append(StoreInfo(
            dataset=loc.dataset,
            encoder=encoder,
            view=loc.view_key,
            rows=int(manifest.get("rows", 0)),
            failures=manifest.get("failures", {}),
            bytes=store.disk_bytes(),
            generation=int(manifest["generation"]),
            source=(manifest.get("source") or {}).get("location"),
            source_status=status,
            path=loc.path,
            weights=describe_weights(bank_weights(manifest, card)),
        ))
    return out
