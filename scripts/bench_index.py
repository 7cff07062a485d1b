#!/usr/bin/env python
"""Benchmark FAISS index kinds on clustered synthetic features, side by side in one run.

For each kind (exact ``Flat``, ``HNSW32``, ``IVF{nlist},Flat``; ``pq`` on request) built with
``embedstore.search.ann`` exactly as ``embedstore index build`` builds it:

  build s      what ``embedstore index build`` does: train (k-means on a seeded sample for IVF),
               add (graph construction for HNSW) and tune nprobe / efSearch until recall@10 of
               1000 held-out rows reaches --recall (``search.build_tuned``)
  memory       resident-set growth while building (and FAISS's own serialised size)
  batch QPS    --queries held-out queries searched in one call
  latency      one query per call: median and 95th percentile over --single queries
  recall@10    on the held-out queries, against exact search (Flat is the reference)

Then the nearest-class query of ``embedstore query --classes``: a 100,000-row fp16 store (written
with the real store writer) is read, normalised and ranked against 6 classes x 52 prompts, both
class matches (``mean``, ``best``).

Data: ``--n`` unit vectors of width ``--d`` in ``--clusters`` clusters gathered around ``--groups``
directions; each cluster varies along its own 32-dimensional subspace plus a little isotropic
noise (low intrinsic dimension, as CLIP features have; isotropic noise in all 768 dimensions
would make neighbours meaningless). Queries are fresh draws from the same mixture, never rows
of the index.

    python scripts/bench_index.py                       # 1,000,000 x 768 (needs ~12 GB RAM, ~15 min on 2 cores)
    python scripts/bench_index.py --n 200000 --kinds flat,ivf,hnsw,pq --json /tmp/index.json

This script is never imported by the package.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from benchlib import cpu_model, usable_cores

log = logging.getLogger("bench_index")


def clustered(n: int, d: int, centres: np.ndarray, spread: float, seed: int, chunk: int = 50_000,
              intrinsic: int = 32, iso: float = 0.3) -> np.ndarray:
    """``n`` unit rows around ``centres``: each cluster varies along its own random ``intrinsic``-
    dimensional subspace (norm ``spread``) plus a little isotropic noise (norm ``iso``).

    Real CLIP features have a low intrinsic dimension; isotropic noise in all ``d`` dimensions would
    make every point of a cluster nearly equidistant, and nearest neighbours meaningless.
    """
    rng = np.random.default_rng(seed)
    basis_rng = np.random.default_rng(12345)  # the same cluster subspaces for rows and queries
    bases = basis_rng.standard_normal((len(centres), d, intrinsic)).astype(np.float32) / np.float32(np.sqrt(d))
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.integers(0, len(centres), m)
        z = rng.standard_normal((m, intrinsic), dtype=np.float32) * np.float32(spread / np.sqrt(intrinsic))
        x = centres[which] + np.float32(iso / np.sqrt(d)) * rng.standard_normal((m, d), dtype=np.float32)
        order = np.argsort(which, kind="stable")
        bounds = np.flatnonzero(np.diff(which[order])) + 1
        for rows in np.split(order, bounds):
            x[rows] += z[rows] @ bases[which[rows[0]]].T
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def cluster_centres(clusters: int, d: int, groups: int, separation: float, seed: int = 0) -> np.ndarray:
    """Unit centres in two levels: ``groups`` random directions, each cluster near one of them
    (offset of norm ``separation``), so neighbouring clusters overlap as classes of photos do."""
    rng = np.random.default_rng(seed)
    tops = rng.standard_normal((groups, d)).astype(np.float32)
    tops /= np.linalg.norm(tops, axis=1, keepdims=True)
    centres = tops[rng.integers(0, groups, clusters)] + np.float32(separation / np.sqrt(d)) * rng.standard_normal(
        (clusters, d), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


@dataclass
class Row:
    kind: str
    factory: str
    build_s: float
    param: str
    rss_mb: float
    serialized_mb: float
    batch_qps: float
    latency_ms_p50: float
    latency_ms_p95: float
    recall_at_10: float
    tuned_recall: Optional[float]


def bench_kind(kind: str, x: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, target: float,
               single: int) -> Row:
    from embedstore.search import ann as search

    faiss = search.faiss_module()
    factory = search.choose_factory(kind, len(x), x.shape[1])
    ids = np.arange(len(x), dtype=np.int64)
    before = rss_bytes()
    t0 = time.perf_counter()
    index, tuning = search.build_tuned(x, ids, factory, target=target, k=k, sample=1000)
    build_s = time.perf_counter() - t0
    grown = rss_bytes() - before
    serialized = search.memory_estimate(factory, len(x), x.shape[1])
    try:
        serialized = len(faiss.serialize_index(index))
    except MemoryError:
        log.warning("not enough memory to serialise %s; showing the estimate", factory)
    search.search(index, queries[:10], k)  # warm-up
    t0 = time.perf_counter()
    _, found = search.search(index, queries, k)
    batch_qps = len(queries) / (time.perf_counter() - t0)
    lat = []
    for q in queries[:single]:
        t = time.perf_counter()
        search.search(index, q[None], k)
        lat.append((time.perf_counter() - t) * 1000)
    row = Row(kind, factory, build_s,
              f"{tuning.parameter}={tuning.value}" if tuning.parameter else "exact",
              grown / 2**20, serialized / 2**20, batch_qps, float(np.median(lat)), float(np.percentile(lat, 95)),
              recall(found, truth), tuning.recall if tuning.parameter else None)
    log.info("%s: %s", kind, row)
    del index
    return row


def bench_nearest_classes(n: int, d: int, centres: np.ndarray, spread: float, repeats: int = 3) -> dict[str, float]:
    """Read a 100k-row fp16 store, normalise, rank 6 classes (312 prompts): seconds, best of ``repeats``."""
    from embedstore.score.query import ClassVectors, nearest_classes
    from embedstore.score.scoring import Rule, class_matrix
    from embedstore.store.store import Store
    from embedstore.util.arrays import unit_rows

    classes = tuple(f"class{i}" for i in range(6))
    prompts = clustered(312, d, centres[:6], spread, seed=11)
    class_index = np.repeat(np.arange(6), 52)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        feats = clustered(n, d, centres, spread, seed=12)
        keys = sorted(f"{classes[i % 6]}/{i:06d}.jpg" for i in range(n))
        with store.writer({"kind": "images", "bench": True}, d, "float16") as w:
            w.add(keys, feats, [k.split("/")[0] for k in keys])
            w.set_info(labelled=True)
            w.compact(order=keys)  # natural key order, as `embedstore encode` leaves a store
        del feats
        for match in ("mean", "best"):
            if match == "mean":
                cv = ClassVectors(classes, "mean", class_matrix(Rule("embed-mean", class_index, 6), prompts),
                                  np.arange(6), 100.0)
            else:
                cv = ClassVectors(classes, "best", prompts, class_index, 100.0)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                rows = store.read()
                t1 = time.perf_counter()
                ranking = nearest_classes(cv, unit_rows(rows.features, copy=False), rows.keys, k=3)
                t2 = time.perf_counter()
                times.append((t2 - t0, t1 - t0, t2 - t1))
                assert ranking.top.shape == (n, 3)
            best = min(times)
            out[f"{match}_total_s"], out[f"{match}_read_s"], out[f"{match}_rank_s"] = best
    return out


def machine() -> dict[str, Any]:
    import faiss

    cpu = cpu_model()
    return {"cpu": cpu, "cores": usable_cores(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
            "numpy": np.__version__, "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--groups", type=int, default=50, help="top-level directions the clusters gather around")
    p.add_argument("--separation", type=float, default=0.3, help="distance of a cluster centre from its group's")
    p.add_argument("--spread", type=float, default=1.0,
                   help="within-cluster variation (norm, along 32 cluster-specific directions) per unit centre")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for batch QPS and recall")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--kinds", default="flat,hnsw,ivf", help="comma list of flat, ivf, hnsw, pq or factory strings")
    p.add_argument("--recall", type=float, default=0.95, help="tuning target (recall@10)")
    p.add_argument("--classes-n", type=int, default=100_000, help="rows of the nearest-class benchmark (0: skip)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")

    from embedstore.search import ann as search

    info = machine()
    print(f"machine: {info}")
    centres = cluster_centres(args.clusters, args.d, args.groups, args.separation)
    t0 = time.perf_counter()
    x = clustered(args.n, args.d, centres, args.spread, seed=1)
    queries = clustered(args.queries, args.d, centres, args.spread, seed=2)
    print(f"data: {args.n:,} x {args.d} float32 ({x.nbytes / 2**30:.2f} GiB) in {args.clusters} clusters around "
          f"{args.groups} directions, "
          f"{args.queries} held-out queries; made in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    _, truth = search.exact_knn(x, queries, 10)
    print(f"ground truth (exact, batched): {time.perf_counter() - t0:.1f} s")

    rows = [bench_kind(kind.strip(), x, queries, truth, 10, args.recall, args.single)
            for kind in args.kinds.split(",") if kind.strip()]
    del x
    classes = bench_nearest_classes(args.classes_n, args.d, centres, args.spread) if args.classes_n else {}

    headers = ["kind", "factory", "build s", "search param", "RSS +MB", "index MB", "batch QPS",
               "p50 ms", "p95 ms", "recall@10", "tuned recall"]
    table = [[r.kind, r.factory, f"{r.build_s:.1f}", r.param, f"{r.rss_mb:,.0f}",
              f"{r.serialized_mb:,.0f}", f"{r.batch_qps:,.0f}", f"{r.latency_ms_p50:.2f}", f"{r.latency_ms_p95:.2f}",
              f"{r.recall_at_10:.3f}", "-" if r.tuned_recall is None else f"{r.tuned_recall:.3f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(headers)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for c in table:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)))
    flat = next((r for r in rows if r.factory == "Flat"), None)
    approx = [r for r in rows if r.factory != "Flat"]
    print()
    for r in approx:
        ok = r.recall_at_10 >= 0.95 and r.batch_qps >= 1000
        speed = f", {r.batch_qps / flat.batch_qps:.1f}x exact batch QPS" if flat else ""
        print(f"goal recall@10 >= 0.95 with >= 1,000 QPS batched: {r.factory}: "
              f"{'met' if ok else 'NOT met'} ({r.recall_at_10:.3f}, {r.batch_qps:,.0f} QPS{speed})")
    if classes:
        for match in ("mean", "best"):
            total = classes[f"{match}_total_s"]
            print(f"goal nearest classes over {args.classes_n:,} images <= 0.5 s ({match}): "
                  f"{'met' if total <= 0.5 else 'NOT met'} ({total:.3f} s = read {classes[f'{match}_read_s']:.3f} "
                  f"+ normalise and rank {classes[f'{match}_rank_s']:.3f})")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "kinds": [asdict(r) for r in rows], "nearest_classes": classes}, indent=1))


if __name__ == "__main__":
    main()
