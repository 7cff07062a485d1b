#!/usr/bin/env python
"""Stage 2 at scale: time and peak memory of ``embedstore classify`` from the seed's 6 classes to
ImageNet-1k, from 100k to 10 million images, against the matrix products it cannot avoid.

Synthetic caches are written with :func:`embedstore.score.synthetic.write_synthetic_cache` (the real
store writer; fake encoders whose ``local-dir:`` specs point nowhere, so no model is loaded;
features carry signal). Every measured run is a child process: wall clock, and peak resident
memory from that child's own ``getrusage`` (``os.wait4``).

Workloads (one table, side by side):

  ImageNet-val shape   50,000 images, d=768, 1000 classes x CLIP's 80 templates (80,000 prompts):
                       ``embed-mean`` (predictions compared with CLIP_benchmark's formula computed
                       here in float64: normalised mean of normalised prompts per class, argmax of
                       image . classes) and ``prob-mean``; cold processes.
  the seed's recipe    2 encoders (d=1280, 1024), the 312 ``ajou-2024`` prompts, ``prob-mean`` +
                       ``drop_below = 0.002``, at each ``--sizes`` (at 10M one encoder unless
                       ``--ten-million-models 2``): the very first cold run (empty logit cache),
                       a second cold run, and in one process a weights-only, a drop-only and a
                       +1-template rerun. Disk taken by the logit cache after the runs.
  lower bound          the numpy matrix products of the same shapes (``(n, d) @ (d, P)`` in row
                       blocks of random float32, nothing read), in a child process.

    python scripts/bench_scale.py                                   # everything (about an hour, ~70 GB disk)
    python scripts/bench_scale.py --sizes 100000,1000000 --json /tmp/scale.json
    python scripts/bench_scale.py --sizes 100000 --skip-imagenet   # minutes

Prints the machine, ONE table and a met / not met line per goal. Another process using the CPUs
makes every number worse: the share of the CPUs others used is printed and flagged above 10%.
This script is never imported by the package.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from benchlib import (
    machine_busy_seconds,
    machine_info,
    markdown_table,
    other_load,
    own_cpu_seconds,
)

SEED_CLASSES = ("Buildings", "Forests", "Glacier", "Mountains", "Sea", "Street")
NEW_TEMPLATE = "a drone photo of the {}."
GiB = 1 << 30


@dataclass
class Run:
    """One child process: wall seconds, peak resident bytes, and its classify timings."""

    wall: float
    peak: int
    timings: dict[str, float] = field(default_factory=dict)


# Started from a small launcher process: on Linux a child's peak RSS starts from the memory of the
# process that forked it (exec keeps the old image's high-water mark), so this script, which
# holds large arrays at times, must not fork the measured commands itself.
LAUNCHER = r"""
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:], stdout=sys.stdout, stderr=sys.stderr)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - started
with open(sys.argv[1], "w") as fh:
    json.dump({"wall": wall, "peak": usage.ru_maxrss * 1024, "code": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_child(cmd: Sequence[str], log: Path) -> Run:
    """Run ``cmd`` from a small launcher; return its wall time and its own peak RSS (``os.wait4``)."""
    result = log.with_suffix(".json")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", LAUNCHER, str(result), *cmd], stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    data = json.loads(result.read_text())
    if data["code"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({data['code']}); see {log}:\n{log.read_text()[-3000:]}")
    return Run(data["wall"], data["peak"])


def last_timings(cache: Path) -> dict[str, float]:
    lines = (cache / "runs.jsonl").read_text().splitlines()
    return json.loads(lines[-1]).get("timings", {})


def classify(cache: Path, exp: Path, out: Path, log: Path, *extra: str) -> Run:
    run = run_child([sys.executable, "-m", "embedstore", "classify", str(exp), "--cache", str(cache), "--out",
                     str(out), "--no-encode", *extra], log)
    run.timings = last_timings(cache)
    return run


def write_experiment(path: Path, classes: Sequence[str], templates: str, aggregate: str, models: Sequence[str],
                     drop: Optional[float] = None) -> Path:
    lines = ['dataset = "bench"', f"classes = {json.dumps(list(classes))}", f"templates = {json.dumps(templates)}",
             f'aggregate = "{aggregate}"', "scale = 100.0"] + ([f"drop_below = {drop}"] if drop is not None else [])
    for model in models:
        lines += ["[[models]]", f'model = "{model}"', f"weight = {1 / len(models)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def build(root: Path, n: int, classes: Sequence[str], encoders: Sequence[tuple[str, int]], templates: str,
          noise: float, reuse: bool = False) -> float:
    """Write a synthetic cache in a child process (so its memory is not this process's); seconds.
    With ``reuse``, a cache this function wrote before with the same parameters is kept (its
    derived data removed), and 0 is returned."""
    stamp = {"n": n, "classes": list(classes), "encoders": [list(e) for e in encoders], "templates": templates,
             "noise": noise}
    if reuse and (root / "bench.json").is_file() and json.loads((root / "bench.json").read_text()) == stamp:
        shutil.rmtree(root / "logits", ignore_errors=True)
        (root / "runs.jsonl").unlink(missing_ok=True)
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    code = ("import sys, json\nfrom embedstore import Cache\nfrom embedstore.score.prompts import load_prompt_set\n"
            "from embedstore.score.synthetic import FakeEncoder, write_synthetic_cache\n"
            "a = json.loads(sys.argv[1])\n"
            "write_synthetic_cache(Cache(a['root']), 'bench', [FakeEncoder(e, d) for e, d in a['enc']], a['classes'],"
            " a['per_class'], prompt_set=load_prompt_set(a['templates']), noise=a['noise'])\n")
    arg = json.dumps({"root": str(root), "enc": list(encoders), "classes": list(classes),
                      "per_class": n // len(classes), "templates": templates, "noise": noise})
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, arg], check=True)
    (root / "bench.json").write_text(json.dumps(stamp))
    return time.perf_counter() - started


def matmul_bound(n: int, shapes: Sequence[tuple[int, int]], log: Path) -> float:
    """Seconds of the numpy products ``(n, d) @ (d, P)`` for each ``(d, P)``, in row blocks, in a child."""
    code = ("import sys, json, time\nimport numpy as np\nn, shapes = json.loads(sys.argv[1])\n"
            "rng = np.random.default_rng(0)\ntotal = 0.0\n"
            "for d, p in shapes:\n"
            "    step = max(16, (64 << 20) // (4 * (p * 5 + d)))\n"
            "    x = rng.standard_normal((step, d), dtype=np.float32)\n"
            "    t = rng.standard_normal((d, p), dtype=np.float32)\n"
            "    out = np.empty((step, p), dtype=np.float32)\n"
            "    x @ t\n"
            "    for start in range(0, n, step):\n"
            "        rows = min(step, n - start)\n"
            "        t0 = time.perf_counter()\n"
            "        np.matmul(x[:rows], t, out=out[:rows])\n"
            "        total += time.perf_counter() - t0\n"
            "print(json.dumps(total))\n")
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps([n, list(shapes)])], stdout=subprocess.PIPE,
                              stderr=out, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def reruns(cache: Path, exp: Path, work: Path, log: Path) -> dict[str, float]:
    """In one process: the experiment (warm), then weights-only, drop-only and +1-template reruns."""
    code = r'''
import json, statistics, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np
from embedstore import Cache
from embedstore.score.session import Session
from embedstore.store.fingerprint import image_fingerprint
from embedstore.score.experiment import load_experiment
from embedstore.score.prompts import expand, load_prompt_set
cache_root, exp_path, work, new_template = sys.argv[1:5]
cache = Cache(cache_root)
session = Session(cache)
exp = load_experiment(exp_path)
out = {}
t = time.perf_counter(); base = session.run(exp); out["first_in_process"] = time.perf_counter() - t
def median(fn, k=5):
    times = []
    for _ in range(k):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)
weights = load_experiment(exp_path, [f"models.{i}.weight={w}" for i, w in enumerate([0.7, 0.3][:len(exp.models)])])
out["weights_only"] = median(lambda: session.run(weights))
drop = load_experiment(exp_path, ["drop_below=0.01"])
out["drop_only"] = median(lambda: session.run(drop))
# one more template: its prompts get fake features in each text bank, then one rerun in the warm session
ps = load_prompt_set(exp.templates)
path = Path(work) / "plus-one.json"
path.write_text(json.dumps({"templates": list(ps.templates) + [new_template],
                            "class_prompts": {k: list(v) for k, v in ps.class_prompts.items()}}))
plus = replace(exp, templates=str(path))
new_texts = [new_template.replace("{}", c) for c in exp.classes]
for m in exp.models:
    card = cache.require_card(m.spec)
    bank = cache.text_bank(m.spec, card.weights_digest)
    rng = np.random.default_rng(7)
    feats = rng.standard_normal((len(new_texts), card.dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    with bank.writer(bank.manifest()["fingerprint"], card.dim, "float32", {"bench": True}) as w:
        w.add(new_texts, feats)
t = time.perf_counter(); session.run(plus); out["plus_one_template"] = time.perf_counter() - t
print(json.dumps(out))
'''
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-c", code, str(cache), str(exp), str(work), NEW_TEMPLATE],
                              stdout=subprocess.PIPE, stderr=err, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def clip_benchmark_agreement(cache: Path, predictions_csv: Path) -> tuple[int, int]:
    """(rows compared, rows that differ) between our embed-mean predictions and CLIP_benchmark's
    formula in float64, leaving out rows whose best two classes are within 1e-5 (float32 noise)."""
    import csv

    from embedstore.score.prompts import expand, load_prompt_set
    from embedstore.store.reader import StoreReader
    from embedstore.store.store import Store

    store_path = next((cache / "datasets" / "bench").glob("*/*/manifest.json")).parent
    with StoreReader(Store(store_path)) as r:
        x = np.asarray(r.features(r.rows(0, len(r.keys))), dtype=np.float64)
        keys, classes = r.keys, sorted(set(r.labels or []))
    bank = next((cache / "encoders").glob("*/texts-*/manifest.json")).parent
    expansion = expand(load_prompt_set("openai-imagenet"), classes)
    with StoreReader(Store(bank)) as r:
        pos = {k: i for i, k in enumerate(r.keys)}
        t = np.asarray(r.features(r.storage_rows(np.asarray([pos[s] for s in expansion.texts]))), dtype=np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    w = np.stack([t[expansion.class_index == c].mean(0) for c in range(len(classes))])
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    logits = x @ w.T
    theirs = logits.argmax(axis=1)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-5
    with open(predictions_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == keys
    ours = np.asarray([int(r["label_index"]) for r in rows])
    return int(clear.sum()), int((ours[clear] != theirs[clear]).sum())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def fmt_gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,10000000", help="Image counts of the seed's recipe.")
    p.add_argument("--imagenet-n", type=int, default=50_000, help="Images of the ImageNet-val-shaped cache.")
    p.add_argument("--skip-imagenet", action="store_true")
    p.add_argument("--ten-million-models", type=int, choices=(1, 2), default=None,
                   help="Encoders at 10M rows (default: 2 when the disk has room for both, else 1).")
    p.add_argument("--work", type=Path, default=None, help="Folder for the caches (default: a temp folder).")
    p.add_argument("--keep", action="store_true", help="Keep the caches.")
    p.add_argument("--reuse", action="store_true",
                   help="Reuse caches kept in --work by an earlier run with the same shapes (their logit caches are "
                        "emptied first).")
    p.add_argument("--json", type=Path, default=None, help="Save the numbers here.")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    busy0, own0, t_start = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    rows: list[list[str]] = []
    goals: list[tuple[str, bool, str]] = []
    data: dict[str, Any] = {"machine": machine}

    def row(workload: str, measure: str, run: Optional[Run], bound: Optional[float], note: str = "") -> None:
        ratio = f"{run.wall / bound:.2f}x" if run is not None and bound else ""
        rows.append([workload, measure, f"{run.wall:.2f} s" if run else "", fmt_gb(run.peak) if run else "",
                     f"{bound:.2f} s" if bound else "", ratio, note])

    if not args.skip_imagenet:
        root = work / "imagenet"
        classes = [f"c{i:04d}" for i in range(1000)]
        built = build(root, args.imagenet_n, classes, [("in768", 768)], "openai-imagenet", noise=6.0, reuse=args.reuse)
        model = ["local-dir:/synthetic/in768"]
        embed = write_experiment(work / "in-embed.toml", classes, "openai-imagenet", "embed-mean", model)
        prob = write_experiment(work / "in-prob.toml", classes, "openai-imagenet", "prob-mean", model)
        bound_embed = matmul_bound(args.imagenet_n, [(768, 1000)], work / "bound.log")
        bound_prob = matmul_bound(args.imagenet_n, [(768, 80_000)], work / "bound.log")
        r_embed = classify(root, embed, work / "in-embed.csv", work / "in-embed.log")
        compared, differ = clip_benchmark_agreement(root, work / "in-embed.csv")
        r_prob = classify(root, prob, work / "in-prob.csv", work / "in-prob.log")
        n = args.imagenet_n
        row(f"ImageNet-val shape {n:,} x 1000 classes x 80,000 prompts", "embed-mean, cold process", r_embed,
            bound_embed, f"CLIP_benchmark formula: {differ} of {compared:,} predictions differ (near-ties left out)")
        row("", "prob-mean, cold process", r_prob, bound_prob, "logit cache over its budget: not written")
        goals += [("ImageNet embed-mean cold <= 2 s", r_embed.wall <= 2.0, f"{r_embed.wall:.2f} s"),
                  ("ImageNet embed-mean peak <= 1.5 GB", r_embed.peak <= 1.5e9, fmt_gb(r_embed.peak)),
                  ("ImageNet embed-mean = CLIP_benchmark's predictions", differ == 0, f"{differ} differ"),
                  ("ImageNet prob-mean peak <= 4 GB", r_prob.peak <= 4e9, fmt_gb(r_prob.peak)),
                  ("ImageNet prob-mean <= 1.5x the products", r_prob.wall <= 1.5 * bound_prob,
                   f"{r_prob.wall / bound_prob:.2f}x")]
        data["imagenet"] = {"n": n, "build_s": built, "embed": r_embed.__dict__, "prob": r_prob.__dict__,
                            "bound_embed_s": bound_embed, "bound_prob_s": bound_prob,
                            "clip_benchmark": {"compared": compared, "differ": differ}}
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        encoders = [("seed1280", 1280), ("seed1024", 1024)]
        if n >= 10_000_000:
            need = n * (1280 + 1024) * 2 * 1.1
            two = args.ten_million_models == 2 or (args.ten_million_models is None
                                                   and shutil.disk_usage(work).free > need + 10 * GiB)
            encoders = encoders if two else encoders[:1]
        root = work / f"seed-{n}"
        built = build(root, n, SEED_CLASSES, encoders, "ajou-2024", noise=4.0, reuse=args.reuse)
        models = [f"local-dir:/synthetic/{name}" for name, _ in encoders]
        exp = write_experiment(work / f"seed-{n}.toml", SEED_CLASSES, "ajou-2024", "prob-mean", models, 0.002)
        bound = matmul_bound(n, [(d, 312) for _, d in encoders], work / "bound.log")
        first = classify(root, exp, work / f"seed-{n}.csv", work / f"seed-{n}-1.log")
        second = classify(root, exp, work / f"seed-{n}.csv", work / f"seed-{n}-2.log")
        derived = dir_bytes(root / "logits")
        label = f"seed recipe {n:,} images x {len(encoders)} model(s) x 312 prompts"
        row(label, "very first cold run (empty logit cache)", first, bound,
            f"store {fmt_gb(dir_bytes(root / 'datasets'))}; logit cache written: {fmt_gb(derived)}")
        row("", "second cold run", second, bound, "from the logit cache" if derived else "recomputed (over budget)")
        result: dict[str, Any] = {"n": n, "encoders": encoders, "build_s": built, "bound_s": bound,
                                  "first": first.__dict__, "second": second.__dict__, "logit_cache_bytes": derived}
        if n <= 1_000_000:
            rr = reruns(root, exp, work, work / f"seed-{n}-reruns.log")
            result["reruns"] = rr
            rows.append(["", "in one process: weights-only rerun", f"{rr['weights_only']:.3f} s", "", "", "",
                         f"drop-only {rr['drop_only']:.3f} s; +1 template {rr['plus_one_template']:.3f} s"])
            if n == 100_000:
                goals += [("100k very first cold run <= 2 s", first.wall <= 2.0, f"{first.wall:.2f} s"),
                          ("100k weights-only rerun <= 0.2 s", rr["weights_only"] <= 0.2, f"{rr['weights_only']:.3f} s"),
                          ("100k +1 template <= 0.3 s", rr["plus_one_template"] <= 0.3,
                           f"{rr['plus_one_template']:.3f} s")]
        goals += [(f"seed {n:,}: peak <= 4 GB", max(first.peak, second.peak) <= 4e9,
                   fmt_gb(max(first.peak, second.peak))),
                  (f"seed {n:,}: very first run <= 1.5x the products", first.wall <= 1.5 * bound,
                   f"{first.wall / bound:.2f}x")]
        data[f"seed_{n}"] = result
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    wall = time.perf_counter() - t_start
    others = other_load(busy0, own0, wall)
    print(f"machine: {machine['cpu']}, {machine['cpus_usable']} usable cores, numpy {machine['numpy']} "
          f"({machine['blas']}), h5py {machine['h5py']}; other processes used "
          + (f"{others:.0%} of the CPUs" if others is not None else "an unknown share of the CPUs")
          + (" (CONTENDED: numbers are pessimistic)" if others is not None and others > 0.10 else ""))
    print(markdown_table(["workload", "measurement", "wall", "peak RSS", "matrix products", "ratio", "notes"], rows))
    for name, met, detail in goals:
        print(f"{'met    ' if met else 'NOT MET'}  {name}: {detail}")
    data["goals"] = [{"goal": g, "met": m, "value": d} for g, m, d in goals]
    data["other_load"] = others
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
