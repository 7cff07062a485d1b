#!/usr/bin/env python
"""``embedstore serve``: request latency of the playground's edits, at 10k and 100k images.

A synthetic cache (:func:`embedstore.store.synthetic.write_synthetic_cache`: the real store writer,
two fake encoders of width 768, the seed's 312 ``ajou-2024`` prompts, and three extra templates
already in the text banks, since a fake encoder has no text tower) is served by the playground's
app; requests go through FastAPI's test client in this process (JSON in and out, validation, the
session, the summary: everything but the socket). Per size, one table row each:

  first run          the experiment as written, empty logit cache (the page's first load)
  second run         the same again (logit cache on disk; the session starts keeping parts)
  weight change      median of 5 requests that change only the ensemble weights
  drop change        median of 5 requests that change only ``drop_below``
  new template       median of 3 requests that each add a template never scored before (its 6
                     prompts' columns computed and appended to the logit cache; text encoding
                     excluded: the prompts are in the bank already)
  confusion cell     the images of the largest off-diagonal cell
  text search        nearest 24 images of a text (exact search: no saved index; the first search
                     builds the exact index, listed apart)
  prompt table       the per-template table (99 evaluations of 49 templates), job start to done

    python scripts/bench_serve.py                       # 10k and 100k (a few minutes, ~1 GB disk)
    python scripts/bench_serve.py --sizes 10000 --json /tmp/serve.json

Prints the machine and ONE table (with the share of the CPUs other processes used meanwhile:
above 0.1, every figure is worse than on a quiet machine). Never imported by the package.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchlib import (
    machine_busy_seconds,
    machine_info,
    markdown_table,
    other_load,
    own_cpu_seconds,
)

CLASSES = ("Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street")
EXTRA = ("a drone photo of the {}.", "a postcard of the {}.", "a grainy photo of a {}.")
ENCODERS = (("bench-a", 768), ("bench-b", 768))


def build(root: Path, n: int) -> Path:
    """Write the synthetic cache and the experiment file; return the experiment file."""
    from embedstore.store.synthetic import FakeEncoder, write_synthetic_cache

    from embedstore import Cache
    from embedstore.score.prompts import load_prompt_set

    seed = load_prompt_set("ajou-2024")
    extended = seed.subset(seed.templates + EXTRA)
    write_synthetic_cache(Cache(root / "cache"), "bench", [FakeEncoder(name, dim) for name, dim in ENCODERS], CLASSES,
                          n // len(CLASSES), prompt_set=extended, noise=3.0)
    exp = root / "exp.toml"
    lines = ['dataset = "bench"', f"classes = {json.dumps(list(CLASSES))}", 'templates = "ajou-2024"',
             'aggregate = "prob-mean"', "scale = 100.0", "drop_below = 0.002"]
    for name, _ in ENCODERS:
        lines += ["[[models]]", f'model = "local-dir:/synthetic/{name}"', "weight = 0.5"]
    exp.write_text("\n".join(lines) + "\n")
    return exp


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def measure(n: int, tmp: Path) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from embedstore import Cache
    from embedstore.serve.app import create_app
    from embedstore.serve.playground import Playground

    busy0, own0, started = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    root = tmp / f"n{n}"
    build_s, exp = timed(lambda: build(root, n))
    playground = Playground(Cache(root / "cache"), exp)
    out: dict[str, float] = {"images": n, "build cache s": build_s}
    with TestClient(create_app(playground)) as client:
        base = client.get("/api/experiment").json()["variant"]

        def run(variant: dict[str, Any]) -> dict[str, Any]:
            r = client.post("/api/run", json=variant)
            assert r.status_code == 200, r.text
            return r.json()

        out["first run"], first = timed(lambda: run(base))
        out["second run"], _ = timed(lambda: run(base))
        weights = [timed(lambda w=w: run({**base, "weights": [w, 1 - w]}))[0] for w in (0.3, 0.4, 0.6, 0.7, 0.8)]
        out["weight change"] = statistics.median(weights)
        drops = [timed(lambda d=d: run({**base, "drop_below": d}))[0] for d in (0.001, 0.003, 0.004, 0.005, 0.01)]
        out["drop change"] = statistics.median(drops)
        news = []
        last = first
        for template in EXTRA:
            variant = {**base, "prompts": base["prompts"] + [{"text": template, "class": None, "on": True}]}
            seconds, last = timed(lambda v=variant: run(v))
            assert last["prompts"] == 318 and last["new_prompts"] == 0, last
            news.append(seconds)
        out["new template"] = statistics.median(news)
        def ask(path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            return r.json()

        confusion = last["metrics"]["confusion"]
        cell = max(((confusion[i][j], i, j) for i in range(6) for j in range(6) if i != j))
        out["confusion cell"], _ = timed(lambda: ask("/api/cell", {
            "result": last["id"], "true": cell[1], "predicted": cell[2]}))
        from embedstore.score.prompts import load_prompt_set

        text = load_prompt_set("ajou-2024").templates[0].replace("{}", "Glacier")  # in the banks: no encoder needed
        out["text search (first: builds exact index)"], _ = timed(lambda: ask("/api/search", {"text": text}))
        out["text search"], _ = timed(lambda: ask("/api/search", {"text": text}))

        def table() -> dict[str, Any]:
            job = client.post("/api/prompt-table", json=base).json()
            while job["status"] == "running":
                time.sleep(0.02)
                job = client.get(f"/api/jobs/{job['id']}").json()
            assert job["status"] == "done", job
            return job
        out["prompt table"], _ = timed(table)
    playground.close()
    load = other_load(busy0, own0, time.perf_counter() - started)
    out["CPU share used by other processes"] = load if load is not None else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated image counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic caches go (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    info = machine_info()
    print(json.dumps(info))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in sizes:
            rows.append(measure(n, Path(tmp)))
            print(f"measured {n:,} images", file=sys.stderr)
    keys = [k for k in rows[0] if k != "images"]
    print(markdown_table(["request (seconds)", *[f"{r['images']:,} images" for r in rows]],
                         [[k, *[f"{r[k]:.3f}" for r in rows]] for k in keys]))
    goal = all(r["weight change"] < 1 and r["drop change"] < 1 for r in rows)
    print(f"goal: weight and drop changes well under a second at every size: {'met' if goal else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
