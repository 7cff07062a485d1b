"""Loaders for shard sources: whole shards are the unit a decoding worker reads.

:class:`ShardDataset` is the CPU path's torch ``IterableDataset``: DataLoader worker ``w`` of
``W`` streams shards ``w, w + W, ...`` (each once, front to back, one image or record batch in
memory at a time) and yields one sample per wanted image, decoded with the same function as a
folder's images (:func:`~embedstore.encode.samples.sample_from_blob`). :func:`shard_blobs` is the
``--decode gpu`` path's byte stream: ``threads`` threads each stream shards into a bounded queue,
and :class:`~embedstore.encode.gpu_decode.TensorBatchLoader` decodes the bytes in batches.

Samples come in shard order, not in the order of the image list; each carries its index, which
is all the encode loop needs.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from embedstore.encode.samples import Blob, Sample, sample_from_blob
from embedstore.encode.sources import SourceItem
from embedstore.encode.sources_shards import read_group, shard_groups


class ShardDataset(IterableDataset):
    """Samples of ``items`` (shard members), read shard by shard; DataLoader workers split the shards."""

    def __init__(self, items: Sequence[SourceItem], transform: Callable[[Any], Any]):
        self.items = list(items)
        self.transform = transform
        self.groups = shard_groups(self.items)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for group in self.groups[worker::workers]:
            for blob in read_group(self.items, group):
                yield sample_from_blob(blob, self.transform)


class _Done:
    """Queue marker: one reading thread finished."""


def shard_blobs(items: Sequence[SourceItem], threads: int, stop: threading.Event,
                depth: int = 256) -> Iterator[Blob]:
    """Blobs of ``items`` (shard members), ``threads`` shards read at once, at most ``depth``
    blobs waiting. Setting ``stop`` (or closing the generator) ends the reading threads."""
    items = list(items)
    todo: "queue.SimpleQueue[Optional[list[int]]]" = queue.SimpleQueue()
    for group in shard_groups(items):
        todo.put(group)
    out: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
    threads = max(1, min(threads, todo.qsize()))
    for _ in range(threads):
        todo.put(None)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            while (group := todo.get()) is not None and not stop.is_set():
                for blob in read_group(items, group):
                    if not put(blob):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(exc)
        finally:
            put(_Done())

    workers = [threading.Thread(target=work, name=f"embedstore-shard-{k}", daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    running = threads
    try:
        while running:
            item = out.get()
            if isinstance(item, _Done):
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for w in workers:
            while w.is_alive():
                try:
                    while True:
                        out.get_nowait()
                except queue.Empty:
                    pass
                w.join(timeout=0.05)
