"""Stage 1: encode a source's images (and prompt texts) into the cache.

The loop is: list the source, compare it with the store (new, changed, deleted, failed rows),
decode and preprocess the rows still to do in DataLoader workers (``decode="cpu"``: PIL), or
in batches on the encode device (``decode="gpu"``: :mod:`embedstore.encode.gpu_decode`), encode them in batches,
buffer them in the store writer (which commits a shard every few thousand rows or tens of
seconds), and finally compact the store into one file in natural key order.

The model is loaded only when there is something to encode: a re-run over an unchanged folder
reads the encoder card and the store's row metadata and finishes without touching torch's model
code. Out-of-memory on the GPU halves the batch and retries, losing nothing.

Faults end the run cleanly: the store's lock is taken before the model loads (a second writer
fails at once); decoding workers ignore Ctrl-C (the main process shuts them down, then the
writer commits what is encoded); a worker that dies, cannot start, or sends nothing for
``loader_timeout`` seconds ends the run with :class:`~embedstore.errors.EncodeWorkerError`; file
names with a line break are recorded as failures, never stored.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from embedstore.encode.encoders import (
    Encoder,
    EncoderCard,
    EncoderSpec,
    load_encoder,
    weights_digest,
)
from embedstore.encode.encoders.weights import is_random_init
from embedstore.encode.gpu_decode import choose_decode
from embedstore.encode.sources import (
    Source,
    SourceItem,
    hash_file,
    list_source,
)
from embedstore.errors import (
    EncodeWorkerError,
    SourceError,
    SpecError,
    WeightsChangedError,
)
from embedstore.store.cache import Cache, check_dataset_name, short_digest
from embedstore.store.fingerprint import image_fingerprint, text_fingerprint
from embedstore.store.store import RowMeta, Store, fingerprint_differences
from embedstore.store.views import View, ViewOptions
from embedstore.util.fsutil import WriteLock
from embedstore.util.progress import progress_bar
from embedstore.util.system import default_workers

if TYPE_CHECKING:
    from embedstore.encode.distributed import Partition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeOptions:
    """How stage 1 runs (none of these change the stored numbers except ``dtype``)."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)  # the usable cores, at most 8
    dtype: str = "float16"
    strict: bool = False
    retry_failed: bool = False
    shard_rows: int = 4096
    shard_seconds: float = 30.0
    progress: bool = True
    decode: str = "auto"  # auto | cpu | gpu (see embedstore.encode.gpu_decode.choose_decode)
    replace: bool = False  # encode a source other than the dataset's own under its name (see check_source)
    loader_timeout: float = 300.0  # seconds without a batch from the decoding workers before the run ends

    def __post_init__(self) -> None:
        from embedstore.encode.gpu_decode import DECODE_MODES
        from embedstore.errors import SpecError

        if self.decode not in DECODE_MODES:
            raise SpecError(f"--decode {self.decode}: expected one of {', '.join(DECODE_MODES)}")


@dataclass
class EncodeResult:
    """Summary of one :func:`encode_images` run."""

    dataset: str
    store_path: Path
    view: View
    rows: int = 0
    encoded: int = 0
    cached: int = 0
    failed: int = 0
    skipped_failed: int = 0
    dropped: int = 0
    seconds: float = 0.0
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    replaced: Optional[str] = None  # the dataset's previous source location, when --replace replaced it
    source: str = ""                # the source location encoded


@dataclass
class PromptResult:
    """Summary of one :func:`encode_prompts` run."""

    new: int
    cached: int
    seconds: float


class EncoderHandle:
    """The card of an encoder, with the model itself loaded only on first use.

    The card comes from the cache when the weights' size and mtime are unchanged, so an
    up-to-date store needs no model load at all.
    """

    def __init__(self, spec: EncoderSpec, cache: Cache, device: str = "auto", precision: str = "auto",
                 encoder: Optional[Encoder] = None):
        self.spec = spec
        self.cache = cache
        self.device = device
        self.precision = precision
        self._encoder = encoder
        known = cache.load_card(spec)
        if encoder is not None:
            self.card = encoder.card
        else:
            # random weights, once asked for explicitly (the card records it), stay allowed
            allow_random = known is not None and is_random_init(known.weights_digest)
            digest = weights_digest(spec, known.weights_files if known else (), allow_random)
            if known is not None and known.weights_digest == digest[0]:
                self.card = known
            else:
                self._encoder = load_encoder(spec, device, precision, weights=digest)
                self.card = self._encoder.card
        if known is None or known.to_dict() != self.card.to_dict():
            cache.save_card(self.card)

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self, text_only: bool = False) -> Encoder:
        """The loaded encoder (loaded now if needed). A ``text_only`` load keeps just the text
        path and is not kept for later image encoding."""
        if self._encoder is not None:
            return self._encoder
        encoder = load_encoder(self.spec, self.device, self.precision,
                               weights=(self.card.weights_digest, self.card.weights_files),
                               card=self.card, text_only=text_only)
        if not text_only:
            self._encoder = encoder
        return encoder


def provenance(device: str, precision: str) -> dict[str, Any]:
    """Recorded per shard, not compared: versions and device may differ between machines."""
    from embedstore.encode.encoders.torch_utils import (
        library_versions,
        resolve_device,
        resolve_precision,
    )

    device = resolve_device(device)
    return {**library_versions(), "device": device, "precision": resolve_precision(precision, device)}


@dataclass
class Plan:
    """What a run has to do to bring a store up to date with its source."""

    todo: list[SourceItem]
    dropped: list[str]
    cached: int
    skipped_failed: int


def plan_updates(source: Source, meta: dict[str, RowMeta], failures: dict[str, dict[str, Any]],
                 strict: bool = False, retry_failed: bool = False) -> Plan:
    """Compare the source with the store's live rows and failure records.

    A row is redone when its file's size or mtime changed (with ``strict``: its content hash),
    or its label changed; failures are redone when the file changed or ``retry_failed``. An
    image inside a shard has the shard's size and mtime, so a changed shard redoes its images
    (with ``strict``: those whose bytes changed; each shard is read once to hash them).
    """
    todo: list[SourceItem] = []
    cached = skipped = 0
    hashes = content_hashes([item for item in source.items if item.key in meta]) if strict else {}
    for item in source.items:
        row = meta.get(item.key)
        if row is not None:
            same = (row.size, row.mtime_ns) == (item.state.size, item.state.mtime_ns)
            if strict:
                same = hashes.get(item.key) == row.hash
            if same and row.label == item.label:
                cached += 1
                continue
        elif item.key in failures and not retry_failed:
            fail = failures[item.key]
            if (fail.get("size"), fail.get("mtime_ns")) == (item.state.size, item.state.mtime_ns):
                skipped += 1
                continue
        todo.append(item)
    keys = {item.key for item in source.items}
    dropped = [k for k in meta if k not in keys] + [k for k in failures if k not in keys]
    return Plan(todo, dropped, cached, skipped)


def content_hashes(items: Sequence[SourceItem]) -> dict[str, Optional[str]]:
    """Content hash of each item's bytes (None when they cannot be read): files one by one,
    shard members one pass per shard."""
    from embedstore.encode.sources import content_hash

    out: dict[str, Optional[str]] = {}
    members = [item for item in items if item.shard is not None]
    for item in items:
        if item.shard is None:
            try:
                out[item.key] = hash_file(item.path)
            except OSError:
                out[item.key] = None
    if members:
        from embedstore.encode.sources_shards import read_group, shard_groups

        for group in shard_groups(members):
            for blob in read_group(members, group):
                out[members[blob.index].key] = content_hash(blob.data) if blob.error is None and blob.data else None
    return out


class ImageDataset:
    """Map-style dataset: index -> (index, tensor or None, size, mtime_ns, hash, error kind, message)."""

    def __init__(self, items: Sequence[SourceItem], transform: Callable[[Any], Any]):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        from embedstore.encode.samples import read_file_blob, sample_from_blob

        item = self.items[i]
        return sample_from_blob(read_file_blob(i, item.path, item.state.size, item.state.mtime_ns), self.transform)


def collate_samples(samples: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Keep a batch as its list of samples (failed ones have no tensor to stack)."""
    return samples


class AdaptiveBatcher:
    """Encode a batch; on GPU out-of-memory halve the chunk size and retry, losing nothing."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.max_chunk: Optional[int] = None

    def __call__(self, batch: Any) -> np.ndarray:
        import torch

        n = batch.shape[0]
        chunk = min(n, self.max_chunk or n)
        outputs = []
        start = 0
        while start < n:
            part = batch[start:start + chunk]
            try:
                outputs.append(self.encoder.encode_images(part))
                start += chunk
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                torch.cuda.empty_cache()
                chunk = max(1, chunk // 2)
                self.max_chunk = chunk
                log.warning("GPU out of memory: retrying with batches of %d", chunk)
        return np.concatenate(outputs)


def check_source(cache: Cache, dataset: str, source: Source, replace: bool = False) -> Optional[str]:
    """Refuse to encode ``source`` under a dataset name whose stores were encoded from another
    source location: that would replace the dataset's rows with another folder's (the name
    defaults to the folder's base name, so ``a/images`` and ``b/images`` share one).

    Returns the other location when ``replace`` allows it (its rows in this store are dropped by
    the run), else None.

    Raises:
        SourceError: another source is recorded and ``replace`` is False; the message names it and
            the two ways out (``--dataset NAME``, ``--replace``).
    """
    others = sorted(loc for loc in cache.dataset_sources(dataset) if loc != source.location)
    if not others:
        return None
    if replace:
        return others[0]
    raise SourceError(
        f"dataset {dataset!r} was encoded from {others[0]}, not from {source.location}; encoding this "
        f"source under the same name would replace its rows. Give it its own name (--dataset NAME), or "
        f"replace the dataset's rows on purpose (--replace)."
    )


def _weights_unchanged(card: EncoderCard, spec: EncoderSpec) -> bool:
    """True when the weight files a card records are on disk unchanged (size and mtime), and, for
    local folders, no other weight file appeared: the card's digest still holds without hashing
    or importing the model libraries."""
    from embedstore.encode.encoders.weights import WEIGHT_SUFFIXES
    from embedstore.store.spec import LOCAL_DIR_PREFIX

    for w in card.weights_files:
        try:
            st = os.stat(w.path)
        except OSError:
            return False
        if (st.st_size, st.st_mtime_ns) != (w.size, w.mtime_ns):
            return False
    folder = None
    if spec.model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(spec.model[len(LOCAL_DIR_PREFIX):])
    elif spec.kind == "hf" and Path(spec.target).is_dir():
        folder = Path(spec.target)
    if folder is not None:
        try:
            present = {str(p.resolve()) for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
        except OSError:
            return False
        return present == {w.path for w in card.weights_files}
    return True


def unchanged_store(src: Source, spec: EncoderSpec, cache: Cache, dataset: str,
                    view_options: ViewOptions = ViewOptions(),
                    options: EncodeOptions = EncodeOptions()) -> Optional[EncodeResult]:
    """The result of a run that has nothing to do, found from the source listing, the encoder
    card and the store's committed rows alone (under the store's lock, without torch or open_clip;
    every shard checked against its checksum, else :class:`CorruptStoreError`), or None when
    there may be work: a new encoder or store, changed weights, new/changed/deleted images,
    retries, a changed source record or an uncompacted store. The full run decides those."""
    card = cache.load_card(spec)
    if card is None or not _weights_unchanged(card, spec):
        return None
    view = view_options.apply(card.default_view)
    store = cache.image_store(dataset, spec, view)
    if not store.exists():
        return None
    with store.lock():  # a writer at work is refused here as it would be by the full run
        manifest = store.manifest()
        if manifest.get("dtype") != options.dtype or fingerprint_differences(
                manifest["fingerprint"], image_fingerprint(card, view, options.dtype)):
            return None
        shards = manifest.get("shards", [])
        if len(shards) > 1 or any(sh.get("dead") for sh in shards) or not manifest.get("sorted"):
            return None
        if (manifest.get("source") != {"location": src.location, "images": len(src)}
                or manifest.get("labelled") != src.labelled or manifest.get("classes") != src.classes):
            return None
        failures = dict(manifest.get("failures", {}))
        meta = store.row_metadata()
        # every committed byte is checked, as the full run's writer does: an up-to-date but
        # damaged store is never reported as "already cached"
        problems = [p for entry in shards for p in store.check_shard(entry, manifest)]
        if problems:
            from embedstore.errors import CorruptStoreError

            raise CorruptStoreError(f"{store.what}: damaged shard {problems[0]}; {store.repair_advice()}")
    plan = plan_updates(src, meta, failures, options.strict, options.retry_failed)
    if plan.todo or plan.dropped:
        return None
    return EncodeResult(dataset=dataset, store_path=store.path, view=view, rows=len(meta), cached=plan.cached,
                        skipped_failed=plan.skipped_failed, failures=failures, source=src.location)


def check_view_fits(encoder: Encoder, view: View, default: View) -> None:
    """Encode one blank image of the view's size before a store is created, so that a size the
    model cannot take (a ViT's fixed position embeddings) is a clear error, not a crash mid-run
    that leaves an empty store behind.

    Raises:
        SpecError: the model refuses inputs of ``view.size`` pixels.
    """
    if view.size == default.size:
        return
    import torch

    try:
        encoder.encode_images(torch.zeros(1, 3, view.size, view.size))
    except (RuntimeError, ValueError) as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise SpecError(
            f"--size {view.size}: {encoder.spec} takes {default.size}px inputs and cannot encode {view.size}px "
            f"ones ({lines[-1] if lines else type(exc).__name__}); use --size {default.size} (or leave --size out). "
            "Nothing was written."
        ) from None


def encode_images(
    source: str | Path | Source,
    spec: EncoderSpec,
    cache: Optional[Cache] = None,
    dataset: Optional[str] = None,
    view_options: ViewOptions = ViewOptions(),
    options: EncodeOptions = EncodeOptions(),
    encoder: Optional[Encoder] = None,
    partition: Optional["Partition"] = None,
) -> EncodeResult:
    """Bring the store of (dataset, encoder, view) up to date with an image folder or list.

    With a ``partition`` (one rank of a multi-process run, see :mod:`embedstore.encode.distributed`),
    only that rank's keys are encoded, into its part store; :func:`merge_partitions` then
    brings them into the main store.

    Returns an :class:`EncodeResult`; bad images are recorded as failures, never raised.

    A run with nothing to do (:func:`unchanged_store`) returns before torch or the model
    libraries are imported.

    Raises:
        SourceError: the source cannot be listed, or the dataset name holds another source
            (:func:`check_source`; ``options.replace`` replaces it).
        SpecError: a model without weights (see ``EncoderSpec.random_weights``), or a view size the
            model cannot take (checked before a new store is created).
        FingerprintMismatchError: the store exists with other settings.
        StoreLockedError: another process is writing this store (raised before the model loads
            when the encoder's card is in the cache).
        CorruptStoreError: the store is damaged (the message names the repair command).
        EncodeWorkerError: a decoding worker died, could not start or timed out.
        WriteFailedError: a write failed (no space left, ...); committed rows are kept.
    """
    started = time.perf_counter()
    cache = cache or Cache()
    src = source if isinstance(source, Source) else list_source(source)
    name = check_dataset_name(dataset or src.default_name)
    replaced = check_source(cache, name, src, options.replace)
    if partition is None and encoder is None and replaced is None:
        done = unchanged_store(src, spec, cache, name, view_options, options)
        if done is not None:
            done.seconds = time.perf_counter() - started
            return done
    early = _lock_known_store(cache, name, spec, view_options) if partition is None else None
    try:
        return _encode_images(src, spec, cache, name, view_options, options, encoder, partition, early, replaced,
                              started)
    finally:
        if early is not None:
            early.release()


def _lock_known_store(cache: Cache, dataset: str, spec: EncoderSpec, view_options: ViewOptions) -> Optional[WriteLock]:
    """When the encoder's card is in the cache and the store exists, the store is known without
    loading anything: take its lock now, before torch and the model load, so that a second writer
    fails at once. (A new store is locked by its writer, once the checks that may refuse it have
    passed: no folder is made for a store that is then refused.)"""
    card = cache.load_card(spec)
    if card is None:
        return None
    store = cache.image_store(dataset, spec, view_options.apply(card.default_view))
    return store.lock().acquire() if store.exists() else None


def _encode_images(src: Source, spec: EncoderSpec, cache: Cache, name: str, view_options: ViewOptions,
                   options: EncodeOptions, encoder: Optional[Encoder], partition: Optional["Partition"],
                   early: Optional[WriteLock], replaced: Optional[str], started: float) -> EncodeResult:
    import torch

    handle = EncoderHandle(spec, cache, options.device, options.precision, encoder)
    view = view_options.apply(handle.card.default_view)
    store = cache.image_store(name, spec, view)
    if early is not None and early.path != store.lock().path:  # the card changed with the weights
        early.release()
    fingerprint = image_fingerprint(handle.card, view, options.dtype)
    store.check_fingerprint(fingerprint)
    result = EncodeResult(dataset=name, store_path=store.path, view=view, replaced=replaced, source=src.location)
    prov = provenance(handle.device, handle.precision)
    prov["decode"] = choose_decode(options.decode, prov["device"], view)  # provenance, not fingerprint
    if not store.exists():  # checked by every rank of a distributed run too
        if is_random_init(handle.card.weights_digest) and not spec.random_weights:
            raise SpecError(f"--model {spec.model}: has no weights (random initialisation, "
                            f"{handle.card.weights_digest}); a new store of random features needs --random-weights "
                            "(an encoder card that once allowed them covers only prompts for existing stores)")
        check_view_fits(handle.get(), view, handle.card.default_view)
    if partition is not None:
        return _encode_part(src, store, handle, view, fingerprint, prov, options, partition, result, started)

    with store.writer(fingerprint, handle.card.dim, options.dtype, prov, options.shard_rows,
                      options.shard_seconds, lock=early if early is not None and early.held else None) as writer:
        plan = plan_updates(src, writer.meta, writer.failures, options.strict, options.retry_failed)
        result.cached, result.skipped_failed = plan.cached, plan.skipped_failed
        result.dropped = sum(1 for key in plan.dropped if key in writer.meta)  # rows, not failure records
        writer.drop(plan.dropped)
        writer.set_info(source={"location": src.location, "images": len(src)},
                        labelled=src.labelled, classes=src.classes)
        if plan.todo:
            enc = handle.get()
            result.encoded, result.failed = _run(plan.todo, enc, view, writer, options, prov["decode"])
            del enc
        writer.compact(order=[item.key for item in src.items])
        result.rows = len(writer.meta)
        result.failures = dict(writer.failures)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - started
    return result


def _encode_part(src: Source, store: Store, handle: EncoderHandle, view: View, fingerprint: dict[str, Any],
                 prov: dict[str, Any], options: EncodeOptions, partition: "Partition", result: EncodeResult,
                 started: float) -> EncodeResult:
    """One rank: encode its keys that the main store lacks (or holds outdated) into its part store."""
    from embedstore.encode.distributed import part_store_path

    mine = Source(src.location, tuple(item for item in src.items if partition.owns(item.unit)), src.labelled)
    main_meta = store.row_metadata() if store.exists() else {}
    main_failures = dict(store.manifest().get("failures", {})) if store.exists() else {}
    part = Store(part_store_path(store.path, partition), what=f"{store.what}, part {partition.part_name()}")
    with part.writer(fingerprint, handle.card.dim, options.dtype, prov, options.shard_rows,
                     options.shard_seconds) as writer:
        owned = {item.key for item in mine.items}
        meta = {k: v for k, v in main_meta.items() if k in owned} | writer.meta
        failures = {k: v for k, v in main_failures.items() if k in owned} | writer.failures
        plan = plan_updates(mine, meta, failures, options.strict, options.retry_failed)
        result.cached, result.skipped_failed = plan.cached, plan.skipped_failed
        if plan.todo:
            result.encoded, result.failed = _run(plan.todo, handle.get(), view, writer, options, prov["decode"])
        result.rows = len(writer.meta)
    result.seconds = time.perf_counter() - started
    return result


def merge_partitions(source: str | Path | Source, spec: EncoderSpec, cache: Cache, dataset: Optional[str] = None,
                     view_options: ViewOptions = ViewOptions(), options: EncodeOptions = EncodeOptions(),
                     world: int = 2) -> EncodeResult:
    """Rank 0, after every rank of a ``world``-rank run finished: merge their part stores into the
    main store in one commit, drop rows of images that left the source, compact in natural order,
    and remove every part (parts of other world sizes, left by older runs, are discarded)."""
    from embedstore.encode.distributed import merge_parts, remove_parts

    started = time.perf_counter()
    src = source if isinstance(source, Source) else list_source(source)
    name = check_dataset_name(dataset or src.default_name)
    card = cache.require_card(spec)
    view = view_options.apply(card.default_view)
    store = cache.image_store(name, spec, view)
    fingerprint = image_fingerprint(card, view, options.dtype)
    result = EncodeResult(dataset=name, store_path=store.path, view=view)
    with store.writer(fingerprint, card.dim, options.dtype, {"merged_parts": world}, options.shard_rows,
                      options.shard_seconds) as writer:
        result.encoded = merge_parts(writer, store.path, src, world)
        writer.commit()  # the merged rows join writer.meta, so the drop below sees them too
        plan = plan_updates(src, writer.meta, writer.failures, options.strict, retry_failed=False)
        result.dropped = sum(1 for key in plan.dropped if key in writer.meta)  # rows, not failure records
        writer.drop(plan.dropped)
        writer.set_info(source={"location": src.location, "images": len(src)},
                        labelled=src.labelled, classes=src.classes)
        writer.compact(order=[item.key for item in src.items])
        result.rows = len(writer.meta)
        result.cached = result.rows - result.encoded
        result.failures = dict(writer.failures)
        result.failed = len(writer.failures)
    remove_parts(store.path)
    result.seconds = time.perf_counter() - started
    return result


def _loader(todo: list[SourceItem], view: View, device: str, options: EncodeOptions, decode: str) -> Any:
    """Batches of samples ``(index, tensor or None, size, mtime_ns, hash, error type, message)``:
    PIL in DataLoader workers (``cpu``), or :class:`embedstore.encode.gpu_decode.TensorBatchLoader`
    (``gpu``: JPEGs decoded and preprocessed on ``device``, other files through the same PIL code)."""
    from embedstore.encode.pil_view import (
        PilTransform,  # torch: not imported by a run with nothing to do
    )

    if any(item.shard is not None for item in todo):
        return _shard_loader(todo, view, device, options, decode)
    dataset = ImageDataset(todo, PilTransform(view))
    if decode == "gpu":
        from embedstore.encode.gpu_decode import TensorBatchLoader

        return TensorBatchLoader([item.path for item in todo], view, device, options.batch_size,
                                 fallback=dataset.__getitem__, threads=max(1, options.workers))
    return _data_loader(dataset, min(options.workers, len(todo) // max(1, options.batch_size) + 1), device, options)


def _data_loader(dataset: Any, workers: int, device: str, options: EncodeOptions) -> Any:
    from torch.utils.data import DataLoader

    workers = max(0, workers)
    return contextlib.nullcontext(DataLoader(
        dataset,
        batch_size=options.batch_size,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=device.startswith("cuda"),
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init if workers else None,
        timeout=options.loader_timeout if workers else 0,
    ))


def _shard_loader(todo: list[SourceItem], view: View, device: str, options: EncodeOptions, decode: str) -> Any:
    """Loaders for images inside shards (:mod:`embedstore.encode.shard_loader`): whole shards
    go to the decoding workers (``cpu``) or to ``--workers`` reading threads (``gpu``)."""
    from embedstore.encode.pil_view import PilTransform
    from embedstore.encode.samples import sample_from_blob
    from embedstore.encode.shard_loader import ShardDataset, shard_blobs
    from embedstore.encode.sources_shards import shard_groups

    transform = PilTransform(view)
    if decode == "gpu":
        import functools
        import threading

        from embedstore.encode.gpu_decode import TensorBatchLoader

        blobs = shard_blobs(todo, max(1, options.workers), threading.Event(), depth=4 * options.batch_size)
        return TensorBatchLoader([], view, device, options.batch_size,
                                 fallback=functools.partial(sample_from_blob, transform=transform),
                                 threads=max(1, options.workers), blobs=blobs)
    return _data_loader(ShardDataset(todo, transform), min(options.workers, len(shard_groups(todo))), device, options)


def _worker_init(worker_id: int) -> None:
    """In each decoding worker: leave Ctrl-C (SIGINT to the whole process group) to the main
    process, which shuts the workers down and then commits; a Ctrl-C that killed the workers
    first used to abort that commit. SIGTERM keeps its default, so a hung worker can be stopped.

    Errors that reach the worker's excepthook (multiprocessing's fd-sharing thread, when its
    listener closes while the run is being stopped) print one line, not a traceback: the main
    process reports what ended the run, and the user sees one error style."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def one_line(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        sys.stderr.write(f"decoding worker {worker_id}: {kind.__name__}: {exc}\n")

    sys.excepthook = one_line


def _batches(loader: Any, options: EncodeOptions) -> Any:
    """Iterate ``loader``; a worker that dies, cannot start or times out becomes an
    :class:`EncodeWorkerError`. Closing the generator shuts the worker processes down at once
    (before the writer commits), not when the garbage collector gets to them."""
    kept = "the rows encoded so far are committed"
    again = "run the same command again (with --workers 0 to decode in this process)"
    try:
        it = iter(loader)
    except (OSError, RuntimeError) as exc:
        raise EncodeWorkerError(f"cannot start the decoding workers ({_first_line(exc)}); {again}") from exc
    try:
        while True:
            try:
                samples = next(it)
            except StopIteration:
                return
            except RuntimeError as exc:
                text = _first_line(exc)
                if "timed out" in text:
                    raise EncodeWorkerError(
                        f"the decoding workers sent nothing for {options.loader_timeout:g} s ({text}; a worker may be "
                        "unable to write to shared memory: /dev/shm full, or a file-size limit such as `ulimit -f`); "
                        f"{kept}; free /dev/shm or raise the limit, or {again}") from exc
                raise EncodeWorkerError(f"a decoding worker failed ({text}; killed, out of memory, or a crash in an "
                                        f"image library); {kept}; {again}") from exc
            yield samples
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _run(todo: list[SourceItem], encoder: Encoder, view: View, writer: Any, options: EncodeOptions,
         decode: str = "cpu") -> tuple[int, int]:
    import torch

    from embedstore.encode.sources import unusable_key

    encode = AdaptiveBatcher(encoder)
    encoded = failed = 0
    usable = []
    for item in todo:  # recorded, never stored: exports keep one key per line
        reason = unusable_key(item.key)
        if reason is None:
            usable.append(item)
        else:
            writer.add_failure(item.key, "InvalidFileName", reason, item.state.size, item.state.mtime_ns)
            failed += 1
    todo = usable
    if not todo:
        return encoded, failed
    with _loader(todo, view, encoder.device, options, decode) as loader, \
            contextlib.closing(_batches(loader, options)) as batches, \
            progress_bar(len(todo), "encode", "img", options.progress, smoothing=0.1) as bar:
        for samples in batches:
            good = [s for s in samples if s[1] is not None]
            for i, _, size, mtime, _, kind, message in (s for s in samples if s[1] is None):
                writer.add_failure(todo[i].key, kind, message, size, mtime)
                log.info("failed: %s (%s: %s)", todo[i].key, kind, message)
                failed += 1
            if good:
                features = encode(torch.stack([s[1] for s in good]))
                items = [todo[s[0]] for s in good]
                writer.add(
                    [it.key for it in items], features, [it.label for it in items],
                    [s[2] for s in good], [s[3] for s in good], [s[4] for s in good],
                )
                encoded += len(good)
            writer.maybe_commit()
            bar.update(len(samples))
    return encoded, failed


def encode_prompts(
    texts: Sequence[str],
    spec: EncoderSpec,
    cache: Optional[Cache] = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    encoder: Optional[Encoder] = None,
    expect_digest: Optional[str] = None,
    progress: bool = True,
) -> PromptResult:
    """Add the prompt strings not yet in the text bank of the encoder's weights; return how many were new.

    Prompts are kept exactly as given (no stripping), so a text bank lookup is an exact match.
    A progress bar on stderr counts the new prompts (see :mod:`embedstore.util.progress`).
    ``expect_digest``: the weights digest the prompts must be encoded with (an image store's);
    when the model behind ``spec`` now has other weights the call is refused instead of adding
    features of other weights.

    Raises:
        WeightsChangedError: ``expect_digest`` differs from the weights the spec loads now.
    """
    started = time.perf_counter()
    cache = cache or Cache()
    unique = list(dict.fromkeys(texts))
    known = cache.load_card(spec)
    digest = expect_digest or (known.weights_digest if known is not None else None)
    if digest is not None:
        new = _missing_prompts(cache.text_bank(spec, digest), unique)
        if not new:
            return PromptResult(0, len(unique), time.perf_counter() - started)
    handle = EncoderHandle(spec, cache, device, precision, encoder)
    if expect_digest is not None and handle.card.weights_digest != expect_digest:
        raise WeightsChangedError(spec, short_digest(expect_digest), short_digest(handle.card.weights_digest))
    bank = cache.text_bank(spec, handle.card.weights_digest)
    new = _missing_prompts(bank, unique)
    if not new:
        return PromptResult(0, len(unique), time.perf_counter() - started)
    lock = bank.lock().acquire()  # before the model loads: a second writer fails at once
    try:
        fingerprint = text_fingerprint(handle.card, "float32")
        enc = handle.get(text_only=True)
        with bank.writer(fingerprint, handle.card.dim, "float32", provenance(enc.device, getattr(enc, "precision", "auto")),
                         shard_rows=max(batch_size, 4096), lock=lock) as writer, \
                progress_bar(len(new), "prompts", "prompt", progress) as bar:
            new = [t for t in new if t not in writer.meta]  # another writer may have added some
            for start in range(0, len(new), batch_size):
                chunk = new[start:start + batch_size]
                writer.add(chunk, enc.encode_texts(chunk))
                writer.maybe_commit()
                bar.update(len(chunk))
            writer.compact()
    finally:
        lock.release()
    return PromptResult(len(new), len(unique) - len(new), time.perf_counter() - started)


def _missing_prompts(bank: Store, texts: Sequence[str]) -> list[str]:
    existing = set(bank.row_metadata()) if bank.exists() else set()
    return [t for t in texts if t not in existing]


def prompt_encoder(cache: Cache, device: str = "cpu") -> Callable[[Sequence[str], EncoderSpec, str], int]:
    """The callable stage 2 takes to encode prompts missing from a text bank of ``cache`` (on
    ``device``): ``(texts, spec, weights digest) -> number newly encoded``."""

    def encode_missing(texts: Sequence[str], spec: EncoderSpec, digest: str) -> int:
        result = encode_prompts(texts, spec, cache, device=device, expect_digest=digest)
        if result.new:
            log.info("encoded %d new prompt(s) with %s", result.new, spec)
        return result.new

    return encode_missing
