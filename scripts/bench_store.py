#!/usr/bin/env python
"""Measure what store integrity costs stage 2: fletcher32 chunk checksums against the contiguous,
unchecksummed layout stores had before, at --n rows (default 100k and 1M), side by side.

For each n it writes one synthetic image store (``--dim``, float16, natural key order, one
compacted shard) with the package's own writer (format 2: features chunked in row blocks with
fletcher32, string columns with digests), then a copy of the same rows in the old layout
(format 1: contiguous, no checksums, as embedstore wrote before), plus a text bank of the 312
``ajou-2024`` prompts for six scene classes and an experiment file. Then, per layout:

  read (warm)     in this process, page cache warm, median of --repeat:
                    format 1, raw  the old read: h5py reads the contiguous features, no check
                    format 2       ``Store.read(as_float32=False)``: every chunk's fletcher32 checked
                    format 1, new  ``Store.read`` on the old layout: the whole-file sha256 is
                                   compared before first use (fresh Store each time)
  classify cold   ``python -m embedstore classify EXP --cache DIR --no-encode`` as a subprocess,
                  logit cache removed before every run (so the features are read), layouts
                  interleaved, one warm-up round discarded, median of --cold-repeat; with
                  ``--baseline-src`` also the code from before (``PYTHONPATH``) on the format-1 copy

Prints the machine and one table (layout | read | cold start | ratio to format 1 raw / format 1
new); ``--json PATH`` keeps the numbers. Another process using the CPUs makes every number
worse. This script is never imported by the package.

    python scripts/bench_store.py                       # 100k and 1M rows, d=768
    python scripts/bench_store.py --baseline-src /path/to/embedstore-before   # adds the old code's cold start
    python scripts/bench_store.py --n 100000 --dim 1280
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from benchlib import cpu_model, usable_cores

CLASSES = ("Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street")
DATASET = "scene"
BLOCK = 100_000
BEFORE = "format 1, raw (before)"


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def build(root: Path, n: int, dim: int) -> dict[str, Any]:
    """A cache with a format-2 image store of n rows, a text bank, and a format-1 copy of the store."""
    from embedstore import Cache
    from embedstore.score.prompts import load_prompt_set
    from embedstore.score.synthetic import (
        PROVENANCE,
        FakeEncoder,
        fake_card,
        write_synthetic_cache,
    )
    from embedstore.store.fingerprint import image_fingerprint

    cache = Cache(root / "cache")
    enc = FakeEncoder("bench", dim=dim)
    write_synthetic_cache(cache, "prompts-only", [enc], CLASSES, per_class=1, prompt_set=load_prompt_set("ajou-2024"))
    card = fake_card(enc)
    store = cache.image_store(DATASET, enc.spec, card.default_view)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((len(CLASSES), dim)).astype(np.float32)
    keys = [f"{c}/{i:07d}.jpg" for c in CLASSES for i in range(n // len(CLASSES) + 1)][:n]
    with store.writer(image_fingerprint(card, card.default_view, "float16"), dim, "float16",
                      dict(PROVENANCE), shard_rows=BLOCK) as w:
        for start in range(0, n, BLOCK):
            part = keys[start:start + BLOCK]
            labels = [k.split("/")[0] for k in part]
            x = centres[[CLASSES.index(lab) for lab in labels]] + rng.standard_normal((len(part), dim), dtype=np.float32)
            w.add(part, x / np.linalg.norm(x, axis=1, keepdims=True), labels, sizes=[1] * len(part),
                  mtimes=[1] * len(part))
            w.commit()
        w.set_info(source={"location": f"synthetic:{DATASET}", "images": n}, labelled=True, classes=list(CLASSES))
        w.compact(order=keys)
    old = root / "old-cache"
    shutil.copytree(cache.root, old)
    to_format_1(type(store)(old / store.path.relative_to(cache.root)))
    exp = root / "exp.toml"
    exp.write_text(f'dataset = "{DATASET}"\nclasses = {json.dumps(list(CLASSES))}\ntemplates = "ajou-2024"\n'
                   f'aggregate = "prob-mean"\nscale = 100.0\n\n[[models]]\nmodel = "{enc.spec.model}"\n')
    return {"new": cache.root, "old": old, "store": store.path.relative_to(cache.root), "exp": exp}


def to_format_1(store: Any) -> None:
    """Rewrite the store's one shard in the layout embedstore wrote before format 2."""
    from embedstore.store.store import new_shard

    manifest = store.manifest()
    entry = manifest["shards"][0]
    with store.open_commit() as commit:
        shard = commit.shards[0]
        columns = {name: shard.column(name) for name in ("keys", "labels", "hash", "size", "mtime_ns")}
        features = shard.features()
    name = entry["file"].replace(".h5", "-f1.h5")
    old = new_shard(store, name, columns["keys"].tolist(), features, columns["labels"].tolist(),
                    columns["size"].tolist(), columns["mtime_ns"].tolist(), columns["hash"].tolist(), checksums=False)
    store.shard_path(entry).unlink()
    manifest["shards"] = [{**old, "versions": entry.get("versions", {})}]
    store.manifest_path.write_text(json.dumps(manifest))


def measure(paths: dict[str, Any], repeat: int, cold_repeat: int, baseline_src: Path | None) -> dict[str, dict[str, float]]:
    import h5py

    from embedstore.store.store import Store

    new_store = paths["new"] / paths["store"]
    old_store = paths["old"] / paths["store"]
    old_shard = next((old_store / "shards").glob("*.h5"))

    def raw_read() -> None:
        with h5py.File(old_shard, "r", locking=False) as f:
            f["features"][:]
            f["keys"].asstr()[:]
            f["labels"].asstr()[:]

    layouts = {  # name: (in-process read, cache for the cold start, PYTHONPATH for the cold start)
        BEFORE: (raw_read, paths["old"], baseline_src),
        "format 2 (fletcher32)": (lambda: Store(new_store).read(as_float32=False), paths["new"], None),
        "format 1, new (sha256)": (lambda: Store(old_store).read(as_float32=False), paths["old"], None),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (read, _, _) in layouts.items():
        read()  # warm the page cache
        out[name] = {"read_s": med(timed(read, repeat))}
    cold: dict[str, list[float]] = {name: [] for name in layouts}
    for run in range(cold_repeat + 1):  # interleaved, the first round discarded (warm-up)
        for name, (_, cache, src) in layouts.items():
            if name == BEFORE and src is None:
                continue
            shutil.rmtree(cache / "logits", ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": str(src)} if src is not None else None
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "embedstore", "classify", str(paths["exp"]), "--cache",
                                   str(cache), "--out", str(cache.parent / "p.csv"), "--no-encode"],
                                  capture_output=True, text=True, env=env, cwd=cache.parent)
            if proc.returncode != 0:
                raise RuntimeError(proc.stdout + proc.stderr)
            if run:
                cold[name].append(time.perf_counter() - t0)
    for name, times in cold.items():
        if times:
            out[name]["cold_s"] = med(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeat", type=int, default=5, help="in-process reads (median reported)")
    p.add_argument("--cold-repeat", type=int, default=5, help="cold-start subprocess runs (median reported)")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="a checkout of embedstore from before format 2 (its repo root): its cold start on the "
                        "format-1 copy is the 'before' row")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    print(f"machine: {cpu_model()}, {usable_cores()} usable cores, Python {platform.python_version()}")
    results = {}
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix="bench_store-") as tmp:
            t0 = time.perf_counter()
            paths = build(Path(tmp), n, args.dim)
            print(f"n={n:,}: stores written in {time.perf_counter() - t0:.1f} s", flush=True)
            found = measure(paths, args.repeat, args.cold_repeat, args.baseline_src)
        results[str(n)] = found
        base = found[BEFORE]["read_s"]
        cold_base = found[BEFORE].get("cold_s", found["format 1, new (sha256)"]["cold_s"])
        for name, m in found.items():
            cold = m.get("cold_s")
            rows.append([f"{n:,}", name, f"{m['read_s']:.3f}", f"{m['read_s'] / base:.2f}x",
                         f"{cold:.2f}" if cold is not None else "-",
                         f"{cold / cold_base:.2f}x" if cold is not None else "-"])
    headers = ["rows", "layout", "read s (warm)", "read / before", "classify cold s",
               "cold / before" if args.baseline_src else "cold / format 1 new"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.json is not None:
        args.json.write_text(json.dumps({"dim": args.dim, "results": results}, indent=1))


if __name__ == "__main__":
    main()
