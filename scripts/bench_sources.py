#!/usr/bin/env python
"""Images/s from shards (WebDataset tars, Parquet files) vs the same images as files, in one run.

The same ``--n`` synthetic JPEGs (``--image-size`` square, as ``bench_encode.py`` makes them) are
written as a folder of files, as ``--shards`` uncompressed WebDataset tars (``key.jpg`` +
``key.cls``) and as ``--shards`` Parquet files (binary ``image`` column, ``label`` column). For
each source, on the same machine and in the same process:

  list          listing the source (folder walk + stat / tar headers / Parquet label column)
  loader        the encode run's decoding loader alone (``--workers`` worker processes, whole shards
                per worker for shard sources): read + decode + preprocess, no model
  end-to-end    ``encode_images`` into a fresh cache with the already-loaded encoder (a tiny
                random-weight open_clip model by default: the point is the reading/decoding path)
  no-op rerun   the same ``encode_images`` again: nothing to do (listing + store check)

Each timing is the fastest of ``--repeat`` runs; sources are measured in turn within each repeat.
The stored features of the three sources are compared (they must be equal bit for bit at
``--batch-size 1``; at larger batches the model's last bits may depend on batch composition, so
the maximum difference is printed).

    python scripts/bench_sources.py                        # 4000 images, 100 shards, tiny model
    python scripts/bench_sources.py --n 20000 --workers 8 --model ViT-B-32 --random-weights

This script is never imported by the package.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import make_synthetic_folder  # noqa: E402
from benchlib import machine_info, markdown_table, usable_cores  # noqa: E402

log = logging.getLogger("bench_sources")


def write_shards(folder: Path, out: Path, shards: int) -> tuple[Path, Path]:
    """The folder's images as ``shards`` tars and ``shards`` Parquet files; returns their folders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem[3:]))
    tars, parquet = out / "tars", out / "parquet"
    tars.mkdir(parents=True)
    parquet.mkdir(parents=True)
    per = -(-len(files) // shards)
    for s in range(shards):
        chunk = files[s * per:(s + 1) * per]
        with tarfile.open(tars / f"{s:05d}.tar", "w") as tar:
            for p in chunk:
                for name, data in ((f"{p.stem}.jpg", p.read_bytes()), (f"{p.stem}.cls", str(int(p.stem[3:]) % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        table = pa.table({"image": pa.array([p.read_bytes() for p in chunk], pa.binary()),
                          "label": pa.array([int(p.stem[3:]) % 10 for p in chunk], pa.int64())})
        pq.write_table(table, parquet / f"train-{s:05d}.parquet", row_group_size=256)
    return tars, parquet


def image_number(key: str, per_shard: int) -> int:
    """The synthetic image a key names: ``img12.jpg``, ``00000.tar/img12``, ``train-00000.parquet/12``."""
    head, _, last = key.rpartition("/")
    if last.startswith("img"):
        return int(last[3:].split(".")[0])
    return int(head.split("-")[-1].split(".")[0]) * per_shard + int(last)


def time_loader(source: Any, view: Any, options: Any) -> float:
    from embedstore.encode.loop import _batches, _loader

    t0 = time.perf_counter()
    n = 0
    with _loader(list(source.items), view, "cpu", options, options.decode) as loader, \
            contextlib.closing(_batches(loader, options)) as batches:
        for samples in batches:
            n += sum(1 for s in samples if s[1] is not None)
    if n != len(source):
        raise RuntimeError(f"loader gave {n} of {len(source)} images")
    return time.perf_counter() - t0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="images")
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=usable_cores(), help="decoding worker processes")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--decode", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--model", default=None, help="encoder spec (default: a tiny random-weight open_clip model)")
    ap.add_argument("--random-weights", action="store_true", help="with --model: seeded random weights")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="save the numbers here")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from embedstore import Cache, EncoderSpec
    from embedstore.encode.encoders import load_encoder
    from embedstore.encode.loop import EncodeOptions, encode_images
    from embedstore.encode.sources import list_source
    from embedstore.encode.sources_shards import list_shard_source
    from embedstore.encode.toy import make_tiny_open_clip
    from embedstore.store.views import ViewOptions

    with tempfile.TemporaryDirectory(prefix="bench_sources-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        folder = make_synthetic_folder(root / "files", args.n, args.image_size)
        tars, parquet = write_shards(folder, root, args.shards)
        made = time.perf_counter() - t0
        if args.model is None:
            spec = EncoderSpec(f"local-dir:{make_tiny_open_clip(root / 'model', seed=0)}")
        else:
            spec = EncoderSpec(args.model, random_weights=args.random_weights)
        encoder = load_encoder(spec, "cpu", "fp32")
        view = ViewOptions().apply(encoder.card.default_view)
        options = EncodeOptions(device="cpu", precision="fp32", batch_size=args.batch_size, workers=args.workers,
                                progress=False, decode=args.decode)
        sources = {
            f"{args.n} files (folder)": lambda: list_source(folder),
            f"{args.shards} tar shards": lambda: list_shard_source([f"{tars}/{{00000..{args.shards - 1:05d}}}.tar"]),
            f"{args.shards} Parquet files": lambda: list_shard_source([f"{parquet}/train-*.parquet"]),
        }
        times: dict[str, dict[str, list[float]]] = {name: {} for name in sources}
        features: dict[str, Any] = {}
        for r in range(args.repeat):
            for k, (name, lister) in enumerate(sources.items()):
                t = times[name]
                t1 = time.perf_counter()
                source = lister()
                t.setdefault("list", []).append(time.perf_counter() - t1)
                t.setdefault("loader", []).append(time_loader(source, view, options))
                cache = Cache(root / f"cache-{r}-{k}")
                t1 = time.perf_counter()
                result = encode_images(source, spec, cache, dataset="bench", options=options, encoder=encoder)
                t.setdefault("end-to-end", []).append(time.perf_counter() - t1)
                if result.encoded != args.n or result.failed:
                    raise RuntimeError(f"{name}: encoded {result.encoded} of {args.n} ({result.failed} failed)")
                t1 = time.perf_counter()
                again = encode_images(lister(), spec, cache, dataset="bench", options=options, encoder=None)
                t.setdefault("no-op rerun", []).append(time.perf_counter() - t1)
                if again.encoded:
                    raise RuntimeError(f"{name}: the rerun encoded {again.encoded} images")
                rows = cache.open_image_store("bench", spec).read(as_float32=False)
                order = np.argsort([image_number(key, -(-args.n // args.shards)) for key in rows.keys])
                features[name] = rows.features[order]

    best = {name: {stage: min(v) for stage, v in t.items()} for name, t in times.items()}
    base = next(iter(best))
    headers = ["source", "list s", "loader img/s", "end-to-end img/s", "vs files", "no-op rerun s"]
    rows = []
    for name, b in best.items():
        rate = args.n / b["end-to-end"]
        rows.append([name, f"{b['list']:.2f}", f"{args.n / b['loader']:.0f}", f"{rate:.0f}",
                     f"{rate / (args.n / best[base]['end-to-end']):.2f}x", f"{b['no-op rerun']:.2f}"])
    info = machine_info()
    print(f"# bench_sources: {args.n} images of {args.image_size}px, {args.shards} shards, "
          f"workers {args.workers}, batch {args.batch_size}, decode {args.decode}, "
          f"model {args.model or 'tiny random open_clip'}")
    print(f"# cpu: {info['cpu']} ({info['cpus_usable']} usable cores), load at start {info['loadavg_at_start']}; "
          f"data written in {made:.1f} s; fastest of {args.repeat}")
    print(markdown_table(headers, rows))
    diff = max(float(np.abs(features[base].astype(np.float32) - f.astype(np.float32)).max()) for f in features.values())
    print(f"max |features(files) - features(shards)| over all rows = {diff:g}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": info,
                                         "seconds": times, "max_feature_difference": diff}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
