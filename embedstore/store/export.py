"""Export a store to plain files any tool can read: features.npy, keys.txt, labels.txt.

``features.npy`` is float32 ``(n, d)`` with every row L2-normalised, rows in natural key order,
written row block by row block so memory stays bounded. The contract (README, "Cache layout"):
a store keeps the encoder's unit vectors rounded to its dtype and :meth:`Store.read` returns
them as stored (float16: norms within :data:`embedstore.store.store.UNIT_NORM_TOLERANCE` of 1);
everything computed from them (stage-2 scoring, indexes, queries and this export) first
renormalises each row in float32 with :func:`embedstore.util.arrays.unit_rows`, so the exported
rows are the ones stage 2 scores with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from embedstore.store.npy_writer import NpyWriter
from embedstore.store.reader import StoreReader
from embedstore.store.store import Store
from embedstore.util.arrays import unit_rows
from embedstore.util.budget import Budget
from embedstore.util.fsutil import atomic_write


def export_features(store: Store, out_dir: str | os.PathLike[str], budget: Optional[Budget] = None) -> tuple[int, int]:
    """Write ``features.npy`` (float32, n×d, unit rows, natural key order), ``keys.txt`` and
    ``labels.txt`` (one label per line, empty lines when unlabelled) into ``out_dir``.

    Returns ``(n, d)``. Each file is replaced atomically.

    Raises:
        ValueError: a key holds a line break (keys.txt could not be read back).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or Budget.default()
    with StoreReader(store) as reader:
        for key in reader.keys:
            if "\n" in key or "\r" in key:
                raise ValueError(f"key {key!r} contains a line break; keys.txt cannot hold it")
        n, d = len(reader.keys), reader.dim
        writer = NpyWriter(out / "features.npy", (n, d))
        try:
            step = budget.block_rows(d * 10)
            for start in range(0, n, step):
                stop = min(n, start + step)
                writer.write(start, unit_rows(reader.features(reader.rows(start, stop)), copy=False))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        keys = reader.keys
        labels = reader.labels if reader.labels is not None else [""] * n
    atomic_write(out / "keys.txt", lambda tmp: tmp.write_text("".join(k + "\n" for k in keys), encoding="utf-8"))
    atomic_write(out / "labels.txt", lambda tmp: tmp.write_text("".join(lab + "\n" for lab in labels), encoding="utf-8"))
    return n, d
