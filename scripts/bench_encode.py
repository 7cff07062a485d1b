#!/usr/bin/env python
"""Measure stage-1 encoding throughput (images/s) stage by stage, on one machine, in one run.

Stages, each timed separately on the same images:

  read                 ``read_bytes`` of every file (the page cache is usually warm: the files
                       were just written or listed)
  decode+preprocess    ``decode_image`` + ``PilTransform(view)`` from the bytes in memory, in
                       this process, and again in a torch DataLoader with ``--workers`` worker
                       processes (set up as ``embedstore.encode.loop._run`` sets up its loader;
                       worker start-up is included, as it is in a real run)
  encode               the model only (``AdaptiveBatcher`` over ``encoder.encode_images``) on
                       preprocessed tensors already in memory, in batches of ``--batch-size``,
                       after one warm-up batch; includes the host->device copy and the copy
                       back to numpy (that is what the encoder contract returns)
  write                ``Store.writer`` adding every row (float16), committing and compacting,
                       in a temporary folder
  end-to-end           ``embedstore.encode_images`` into a fresh temporary cache, with the
                       already-loaded encoder (model load time is reported separately)

Without ``--images`` it writes ``--n`` synthetic JPEGs (``--image-size`` square; smooth
gradients and blobs plus noise, so JPEG decoding costs what it costs on photos) to a temporary
folder. Prints the machine, a table and the bottleneck; ``--json PATH`` saves the numbers.
``--decode`` selects the loader of the end-to-end stage (as ``embedstore encode --decode``).

``--gpu`` compares instead, on the same images and for each of ``--gpu-models`` (default
ViT-B-32, ViT-L-14, ViT-bigG-14-quickgelu, random weights, fp16 by default), with the seed's view
(squash 224 px bicubic, sharpness 2.3):

  seed loop            the seed notebook's loop: a torch DataLoader (2 workers, batch 32) of
                       ``Image.open(path).convert("RGB")`` + the seed's processor (PilTransform),
                       each batch encoded on the GPU
  ours                 ``embedstore.encode_images`` with ``decode="gpu"`` (nvJPEG batches, tensor
                       view on the GPU, reading and decoding overlapped with encoding) into a fresh
                       store, including the store writes
  model only           the encoder on a preprocessed batch already on the GPU: the limit

and prints images/s, ``ours / seed`` and ``ours / model only``.

    python scripts/bench_encode.py --model ViT-B-32 --n 256
    python scripts/bench_encode.py --model local-dir:/tmp/tiny --n 1024 --workers 2
    python scripts/bench_encode.py --images ~/data/intel/seg_test --n 2000 --gpu

This script is never imported by the package.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from benchlib import cpu_model, usable_cores

log = logging.getLogger("bench_encode")

DEFAULT_SYNTHETIC_N = 1024  # random-weight ViT-B-32 on 2 CPU cores (~16 img/s): about 2.5 minutes in all


# ---------------------------------------------------------------------------------------------
# synthetic images


def synthetic_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB uint8 ``size``x``size`` array: per-channel linear gradients, a few soft blobs,
    a faint texture and pixel noise (JPEG files of a realistic size and decode cost)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    img = np.empty((size, size, 3), dtype=np.float32)
    for c in range(3):
        a, b, base = rng.uniform(-90, 90), rng.uniform(-90, 90), rng.uniform(60, 190)
        img[..., c] = base + a * xx + b * yy
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, 1, size=2)
        radius = rng.uniform(0.08, 0.35)
        colour = rng.uniform(-80, 80, size=3).astype(np.float32)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))
        img += blob[..., None] * colour
    freq = rng.uniform(4, 20)
    img += 12 * np.sin(2 * np.pi * freq * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)))[..., None]
    img += rng.normal(0, 10, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic_folder(folder: Path, n: int, size: int, seed: int = 0, quality: int = 90) -> Path:
    """Write ``folder/img<i>.jpg`` for i in 0..n-1; return the folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic_image(rng, size)).save(folder / f"img{i}.jpg", quality=quality)
    return folder


# ---------------------------------------------------------------------------------------------
# stages


@dataclass
class StageResult:
    stage: str
    images: int
    seconds: float
    pipeline: bool = True  # part of what encode_images does (candidate bottleneck)
    note: str = ""
    all_seconds: tuple[float, ...] = ()  # every repeat (``seconds`` is the fastest)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


class _BytesDataset:
    """Map-style dataset over in-memory bytes: index -> preprocessed tensor (decode + view only)."""

    def __init__(self, blobs: Sequence[bytes], transform: Any):
        self.blobs = blobs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> Any:
        from embedstore.encode.sources import decode_image

        return self.transform(decode_image(self.blobs[i]))


def _collate_list(samples: list[Any]) -> list[Any]:
    return samples


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def stage_read(paths: Sequence[str], repeat: int) -> tuple[StageResult, list[bytes]]:
    from embedstore.encode.sources import read_bytes

    times, blobs = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        blobs = [read_bytes(p) for p in paths]
        times.append(time.perf_counter() - t0)
    result = StageResult("read (read_bytes)", len(paths), min(times), all_seconds=tuple(times),
                         note="page cache warm (files just written or listed)")
    return result, blobs


def stage_decode_inprocess(blobs: Sequence[bytes], transform: Any, repeat: int) -> tuple[StageResult, list[Any]]:
    from embedstore.encode.sources import decode_image

    times, tensors = [], []
    for _ in range(repeat):
        tensors = []
        t0 = time.perf_counter()
        for data in blobs:
            tensors.append(transform(decode_image(data)))
        times.append(time.perf_counter() - t0)
    result = StageResult("decode+preprocess (1 process)", len(blobs), min(times), all_seconds=tuple(times),
                         pipeline=False, note="from bytes in memory; what one core does")
    return result, tensors


def loader_workers(requested: int, n: int, batch_size: int) -> int:
    """The worker count ``embedstore.encode.loop._run`` would use for ``n`` images."""
    return max(0, min(requested, n // max(1, batch_size) + 1))


def stage_decode_loader(blobs: Sequence[bytes], transform: Any, batch_size: int, workers: int,
                        device: str, repeat: int) -> StageResult:
    from torch.utils.data import DataLoader

    dataset = _BytesDataset(blobs, transform)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate_list,
            pin_memory=device.startswith("cuda"),
            prefetch_factor=4 if workers else None,
        )
        seen = 0
        for batch in loader:
            seen += len(batch)
        del loader
        times.append(time.perf_counter() - t0)
        assert seen == len(blobs), (seen, len(blobs))
    name = f"decode+preprocess (DataLoader, {workers} worker{'s' if workers != 1 else ''})"
    return StageResult(name, len(blobs), min(times), all_seconds=tuple(times), note="incl. worker start-up")


def stage_encode(tensors: Sequence[Any], encoder: Any, batch_size: int, repeat: int) -> tuple[StageResult, np.ndarray]:
    import torch

    from embedstore.encode.loop import AdaptiveBatcher

    encode = AdaptiveBatcher(encoder)
    batches = [range(s, min(s + batch_size, len(tensors))) for s in range(0, len(tensors), batch_size)]
    encode(torch.stack([tensors[i] for i in batches[0]]))  # warm-up (kernels, allocator, autotune)
    _sync(encoder.device)
    times, features = [], np.zeros((0, 0), dtype=np.float32)
    for _ in range(repeat):
        outs = []
        _sync(encoder.device)
        t0 = time.perf_counter()
        for idx in batches:
            outs.append(encode(torch.stack([tensors[i] for i in idx])))
        _sync(encoder.device)
        times.append(time.perf_counter() - t0)
        features = np.concatenate(outs)
    note = "tensors in memory, after 1 warm-up batch"
    if encode.max_chunk:
        note += f"; batches cut to {encode.max_chunk} by GPU out-of-memory"
    result = StageResult("encode (model only)", len(tensors), min(times), all_seconds=tuple(times), note=note)
    return result, features


def stage_write(root: Path, keys: Sequence[str], features: np.ndarray, card: Any, view: Any,
                sizes: Sequence[int], mtimes: Sequence[int], hashes: Sequence[str],
                batch_size: int, device: str, precision: str, repeat: int) -> StageResult:
    from embedstore.encode.loop import provenance
    from embedstore.store.fingerprint import image_fingerprint
    from embedstore.store.store import Store

    fingerprint = image_fingerprint(card, view, "float16")
    prov = provenance(device, precision)
    times = []
    for r in range(repeat):
        store = Store(root / f"write-{r}")
        t0 = time.perf_counter()
        with store.writer(fingerprint, card.dim, "float16", prov) as writer:
            for s in range(0, len(keys), batch_size):
                e = s + batch_size
                writer.add(keys[s:e], features[s:e], None, sizes[s:e], mtimes[s:e], hashes[s:e])
                writer.maybe_commit()
            writer.compact(order=list(keys))
        times.append(time.perf_counter() - t0)
        stored = len(store.read(sort=False))
        assert stored == len(keys), (stored, len(keys))
    return StageResult("write (Store.writer, float16)", len(keys), min(times), all_seconds=tuple(times),
                       note="add + commit + compact, temp folder")


def stage_end_to_end(root: Path, source: Any, spec: Any, encoder: Any, args: argparse.Namespace,
                     repeat: int, view_options: Any = None, decode: Optional[str] = None,
                     name: str = "end-to-end (encode_images)") -> StageResult:
    from embedstore.encode import loop as enc_mod
    from embedstore.store.cache import Cache
    from embedstore.store.views import ViewOptions

    options = enc_mod.EncodeOptions(device=args.device, precision=args.precision, batch_size=args.batch_size,
                                    workers=args.workers, progress=False, decode=decode or args.decode)
    times = []
    for r in range(repeat):
        cache = Cache(root / f"cache-{r}-{time.monotonic_ns()}")
        t0 = time.perf_counter()
        result = enc_mod.encode_images(source, spec, cache=cache, dataset="bench", options=options, encoder=encoder,
                                       view_options=view_options or ViewOptions())
        times.append(time.perf_counter() - t0)
        if result.encoded != len(source) or result.failed:
            raise RuntimeError(f"end-to-end encoded {result.encoded} of {len(source)} images "
                               f"({result.failed} failed: {list(result.failures.items())[:3]})")
    return StageResult(name, len(source), min(times), all_seconds=tuple(times),
                       note=f"fresh temp cache, encoder already loaded, decode {options.decode}")


class _SeedDataset:
    """The seed notebook's dataset: open a path with PIL, RGB, the seed's processor."""

    def __init__(self, paths: Sequence[str], transform: Any):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def stage_seed_loop(paths: Sequence[str], encoder: Any, view: Any, repeat: int,
                    batch_size: int = 32, workers: int = 2) -> StageResult:
    """The seed's loop: DataLoader(batch 32, 2 workers) of PIL + processor, encode each batch."""
    from torch.utils.data import DataLoader

    from embedstore.encode.pil_view import PilTransform

    dataset = _SeedDataset(paths, PilTransform(view))
    times = []
    for _ in range(repeat):
        _sync(encoder.device)
        t0 = time.perf_counter()
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
        seen = 0
        for batch in loader:
            seen += len(encoder.encode_images(batch))
        del loader
        _sync(encoder.device)
        times.append(time.perf_counter() - t0)
        assert seen == len(paths), (seen, len(paths))
    return StageResult(f"seed loop (DataLoader {workers} workers, batch {batch_size})", len(paths), min(times),
                       all_seconds=tuple(times), note="PIL decode + processor in workers, incl. worker start-up")


def stage_model_only(encoder: Any, n: int, size: int, batch_size: int, repeat: int) -> StageResult:
    """The encoder alone on a preprocessed batch already on its device (after one warm-up batch)."""
    import torch

    from embedstore.encode.loop import AdaptiveBatcher

    encode = AdaptiveBatcher(encoder)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn((batch_size, 3, size, size), generator=generator).to(encoder.device)
    encode(batch)
    times = []
    for _ in range(repeat):
        _sync(encoder.device)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            part = batch[: min(batch_size, n - done)]
            done += len(encode(part))
        _sync(encoder.device)
        times.append(time.perf_counter() - t0)
    note = "input already on the device; includes the features' copy back to numpy"
    if encode.max_chunk:
        note += f"; batches cut to {encode.max_chunk} by out-of-memory"
    return StageResult("model only", n, min(times), all_seconds=tuple(times), note=note)


GPU_MODELS = ("ViT-B-32", "ViT-L-14", "ViT-bigG-14-quickgelu")


def run_gpu_comparison(args: argparse.Namespace, source: Any, root: Path, image_desc: str) -> int:
    """``--gpu``: seed loop vs ours vs model only, per architecture, on the same images."""
    import gc

    import torch

    from embedstore.encode.encoders import EncoderSpec, load_encoder
    from embedstore.store.views import ViewOptions

    seed_view = ViewOptions(resize_mode="squash", interpolation="bicubic", sharpness=2.3)  # size: the model's (224)
    paths = [it.path for it in source.items]
    results: list[dict[str, Any]] = []
    sizes: set[int] = set()
    for model in args.gpu_models:
        spec = EncoderSpec(model, None, random_weights=True)  # random weights on purpose: a speed benchmark
        log.info("%s: loading (random weights) on %s, precision %s", model, args.device, args.precision)
        t0 = time.perf_counter()
        encoder = load_encoder(spec, args.device, args.precision)
        load_seconds = time.perf_counter() - t0
        view = seed_view.apply(encoder.card.default_view)
        sizes.add(view.size)
        log.info("%s: model only", model)
        limit = stage_model_only(encoder, len(paths), view.size, args.batch_size, args.repeat)
        log.info("%s: seed loop", model)
        seed = stage_seed_loop(paths, encoder, view, args.repeat)
        log.info("%s: ours (encode_images, decode gpu)", model)
        ours = stage_end_to_end(root, source, spec, encoder, args, args.repeat, view_options=seed_view,
                                decode="gpu", name="ours (encode_images, decode gpu)")
        results.append({"model": model, "load_seconds": load_seconds, "precision": getattr(encoder, "precision", ""),
                        "stages": [seed, ours, limit]})
        del encoder
        gc.collect()
        torch.cuda.empty_cache()

    print()
    print(f"device:   {torch.cuda.get_device_name(torch.device(args.device))}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    side = "/".join(str(v) for v in sorted(sizes))
    print(f"images:   {len(paths)}, {image_desc}; view: squash {side} px bicubic, sharpness 2.3 (the seed's)")
    print(f"settings: ours with batch size {args.batch_size}, {args.workers} reader threads"
          + (f", best of {args.repeat}" if args.repeat > 1 else ""))
    print()
    header = ("model", "precision", "seed loop img/s", "ours img/s", "model only img/s", "ours/seed", "ours/model only")
    rows = []
    for r in results:
        seed, ours, limit = r["stages"]
        rows.append((r["model"], r["precision"], f"{seed.rate:,.1f}", f"{ours.rate:,.1f}", f"{limit.rate:,.1f}",
                     f"{ours.rate / seed.rate:.2f}x", f"{ours.rate / limit.rate:.0%}"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print()
    for r in results:
        for stage in r["stages"]:
            print(f"  {r['model']}: {stage.stage}: {stage.note}")
    if args.json is not None:
        payload = {
            "mode": "gpu",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "images": len(paths),
            "image_source": image_desc,
            "results": [{**{k: v for k, v in r.items() if k != "stages"},
                         "stages": [{**asdict(s), "images_per_s": s.rate} for s in r["stages"]]} for r in results],
            "argv": sys.argv,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log.info("saved %s", args.json)
    return 0


# ---------------------------------------------------------------------------------------------
# reporting


def machine_info(encoder: Any, args: argparse.Namespace, workers_used: int, n: int, image_desc: str) -> dict[str, Any]:
    import torch

    cpu_name = cpu_model()
    affinity = usable_cores()
    device = encoder.device
    if device.startswith("cuda"):
        device_name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        device_name = f"cpu ({cpu_name or platform.machine()})"
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu": cpu_name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device_name,
        "precision": getattr(encoder, "precision", args.precision),
        "model": str(encoder.spec),
        "view": encoder.card.default_view.describe(),
        "dim": encoder.card.dim,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "workers_used": workers_used,
        "images": n,
        "image_source": image_desc,
        "repeat": args.repeat,
    }


def format_table(stages: Sequence[StageResult], e2e_rate: float) -> str:
    header = ("stage", "images", "seconds", "images/s", "vs end-to-end")
    rows = [
        (s.stage, str(s.images), f"{s.seconds:.3f}", f"{s.rate:,.1f}", f"{s.rate / e2e_rate:.2f}x")
        for s in stages
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure embedstore stage-1 throughput (images/s) stage by stage.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", type=Path, default=None,
                   help="image folder or .txt/.csv list (default: synthetic JPEGs in a temp folder)")
    p.add_argument("--n", type=int, default=None,
                   help=f"images to use (synthetic: how many to write, default {DEFAULT_SYNTHETIC_N}; "
                        "--images: the first N in natural order, default all)")
    p.add_argument("--image-size", type=int, default=150, help="side of the synthetic JPEGs in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    p.add_argument("--model", default="ViT-B-32",
                   help="open_clip name (random weights without --pretrained), local-dir:PATH, "
                        "hf-hub:REPO or hf:REPO_OR_DIR")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    p.add_argument("--trust-remote-code", action="store_true", help="for hf: models with custom code")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader worker processes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    p.add_argument("--repeat", type=int, default=1, help="time each stage this many times; report the fastest")
    p.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="loader of the end-to-end stage (as embedstore encode --decode)")
    p.add_argument("--gpu", action="store_true",
                   help="compare on the GPU: seed loop vs ours (decode gpu) vs model only for --gpu-models "
                        "(random weights; --model is ignored); fails clearly without a GPU")
    p.add_argument("--gpu-models", nargs="+", default=list(GPU_MODELS), metavar="NAME",
                   help="open_clip architectures compared by --gpu")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also save the results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only (the table is still printed)")
    args = p.parse_args(argv)
    if args.n is not None and args.n <= 0:
        p.error("--n must be positive")
    if args.batch_size <= 0:
        p.error("--batch-size must be positive")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if args.repeat <= 0:
        p.error("--repeat must be positive")
    if args.image_size <= 0:
        p.error("--image-size must be positive")
    if args.gpu:
        if args.device == "cpu":
            p.error("--gpu and --device cpu contradict each other")
        args.device = "cuda"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # root at WARNING: open_clip logs its every step at INFO on the root logger
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("bench_encode", "embedstore"):
        logging.getLogger(name).setLevel(logging.WARNING if args.quiet else logging.INFO)
    started = time.perf_counter()

    import torch

    from embedstore.encode.encoders import EncoderSpec, load_encoder
    from embedstore.encode.pil_view import PilTransform
    from embedstore.encode.sources import Source, content_hash, list_source
    from embedstore.errors import EmbedstoreError

    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--%s: no CUDA GPU is visible to torch %s (torch.version.cuda=%s); "
                  "run without --gpu / with --device cpu", "gpu" if args.gpu else "device cuda",
                  torch.__version__, torch.version.cuda)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_encode_") as tmp:
        root = Path(tmp)
        source, image_desc = None, ""
        try:
            if args.images is None:
                n = args.n or DEFAULT_SYNTHETIC_N
                t0 = time.perf_counter()
                folder = make_synthetic_folder(root / "images", n, args.image_size, args.seed)
                source = list_source(folder)
                mean_kb = sum(it.state.size for it in source.items) / len(source) / 1024
                image_desc = f"synthetic {args.image_size}x{args.image_size} JPEG q90, mean {mean_kb:.1f} KiB"
                log.info("wrote %d synthetic %dx%d JPEGs (mean %.1f KiB) in %.1fs", n, args.image_size,
                         args.image_size, mean_kb, time.perf_counter() - t0)
            else:
                full = list_source(args.images)
                items = full.items[: args.n] if args.n else full.items
                source = Source(location=full.location, items=tuple(items), labelled=full.labelled)
                mean_kb = sum(max(0, it.state.size) for it in source.items) / len(source) / 1024
                image_desc = f"{full.location} ({len(source)} of {len(full)} images, mean {mean_kb:.1f} KiB)"
            n = len(source)
            if args.gpu:
                return run_gpu_comparison(args, source, root, image_desc)

            spec = EncoderSpec(args.model, args.pretrained, args.trust_remote_code,
                               random_weights=args.pretrained is None)  # the help says: random without --pretrained
            t0 = time.perf_counter()
            encoder = load_encoder(spec, args.device, args.precision)
            load_seconds = time.perf_counter() - t0
            log.info("model loaded in %.1fs", load_seconds)
        except EmbedstoreError as exc:
            log.error("%s", exc)
            return 2

        view = encoder.card.default_view
        transform = PilTransform(view)
        workers_used = loader_workers(args.workers, n, args.batch_size)
        info = machine_info(encoder, args, workers_used, n, image_desc)
        info["model_load_seconds"] = round(load_seconds, 3)

        paths = [it.path for it in source.items]
        keys = [it.key for it in source.items]
        stages: list[StageResult] = []

        log.info("stage: read")
        result, blobs = stage_read(paths, args.repeat)
        stages.append(result)
        bad = [k for k, b in zip(keys, blobs) if not b]
        if bad:
            log.error("empty files, e.g. %s", bad[0])
            return 2

        log.info("stage: decode+preprocess (1 process)")
        result, tensors = stage_decode_inprocess(blobs, transform, args.repeat)
        stages.append(result)

        log.info("stage: decode+preprocess (DataLoader, %d workers)", workers_used)
        stages.append(stage_decode_loader(blobs, transform, args.batch_size, workers_used, encoder.device, args.repeat))

        log.info("stage: encode (%d images, batches of %d)", n, args.batch_size)
        result, features = stage_encode(tensors, encoder, args.batch_size, args.repeat)
        stages.append(result)
        del tensors

        log.info("stage: write")
        sizes = [len(b) for b in blobs]
        mtimes = [it.state.mtime_ns for it in source.items]
        hashes = [content_hash(b) for b in blobs]
        del blobs
        stages.append(stage_write(root, keys, features, encoder.card, view, sizes, mtimes, hashes,
                                  args.batch_size, encoder.device, info["precision"], args.repeat))

        log.info("stage: end-to-end")
        stages.append(stage_end_to_end(root, source, spec, encoder, args, args.repeat))

    e2e = stages[-1]
    encode_stage = next(s for s in stages if s.stage.startswith("encode"))
    components = [s for s in stages if s.pipeline and s is not e2e]
    bottleneck = min(components, key=lambda s: s.rate)
    fraction = e2e.rate / encode_stage.rate
    total = time.perf_counter() - started

    print()
    print(f"machine:  {info['cpu_count']} CPUs ({info['cpus_usable']} usable), {info['cpu']}; "
          f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads)")
    print(f"device:   {info['device']}, precision {info['precision']}")
    print(f"model:    {info['model']} (dim {info['dim']}, loaded in {load_seconds:.1f}s)")
    print(f"view:     {info['view']}")
    print(f"images:   {n}, {image_desc}")
    print(f"settings: batch size {args.batch_size}, workers {args.workers}"
          + (f" ({workers_used} used)" if workers_used != args.workers else "")
          + (f", best of {args.repeat}" if args.repeat > 1 else ""))
    print()
    print(format_table(stages, e2e.rate))
    print()
    for s in stages:
        if s.note:
            print(f"  {s.stage}: {s.note}")
    print()
    print(f"bottleneck: {bottleneck.stage} at {bottleneck.rate:,.1f} images/s")
    print(f"end-to-end: {e2e.rate:,.1f} images/s = {fraction:.0%} of the model-only limit "
          f"({encode_stage.rate:,.1f} images/s)")
    log.info("benchmark finished in %.1fs", total)

    if args.json is not None:
        payload = {
            "machine": info,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "stages": [{**asdict(s), "images_per_s": s.rate, "vs_end_to_end": s.rate / e2e.rate} for s in stages],
            "bottleneck": bottleneck.stage,
            "end_to_end_images_per_s": e2e.rate,
            "model_only_images_per_s": encode_stage.rate,
            "end_to_end_fraction_of_model_only": fraction,
            "total_seconds": total,
            "argv": sys.argv,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log.info("saved %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
