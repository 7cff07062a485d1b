"""Stage-1 loader for ``--decode gpu``: JPEGs decoded in batches on the encode device, then the
tensor view (:class:`~embedstore.encode.tensor_view.TensorView`) on the same device.

This module owns: reading files and probing their headers in threads, choosing per file between
the tensor path and the PIL path, batched ``torchvision.io.decode_jpeg(..., device=device)``,
EXIF orientation on tensors, and the background thread that prepares the next batches while the
caller encodes the current one (bounded queue; on CUDA a side stream, pinned host memory and
non-blocking copies). ``device`` is a parameter, so the whole path runs, and is tested, on the CPU.

Which files take the tensor path: JPEG bytes (``FF D8 FF``) that end with the EOI marker, that
Pillow's header parser (no pixel decoding) opens as format ``JPEG``, mode ``RGB``, within Pillow's
decompression-bomb limit. Everything else (PNG, GIF, ..., grayscale and CMYK JPEGs, truncated
files, unreadable files) and every file whose tensor decode fails goes to the **PIL path**: the
exact per-file function the CPU loader runs (``read_bytes`` + ``decode_image`` + ``PilTransform``),
so failures are recorded with the same type and message as ``--decode cpu`` records them and
non-JPEG images get the same tensors.

EXIF orientation: read from the bytes by Pillow's header parser (``getexif()``, the call
``ImageOps.exif_transpose`` makes, so XMP orientation counts too) and applied on the device as the
pixel permutation Pillow applies (flips / transposes / 90-degree rotations are exact).
"""
from __future__ import annotations

import io
import logging
import queue
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from embedstore.store.views import View

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "gpu")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
ORIENTATION_TAG = 0x0112

# A sample, as embedstore.encode.loop's CPU loader yields it:
# (index, tensor or None, size, mtime_ns, content hash, error type, error message)
Sample = tuple[Any, ...]


def choose_decode(requested: str, device: str, view: View) -> str:
    """``cpu`` or ``gpu``: the loader an encode run uses.

    ``auto`` is ``gpu`` when the encode device is CUDA, else ``cpu``. ``gpu`` on a CPU device
    runs the same tensor code on the CPU. Views whose interpolation has no tensor resampler
    (``nearest``) always use ``cpu``.

    Raises:
        ValueError: ``requested`` is not one of :data:`DECODE_MODES`.
    """
    from embedstore.encode.tensor_view import supports

    if requested not in DECODE_MODES:
        raise ValueError(f"decode: {requested!r} is not one of {', '.join(DECODE_MODES)}")
    wanted = "gpu" if requested == "gpu" or (requested == "auto" and device.startswith("cuda")) else "cpu"
    if wanted == "gpu" and not supports(view):
        (log.warning if requested == "gpu" else log.info)(
            "decode: interpolation %r has no tensor implementation; decoding with PIL on the CPU",
            view.interpolation)
        return "cpu"
    return wanted


@dataclass(frozen=True)
class JpegProbe:
    """What the header says about a file: ``reason`` is empty when it can take the tensor path."""

    reason: str
    height: int = 0
    width: int = 0
    orientation: int = 1

    @property
    def ok(self) -> bool:
        return not self.reason


def probe_jpeg(data: bytes) -> JpegProbe:
    """Decide from the bytes, without decoding pixels, whether a file takes the tensor path."""
    from PIL import Image

    if not data.startswith(JPEG_MAGIC):
        return JpegProbe("not a JPEG")
    if not data.rstrip(b"\0").endswith(JPEG_EOI):
        return JpegProbe("no end-of-image marker")
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:  # never another plugin
            if image.format != "JPEG":
                return JpegProbe(f"format {image.format}")
            if image.mode != "RGB":
                return JpegProbe(f"mode {image.mode}")
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                return JpegProbe("over the decompression-bomb limit")
            exif = image.getexif()
            orientation = exif.get(ORIENTATION_TAG, 1)
            if orientation in _TRANSPOSES:
                del exif[ORIENTATION_TAG]
                exif.tobytes()  # exif_transpose does this; a file where it fails keeps the PIL path
    except Exception as exc:  # noqa: BLE001 - any header trouble: the PIL path decides and records it
        return JpegProbe(f"header: {type(exc).__name__}")
    return JpegProbe("", height, width, orientation if orientation in _TRANSPOSES else 1)


# EXIF orientation -> the tensor form of the Image.Transpose that ImageOps.exif_transpose applies
_TRANSPOSES = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
               6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def apply_orientation(image: Any, orientation: int) -> Any:
    """Apply EXIF ``orientation`` to a ``(C, H, W)`` tensor exactly as ``exif_transpose`` does."""
    import torch

    name = _TRANSPOSES.get(orientation)
    if name is None:
        return image
    if name == "FLIP_LEFT_RIGHT":
        return image.flip(-1)
    if name == "FLIP_TOP_BOTTOM":
        return image.flip(-2)
    if name == "ROTATE_180":
        return image.flip(-1, -2)
    if name == "ROTATE_90":  # counter-clockwise
        return torch.rot90(image, 1, dims=(-2, -1))
    if name == "ROTATE_270":
        return torch.rot90(image, -1, dims=(-2, -1))
    if name == "TRANSPOSE":
        return image.transpose(-2, -1)
    return image.transpose(-2, -1).flip(-1, -2)  # TRANSVERSE


@dataclass
class _Jpeg:
    """A file read and probed, waiting for the batched decode."""

    index: int
    data: bytes
    size: int
    mtime_ns: int
    digest: str
    probe: JpegProbe
    job: Any = None  # what the PIL path is handed if this file has to take it


class _End:
    """Queue marker: the producer is done."""


@dataclass
class _Failed:
    """Queue marker: the producer stopped on an unexpected error (re-raised in the consumer)."""

    error: BaseException


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


class TensorBatchLoader:
    """Iterable over batches of samples, a drop-in for the DataLoader of ``embedstore.encode.loop``.

    Each batch is a list of samples ``(index, tensor or None, size, mtime_ns, hash, error type,
    message)`` for consecutive indices (``batch_size`` of them), in order; tensors are float32
    ``(3, size, size)`` on ``device``. ``fallback(i)`` must return the PIL path's sample for item
    ``i`` (``embedstore.encode.loop.ImageDataset.__getitem__``).

    With ``blobs`` (an iterable of :class:`~embedstore.encode.samples.Blob`, images already read,
    e.g. from shards) the bytes are taken as they come instead of reading ``paths``: batches then
    hold ``batch_size`` images in the order the blobs arrive, and ``fallback(blob)`` is the PIL
    path's sample of a blob.

    Use as a context manager (or exhaust it): leaving stops the background thread.
    """

    def __init__(self, paths: Sequence[str], view: View, device: str, batch_size: int,
                 fallback: Callable[[Any], Sample], threads: int = 4, prefetch: int = 2,
                 resample: str = "pil", blobs: Optional[Iterable[Any]] = None):
        from embedstore.encode.tensor_view import TensorView

        self.paths = list(paths)
        self.blobs = blobs
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.fallback = fallback
        self.threads = max(1, int(threads))
        self.prefetch = max(1, int(prefetch))
        self.tensor_view = TensorView(view, resample)
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._cuda = device.startswith("cuda")

    # ---- consumer side -------------------------------------------------------------------------
    def __enter__(self) -> "TensorBatchLoader":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[list[Sample]]:
        import torch

        if self._thread is not None:
            raise RuntimeError("TensorBatchLoader can be iterated once")
        self._thread = threading.Thread(target=self._produce, name="embedstore-decode", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, _End):
                    break
                if isinstance(item, _Failed):
                    raise item.error
                batch, samples = item
                if self._cuda and batch is not None:
                    # made on the side stream, used on the current one: keep the allocator from
                    # reusing the memory before the current stream is done with it
                    batch.record_stream(torch.cuda.current_stream(torch.device(self.device)))
                yield samples
        finally:
            self.close()
        log.info("decode: %d images on the tensor path, %d on the PIL path%s", self.stats["tensor"],
                 sum(v for k, v in self.stats.items() if k != "tensor"),
                 "".join(f"; {k}: {v}" for k, v in sorted(self.stats.items()) if k != "tensor"))

    def close(self) -> None:
        """Stop the background thread (unblocking it if the queue is full) and wait for it."""
        self._stop.set()
        thread = self._thread
        while thread is not None and thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)

    # ---- producer side -------------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            stream = None
            if self._cuda:
                import torch

                stream = torch.cuda.Stream(device=torch.device(self.device))
            jobs: Iterator[Any] = iter(self.blobs) if self.blobs is not None else iter(range(len(self.paths)))
            with ThreadPoolExecutor(self.threads, thread_name_prefix="embedstore-read") as pool:
                pending: deque[list[Future[Any]]] = deque()

                def submit_next() -> None:
                    chunk = list(islice(jobs, self.batch_size))
                    if chunk:
                        pending.append([pool.submit(self._prepare, job) for job in chunk])

                for _ in range(self.prefetch + 1):
                    submit_next()
                while pending and not self._stop.is_set():
                    futures = pending.popleft()
                    submit_next()
                    records = [f.result() for f in futures]
                    batch, samples = self._finish(records, pool, stream)
                    if not self._put((batch, samples)):
                        break
                for futures in pending:
                    for f in futures:
                        f.cancel()
                close = getattr(jobs, "close", None)
                if close is not None:
                    close()  # a blob stream stops its reading threads
            self._put(_End())
        except Exception as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            self._put(_Failed(exc))

    def _prepare(self, job: Any) -> Any:
        """In a reader thread: stat, read (or take a blob's bytes), hash and probe; non-JPEGs go
        through the PIL path here."""
        import os

        from embedstore.encode.samples import Blob
        from embedstore.encode.sources import ImageLoadError, content_hash, read_bytes

        if isinstance(job, Blob):
            if job.data is None or job.error is not None:
                return self._pil(job, "unreadable")
            index, data, size, mtime_ns = job.index, job.data, job.size, job.mtime_ns
        else:
            index, path = job, self.paths[job]
            try:
                st = os.stat(path)
                data = read_bytes(path)
            except (OSError, ImageLoadError):
                return self._pil(job, "unreadable")
            size, mtime_ns = st.st_size, st.st_mtime_ns
        probe = probe_jpeg(data)
        if not probe.ok:
            return self._pil(job, probe.reason)
        return _Jpeg(index, data, size, mtime_ns, content_hash(data), probe, job)

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _pil(self, job: Any, reason: str) -> Sample:
        self._count(f"pil ({reason})")
        return self.fallback(job)

    def _finish(self, records: list[Any], pool: ThreadPoolExecutor, stream: Any) -> tuple[Any, list[Sample]]:
        """Decode the batch's JPEGs on the device, apply orientation and the tensor view, move the
        PIL-path tensors to the device; return ``(batch tensor, samples in order)``."""
        import contextlib

        import torch

        jpegs = [r for r in records if isinstance(r, _Jpeg)]
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with context:
            images = self._decode(jpegs)
            ready: list[tuple[_Jpeg, Any]] = []
            redo: list[tuple[_Jpeg, str]] = []
            for record, image in zip(jpegs, images):
                if image is None:
                    redo.append((record, "decode failed"))
                    continue
                if tuple(image.shape) != (3, record.probe.height, record.probe.width):
                    redo.append((record, "decoded size differs from header"))
                    continue
                image = apply_orientation(image, record.probe.orientation)
                if not self.tensor_view.accepts(int(image.shape[1]), int(image.shape[2])):
                    redo.append((record, "view rejects size"))
                    continue
                ready.append((record, image))
            viewed, failed = self._view(ready)
            redo += [(record, "view out of memory") for record in failed]
            redone = {record.index: pool.submit(self._pil, record.job, reason) for record, reason in redo}
            by_index: dict[int, Sample] = {}
            for record, tensor in viewed:
                by_index[record.index] = (record.index, tensor, record.size, record.mtime_ns, record.digest, "", "")
            self._count("tensor", len(viewed))
            for index, future in redone.items():
                by_index[index] = future.result()
            samples = [by_index[r.index] if isinstance(r, _Jpeg) else r for r in records]
            batch, samples = self._gather(samples)
            if stream is not None:
                stream.synchronize()  # blocks this thread only; the batch is ready when queued
        return batch, samples

    def _decode(self, jpegs: list[_Jpeg]) -> list[Optional[Any]]:
        """``decode_jpeg`` of a batch on the device; on failure per file, halving on out-of-memory.
        ``None`` marks a file the PIL path has to take."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        inputs = [torch.frombuffer(bytearray(r.data), dtype=torch.uint8) for r in jpegs]
        try:
            out = decode_jpeg(inputs, mode=ImageReadMode.RGB, device=self.device)
            return list(out)
        except (RuntimeError, ValueError, TypeError) as exc:
            if _is_oom(exc):
                torch.cuda.empty_cache()
                if len(jpegs) == 1:
                    return [None]
                half = len(jpegs) // 2
                log.warning("GPU out of memory decoding %d JPEGs: retrying in halves", len(jpegs))
                return self._decode(jpegs[:half]) + self._decode(jpegs[half:])
            if len(jpegs) == 1:
                log.debug("decode_jpeg failed on image %d: %s", jpegs[0].index, exc)
                return [None]
            log.debug("batched decode_jpeg failed (%s): decoding one by one", exc)
            return [item for r in jpegs for item in self._decode([r])]

    def _view(self, ready: list[tuple[_Jpeg, Any]]) -> tuple[list[tuple[_Jpeg, Any]], list[_Jpeg]]:
        """Tensor view of decoded images; halves the group on out-of-memory. Returns the
        ``(record, tensor)`` pairs done and the records left for the PIL path."""
        import torch

        if not ready:
            return [], []
        try:
            out = self.tensor_view([image for _, image in ready])
            return [(record, out[k]) for k, (record, _) in enumerate(ready)], []
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(ready) == 1:
                return [], [ready[0][0]]
            half = len(ready) // 2
            log.warning("GPU out of memory preprocessing %d images: retrying in halves", len(ready))
            first, second = self._view(ready[:half]), self._view(ready[half:])
            return first[0] + second[0], first[1] + second[1]

    def _gather(self, samples: list[Sample]) -> tuple[Optional[Any], list[Sample]]:
        """Stack the good samples' tensors into one ``(n_good, 3, S, S)`` tensor on the device (the
        PIL-path tensors pinned and copied without blocking); samples then hold views of it."""
        import torch

        good = [k for k, s in enumerate(samples) if s[1] is not None]
        if not good:
            return None, samples
        tensors = [samples[k][1] for k in good]
        if torch.device(self.device).type != "cpu":
            on_host = [j for j, t in enumerate(tensors) if t.device.type == "cpu"]
            if on_host:
                moved = torch.stack([tensors[j] for j in on_host]).pin_memory().to(self.device, non_blocking=True)
                for m, j in enumerate(on_host):
                    tensors[j] = moved[m]
        batch = torch.stack(tensors)
        out = list(samples)
        for j, k in enumerate(good):
            out[k] = (samples[k][0], batch[j], *samples[k][2:])
        return batch, out
