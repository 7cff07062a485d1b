"""Durable file operations: write to a temp file, fsync, rename, fsync the folder; a write lock."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from embedstore.errors import StoreLockedError

TMP_PREFIX = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a closed file's data to disk."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def temp_path(folder: Path, suffix: str = "") -> Path:
    """A hidden, unique temp name in ``folder`` (readers never list hidden files)."""
    return folder / f"{TMP_PREFIX}{uuid.uuid4().hex}{suffix}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a temp file, fsync it and rename it to ``path``.

    A crash at any point leaves either the old ``path`` or the new one, never a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path.parent, path.suffix)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically replace ``path`` with ``data`` as indented JSON."""
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> Optional[Any]:
    """Parsed JSON, or None when the file does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class WriteLock:
    """An exclusive, non-blocking ``flock`` on ``path``; released when the process dies.

    Raises :class:`StoreLockedError` naming the holder's PID when another process holds it.
    """

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "WriteLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"{self.what} is being written by another process ({holder}); "
                f"wait for it to finish (readers are not affected). Lock file: {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
