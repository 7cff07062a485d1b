"""Encoding with several processes (GPUs, nodes): disjoint partitions, per-rank stores, one merge.

Launch with torchrun, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous::

    torchrun --nproc-per-node 8 -m embedstore encode IMAGES --model ViT-bigG-14-quickgelu ...
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 -m embedstore encode ...

Every rank lists the source and takes the keys whose stable hash falls in its partition
(``blake2b(key) mod WORLD_SIZE``), so partitions are disjoint and do not depend on the listing
order. A rank encodes the keys of its partition that the main store does not already hold
up to date into its own part store, ``<store>/parts/rank-R-of-W/`` (a complete store with its own
lock, shards and manifest, so a killed rank resumes exactly like a single process). When all
ranks are done (a gloo barrier), rank 0 merges every part into the main store with the store
writer (one atomic manifest commit; rows of deleted images are dropped), then removes the parts.
Running the same command again after any crash redoes only uncommitted rows: finished ranks find
nothing to do, and an interrupted merge is simply repeated (adding a key twice keeps one row).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from embedstore.encode.sources import Source
from embedstore.errors import SpecError

log = logging.getLogger(__name__)

PARTS_DIR = "parts"


@dataclass(frozen=True)
class Partition:
    """This process's share of the rows: rank ``rank`` of ``world``."""

    rank: int
    world: int
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise SpecError(f"rank {self.rank} of world size {self.world}: need 0 <= rank < world")

    def owns(self, key: str) -> bool:
        """Stable across runs and machines (not Python's salted ``hash``)."""
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.world == self.rank

    def part_name(self) -> str:
        return f"rank-{self.rank}-of-{self.world}"


def from_environment() -> Optional[Partition]:
    """The partition torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), or None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    try:
        return Partition(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as exc:
        raise SpecError(f"WORLD_SIZE={world} but RANK is missing or not an integer ({exc})") from None


def rank_device(device: str, partition: Partition) -> str:
    """``cuda`` (or ``auto`` with GPUs) becomes ``cuda:LOCAL_RANK``; ``cpu`` stays."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if device in ("auto", "cuda"):
        count = torch.cuda.device_count()
        if partition.local_rank >= count:
            raise SpecError(f"LOCAL_RANK {partition.local_rank} but only {count} GPU(s) are visible")
        torch.cuda.set_device(partition.local_rank)
        return f"cuda:{partition.local_rank}"
    return device


class Group:
    """A gloo process group used only for barriers (no tensors cross it)."""

    def __init__(self, partition: Partition):
        import datetime

        import torch.distributed as dist

        self.dist = dist
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo", rank=partition.rank, world_size=partition.world,
                                    timeout=datetime.timedelta(hours=12))

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def part_store_path(store_path: Path, partition: Partition) -> Path:
    return Path(store_path) / PARTS_DIR / partition.part_name()


def part_paths(store_path: Path, world: Optional[int] = None) -> list[Path]:
    """Committed part stores under ``store_path`` (of world size ``world`` when given), in rank order."""
    folder = Path(store_path) / PARTS_DIR
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^rank-(\d+)-of-(\d+)$")
    found = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and (p / "manifest.json").is_file() and (world is None or int(m.group(2)) == world):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def merge_parts(writer: Any, store_path: Path, source: Source, world: int) -> int:
    """Add the rows and failures of this run's part stores (world size ``world``) to the main
    ``writer``; return rows merged.

    Only rows and failures whose key is still in ``source`` with the same size and mtime are
    taken: a part left by an interrupted run may hold images deleted or changed since (those are
    encoded again or dropped). The caller commits and compacts, then calls :func:`remove_parts`.
    """
    from embedstore.store.store import Store

    current = {item.key: (item.state.size, item.state.mtime_ns) for item in source.items}
    merged = 0
    for path in part_paths(store_path, world):
        part = Store(path, what=f"part {path.name}")
        manifest = part.manifest()
        rows = part.read(as_float32=False, sort=False)
        metas = part.row_metadata()
        keep = [i for i, k in enumerate(rows.keys) if current.get(k) == (metas[k].size, metas[k].mtime_ns)]
        if keep:
            keys = [rows.keys[i] for i in keep]
            m = [metas[k] for k in keys]
            writer.add(keys, rows.features[keep], [x.label for x in m], [x.size for x in m],
                       [x.mtime_ns for x in m], [x.hash for x in m])
            merged += len(keys)
        for key, fail in manifest.get("failures", {}).items():
            if current.get(key) == (int(fail.get("size", -1)), int(fail.get("mtime_ns", -1))):
                writer.add_failure(key, fail.get("type", "Error"), fail.get("message", ""),
                                   int(fail.get("size", -1)), int(fail.get("mtime_ns", -1)))
    return merged


def remove_parts(store_path: Path) -> None:
    folder = Path(store_path) / PARTS_DIR
    if folder.is_dir():
        shutil.rmtree(folder)


def encode_distributed(source: Any, spec: Any, cache: Any, dataset: Optional[str], view_options: Any, options: Any,
                       partition: Partition) -> tuple[Any, Optional[Any]]:
    """Run this rank's part, wait for every rank, and (rank 0) merge. Returns (part result, merge result or None)."""
    from dataclasses import replace

    from embedstore.encode.loop import encode_images, merge_partitions
    from embedstore.encode.sources import Source, list_source

    src = source if isinstance(source, Source) else list_source(source)
    group = Group(partition)
    try:
        part = encode_images(src, spec, cache, dataset, view_options,
                             replace(options, device=rank_device(options.device, partition)), partition=partition)
        group.barrier()
        merged = (merge_partitions(src, spec, cache, dataset, view_options, options, world=partition.world)
                  if partition.rank == 0 else None)
        group.barrier()
        return part, merged
    finally:
        group.close()
