"""Durable file operations: write to a temp file, fsync, rename, fsync the folder; a write lock.

Every write here turns an :class:`OSError` (no space left, file-size limit, permission, read-only
file system) into a :class:`~embedstore.errors.WriteFailedError` that names the path, after
removing its temp file, so a full disk ends a command with one clear line and leaves no debris.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from embedstore.errors import StoreLockedError, WriteFailedError

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


def atomic_write(path: Path, write: Callable[[Path], None], kept: str = "") -> None:
    """Call ``write(tmp)`` to fill a temp file, fsync it and rename it to ``path``.

    A crash at any point leaves either the old ``path`` or the new one, never a partial file.

    Raises:
        WriteFailedError: any OS error on the way (the temp file is removed; ``kept`` says in
            the message what is still safe).
    """
    tmp = temp_path(path.parent, path.suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except WriteFailedError:
        raise
    except OSError as exc:
        raise WriteFailedError(path, exc, kept) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any, kept: str = "") -> None:
    """Atomically replace ``path`` with ``data`` as indented JSON (see :func:`atomic_write`)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), kept)


def keep_previous(current: Path, previous: Path, kept: str = "") -> None:
    """Make ``previous`` a durable copy of ``current`` (a hard link where the file system has
    them), replacing the old one atomically. Does nothing when ``current`` does not exist."""
    if not current.exists():
        return
    tmp = temp_path(previous.parent, previous.suffix)
    try:
        try:
            os.link(current, tmp)
        except OSError:  # no hard links here (or a race with a writer): copy instead
            shutil.copyfile(current, tmp)
            fsync_file(tmp)
        os.replace(tmp, previous)
        fsync_dir(previous.parent)
    except OSError as exc:
        raise WriteFailedError(previous, exc, kept) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


class TolerantFile(io.RawIOBase):
    """A file for h5py's ``fileobj`` driver whose writes never fail.

    HDF5 does not recover from a failed write: the file is left half-closed, and closing it again
    at exit can crash the process (a full disk or ``ulimit -f`` ended in SIGSEGV). So the first
    :class:`OSError` is remembered, and from then on written bytes are kept in memory pages,
    where reads find them (HDF5 reads back what it wrote, e.g. heaps of variable-length
    strings), so HDF5 always sees a consistent file and closes it normally. :meth:`finish` then
    raises the remembered error, and the caller removes the file.
    """

    PAGE = 1 << 16

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self._fh = open(path, "w+b", buffering=0)
        self.error: Optional[OSError] = None
        self._pages: dict[int, bytearray] = {}  # written after the first error
        self._pos = 0
        self._end = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._end}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        done = 0
        if self.error is None:
            try:
                self._fh.seek(self._pos)
                while done < n:
                    done += self._fh.write(view[done:]) or 0
            except OSError as exc:
                self.error = exc
        if done < n:
            self._keep(self._pos + done, view[done:])
        self._pos += n
        self._end = max(self._end, self._pos)
        return n

    def _keep(self, offset: int, view: memoryview) -> None:
        while len(view):
            page, at = divmod(offset, self.PAGE)
            if page not in self._pages:
                self._pages[page] = bytearray(self._disk(page * self.PAGE, self.PAGE))
            take = min(len(view), self.PAGE - at)
            self._pages[page][at:at + take] = view[:take]
            offset, view = offset + take, view[take:]

    def _disk(self, offset: int, n: int) -> bytes:
        try:
            data = os.pread(self._fh.fileno(), n, offset)
        except OSError:
            data = b""
        return data + bytes(n - len(data))

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), self._end - self._pos))
        if not self._pages:
            self._fh.seek(self._pos)
            got = self._fh.readinto(out[:n]) or 0
            out[got:n] = bytes(n - got)
        else:
            offset, filled = self._pos, 0
            while filled < n:
                page, at = divmod(offset, self.PAGE)
                take = min(n - filled, self.PAGE - at)
                source = self._pages.get(page)
                out[filled:filled + take] = source[at:at + take] if source is not None else self._disk(offset, take)
                offset, filled = offset + take, filled + take
        self._pos += n
        return n

    def truncate(self, size: Optional[int] = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._fh.truncate(size)
            except OSError as exc:
                self.error = exc
        self._end = size
        return size

    def flush(self) -> None:
        pass  # unbuffered

    def finish(self) -> None:
        """Fsync and close; raise the first write error, if any."""
        try:
            if self.error is None:
                try:
                    os.fsync(self._fh.fileno())
                except OSError as exc:
                    self.error = exc
        finally:
            self.close()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def tolerant_file(path: Path) -> Iterator[TolerantFile]:
    """A :class:`TolerantFile` to write one HDF5 file into (``h5py.File(sink, "w")``), fsynced and
    closed on success. On any error the first write error (no space left, file-size limit) is
    raised in place of what it caused inside HDF5; the caller removes the file."""
    sink = TolerantFile(path)
    try:
        yield sink
    except Exception as exc:
        error = sink.error
        sink.close()
        if error is not None:
            raise error from exc
        raise
    sink.finish()

    def close(self) -> None:
        self._pages.clear()
        with contextlib.suppress(OSError):
            self._fh.close()
        super().close()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (main thread only; elsewhere a no-op), so
    that a second Ctrl-C cannot cut a final commit in half. A signal that arrives meanwhile is
    delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def read_json(path: Path) -> Optional[Any]:
    """Parsed JSON, or None when the file does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


_HELD_LOCKS: "weakref.WeakSet[WriteLock]" = weakref.WeakSet()


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader decoding worker): close the lock descriptors inherited from
    the parent without unlocking them, so that the lock dies with the process that took it."""
    for lock in list(_HELD_LOCKS):
        lock._forget()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriteLock:
    """An exclusive, non-blocking ``flock`` on ``path``; released when the process that took it dies.

    The descriptor is close-on-exec, and forked children (decoding workers) close their copy at
    once, so a killed writer's lock is never kept alive by its workers.

    Raises :class:`StoreLockedError` naming the holder's PID (and saying when that process is
    gone) when another process holds it.
    """

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WriteLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise WriteFailedError(self.path, exc, "nothing was written", "run the command again") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreLockedError(self._busy_message(holder)) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass  # the lock holds without the note (a full disk); the message then says "unknown"
        self._fd = fd
        _HELD_LOCKS.add(self)
        return self

    def _busy_message(self, holder: str) -> str:
        found = re.match(r"pid (\d+)(?: on (\S+))?", holder)
        if found is None:
            who = "another process"
        else:
            pid, host = int(found.group(1)), found.group(2)
            who = f"pid {pid}" + (f" on {host}" if host else "")
            if (host is None or host == socket.gethostname()) and not _pid_alive(pid):
                return (f"{self.what} is locked by {who}, which is no longer running (its lock is still "
                        f"held by a process it left behind, e.g. a decoding worker that is shutting down); "
                        f"wait a few seconds and run the same command again: committed rows are safe and "
                        f"a rerun resumes. Lock file: {self.path}")
            who = f"another process ({who})"
        return (f"{self.what} is being written by {who}; wait for it to finish "
                f"(readers are not affected). Lock file: {self.path}")

    def _forget(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            _HELD_LOCKS.discard(self)
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
