#!/usr/bin/env python
"""Benchmark ``embedstore tune``: Optuna trials over two-model weights, scale and drop_below.

Builds (or reuses, ``--cache``) a synthetic labelled cache of ``--n`` images (6 classes) seen by two
fake encoders of widths 1280 and 1024 with the 312 prompts of ``ajou-2024`` (see
``embedstore.score.synthetic``; no model is involved), then runs ``embedstore.tune.study.run_study`` for
``--trials`` trials (weights, log-uniform scale 10..200, drop_below 0..0.02) on the default
validation split (20%, stratified), as ``embedstore tune exp.toml --trials 200`` does.

Printed side by side: set-up (reading the stores, prompt logits of the validation rows), the
trials, the per-trial cost, and what one trial costs the seed's way: re-encoding every image with
both models at the given throughputs (``--seed-img-per-s-a``: ViT-bigG-14 end to end with the
seed's loop on one H100, measured in the project's GPU issue; ``--seed-img-per-s-b``: EVA-CLIP-18B,
an assumption, not a measurement).

    python scripts/bench_tune.py                          # 100,000 images, 200 trials
    python scripts/bench_tune.py --n 20000 --trials 50 --json /tmp/tune.json

This script is never imported by the package.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import cpu_model, usable_cores


def machine() -> dict[str, object]:
    cpu = cpu_model()
    import optuna

    return {"cpu": cpu, "cores": usable_cores(), "numpy": np.__version__, "optuna": optuna.__version__,
            "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--cache", type=Path, default=None, help="keep the synthetic cache here (default: a temp dir)")
    p.add_argument("--seed-img-per-s-a", type=float, default=306.0)
    p.add_argument("--seed-img-per-s-b", type=float, default=100.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from embedstore import Cache
    from embedstore.score.experiment import experiment_from_mapping
    from embedstore.score.prompts import load_prompt_set
    from embedstore.score.synthetic import FakeEncoder, write_synthetic_cache
    from embedstore.tune.study import SearchSpace, run_study

    info = machine()
    print(f"machine: {info}")
    classes = ["Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street"]
    encoders = [FakeEncoder("bench-a", 1280, 1.0), FakeEncoder("bench-b", 1024, 0.8)]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.cache or Path(tmp)
        cache = Cache(root / "cache")
        t0 = time.perf_counter()
        if not (root / "cache" / "datasets" / "bench").is_dir():
            write_synthetic_cache(cache, "bench", encoders, classes, per_class=args.n // len(classes), noise=40.0,
                                  prompt_set=load_prompt_set("ajou-2024"))
        print(f"synthetic cache: {args.n:,} images x 2 encoders, 312 prompts; {time.perf_counter() - t0:.1f} s")
        exp = experiment_from_mapping({
            "dataset": "bench", "classes": classes, "templates": "ajou-2024", "aggregate": "prob-mean",
            "scale": 100.0, "drop_below": 0.002,
            "models": [{"model": str(e.spec), "weight": 0.5} for e in encoders]})
        t0 = time.perf_counter()
        report = run_study(cache, exp, args.trials, SearchSpace(), seed=0, study=f"bench-{time.time_ns()}")
        total = time.perf_counter() - t0
    setup = report.setup_seconds
    trials_s = total - setup
    per_trial = trials_s / args.trials
    seed_trial = args.n / args.seed_img_per_s_a + args.n / args.seed_img_per_s_b
    rows = [
        ("set-up: read 2 stores, prompt logits of the validation rows", f"{setup:.2f} s"),
        (f"{args.trials} trials (Optuna TPE + scoring {report.n_val:,} validation images)", f"{trials_s:.2f} s"),
        ("total (run_study, set-up included)", f"{total:.2f} s"),
        ("per trial", f"{per_trial * 1000:.1f} ms"),
        ("one trial the seed's way: re-encode both models (estimate)", f"{seed_trial:,.0f} s"),
        ("ratio: seed trial / embedstore trial", f"{seed_trial / per_trial:,.0f}x"),
        ("best validation accuracy (baseline as written)", f"{report.best_value:.4f} ({report.baseline:.4f})"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'measurement'.ljust(width)} | value")
    print(f"{'-' * width}-|------")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    print(f"\nseed throughputs: {args.seed_img_per_s_a:g} img/s (ViT-bigG-14, measured on an H100 per the GPU issue) "
          f"and {args.seed_img_per_s_b:g} img/s (EVA-CLIP-18B, assumed)")
    print(f"goal <= 30 s total for {args.trials} trials on {args.n:,} images: {'met' if total <= 30 else 'NOT met'} "
          f"({total:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "setup_s": setup, "trials_s": trials_s, "total_s": total,
                                         "per_trial_s": per_trial, "seed_trial_s": seed_trial,
                                         "best": report.best_value, "baseline": report.baseline}, indent=1))


if __name__ == "__main__":
    main()
