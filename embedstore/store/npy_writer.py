"""Write a large float32 ``.npy`` matrix row block by row block, atomically.

The file is created at its final size under a temp name, blocks are written at their offsets
(``pwrite``: no memory map, so the writer's resident memory stays one block), and
:meth:`NpyWriter.commit` fsyncs and renames it into place. Readers never see a partial file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from embedstore.util.fsutil import fsync_dir, temp_path


class NpyWriter:
    """A ``(rows, cols)`` float32 ``.npy`` file at ``path``, filled by :meth:`write`."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path.parent, ".npy")
        header = {"descr": "<f4", "fortran_order": False, "shape": self.shape}
        with open(self.tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            self.offset = fh.tell()
            fh.truncate(self.offset + self.shape[0] * self.shape[1] * 4)
        self._fd: Optional[int] = os.open(self.tmp, os.O_WRONLY | os.O_CLOEXEC)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows ``start:start+len(rows)``."""
        assert self._fd is not None, "writer already closed"
        data = np.ascontiguousarray(rows, dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != self.shape[1] or start + len(data) > self.shape[0]:
            raise ValueError(f"block {data.shape} at row {start} does not fit {self.shape}")
        view = memoryview(data).cast("B")
        offset = self.offset + start * self.shape[1] * 4
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def commit(self) -> Path:
        """Flush, rename into place and return the path."""
        assert self._fd is not None, "writer already closed"
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Remove the temp file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)
