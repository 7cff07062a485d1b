"""On-disk cache of per-prompt logits ``img @ txt.T`` (float32, scale 1) of an image store.

Every aggregation (``prob-mean``, ``logit-mean``, ``embed-mean``) and every ``scale`` is computed
from these logits, so a process that finds them on disk reads one array instead of the image
features and the matrix product: the cold start of ``embedstore classify`` drops from the cost
of the multiply to the cost of a read. Files are keyed by the store path and commit id, the text
bank fingerprint and the exact prompt list; writing a newer commit's file removes the older
ones of that store, and at most ``KEEP_PER_STORE`` prompt lists are kept per store (least
recently used removed first). A damaged file is reported in the log, removed and recomputed.

Layout: ``<cache>/logits/<store hash>/<commit id>-<prompts hash>.npy`` (``np.save``, no pickle).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from embedstore.fsutil import temp_path

log = logging.getLogger(__name__)

MAX_BYTES = 4 << 30  # larger logit matrices are not cached (recomputed each time)
KEEP_PER_STORE = 8   # prompt lists kept per store; the least recently used go first


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LogitCache:
    """Per-prompt logits of image stores, under ``<cache root>/logits``."""

    def __init__(self, cache_root: Path):
        self.root = Path(cache_root) / "logits"

    def path(self, store_path: Path, commit_id: str, texts_key: str) -> Path:
        return self.root / _hash(str(Path(store_path).resolve())) / f"{commit_id}-{_hash(texts_key)}.npy"

    def load(self, store_path: Path, commit_id: str, texts_key: str, shape: tuple[int, int]) -> Optional[np.ndarray]:
        """The cached ``(n, P)`` logits, or None (missing or damaged: a damaged file is removed)."""
        path = self.path(store_path, commit_id, texts_key)
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: damaged logit cache file (%s); removing it and recomputing", path, exc)
            path.unlink(missing_ok=True)
            return None
        if data.shape != shape or data.dtype != np.float32:
            log.warning("%s: shape %s %s, expected %s float32; removing it and recomputing", path, data.shape,
                        data.dtype, shape)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: kept longest
        return data

    def save(self, store_path: Path, commit_id: str, texts_key: str, logits: np.ndarray) -> None:
        """Write atomically, then drop this store's files of other commits. A failed write (a full
        disk) is logged and skipped: the logits are derived data, recomputed next time."""
        if logits.nbytes > MAX_BYTES:
            return
        path = self.path(store_path, commit_id, texts_key)
        tmp = temp_path(path.parent, ".npy")
        try:  # renamed into place but not fsynced: a file lost to a crash is detected and recomputed
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(logits, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("logit cache not saved (%s: %s); it is recomputed next time", path, exc.strerror or exc)
            return
        finally:
            tmp.unlink(missing_ok=True)
        files = [p for p in path.parent.glob("*.npy") if not p.name.startswith(".")]
        for other in files:
            if not other.name.startswith(commit_id):
                other.unlink(missing_ok=True)
        current = sorted((p for p in files if p.name.startswith(commit_id) and p.exists()),
                         key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in current[KEEP_PER_STORE:]:
            old.unlink(missing_ok=True)
