"""Export a store to plain files any tool can read: features.npy, keys.txt, labels.txt."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from embedstore.fsutil import atomic_write
from embedstore.store import Store


def unit_rows(features: np.ndarray, copy: bool = True) -> np.ndarray:
    """``features`` as float32 with every row L2-normalised (zero rows stay zero); ``copy=False``
    normalises a float32 array in place."""
    out = np.asarray(features, dtype=np.float32)
    out = out.copy() if copy or out is not features else out
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def export_features(store: Store, out_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Write ``features.npy`` (float32, n×d, natural key order), ``keys.txt`` and ``labels.txt``
    (one label per line, empty lines when unlabelled) into ``out_dir``.

    The features are exactly what :meth:`Store.read` returns: the stored unit vectors as float32,
    not renormalised (see :data:`embedstore.store.UNIT_NORM_TOLERANCE`); apply :func:`unit_rows`
    for norms of 1 to float32 precision. Returns ``(n, d)``. Each file is replaced atomically.
    """
    rows = store.read()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = rows.features

    def save_npy(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, features)

    for key in rows.keys:
        if "\n" in key or "\r" in key:
            raise ValueError(f"key {key!r} contains a line break; keys.txt cannot hold it")
    labels = rows.labels if rows.labels is not None else [""] * len(rows.keys)
    atomic_write(out / "features.npy", save_npy)
    atomic_write(out / "keys.txt", lambda tmp: tmp.write_text("".join(k + "\n" for k in rows.keys), encoding="utf-8"))
    atomic_write(out / "labels.txt", lambda tmp: tmp.write_text("".join(lab + "\n" for lab in labels), encoding="utf-8"))
    return features.shape[0], features.shape[1]
