"""The playground's state: one experiment's cache session, recent results, background jobs.

A :class:`Playground` scores :class:`~embedstore.serve.variant.Variant` s of one experiment with
the :class:`~embedstore.score.session.Session` that ``embedstore classify`` uses (so a weights-only
or ``drop_below``-only change reuses the members' parts kept in memory), answers the page's
questions about a result (the images of a confusion cell, an image's neighbours and nearest
classes, text and image search) with :mod:`embedstore.score.query` and
:mod:`embedstore.search.index`, and computes the prompt table with
:func:`embedstore.tune.study.template_effects`. It has no scoring of its own.

Thread safety: the session, and everything that may encode prompts (and so write a text bank),
runs under one lock; results, jobs and variants are kept under their own small locks, so
thumbnails and result lookups never wait for a run. The page holds its variant itself (one per
browser tab) and sends it with every request.

Stage-1 work arrives as callables from the CLI: ``encode_prompts`` (prompts missing from a text
bank), ``encode_images`` (uploaded images, with the store's encoder and view) and
``thumbnail`` (a resized JPEG of an image file).
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from embedstore.errors import EmbedstoreError, SpecError, StoreNotFoundError
from embedstore.score.experiment import (
    Experiment,
    experiment_from_mapping,
    load_experiment,
    prompt_set_of,
)
from embedstore.score.metrics import label_ids
from embedstore.score.session import ClassifyResult, Session
from embedstore.serve.variant import (
    Variant,
    base_variant,
    check_name,
    prompt_file,
    prompt_set_of_variant,
    prompt_set_toml,
    same_prompts,
    variant_config,
)
from embedstore.store.cache import Cache
from embedstore.store.spec import EncoderSpec
from embedstore.store.textbank import PromptEncoder
from embedstore.util.budget import Budget

log = logging.getLogger(__name__)

ImageEncoder = Callable[[EncoderSpec, Any, Sequence[str]], np.ndarray]   # (spec, store, image paths) -> unit rows
ThumbnailLoader = Callable[[Path, int], bytes]                            # (image file, max side) -> JPEG bytes

KEEP_RESULTS = 8        # results kept for the page's follow-up questions (cells, neighbours)
MAX_CELL_IMAGES = 200   # thumbnails listed per request
MAX_K = 100


class Activity:
    """What the server is doing right now (shown on the page while a request waits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._what: Optional[str] = None
        self._since = 0.0

    @contextlib.contextmanager
    def doing(self, what: str) -> Any:
        with self._lock:
            self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            if self._what is None:
                return {"busy": False}
            return {"busy": True, "what": self._what, "seconds": round(time.monotonic() - self._since, 1)}


@dataclass
class Job:
    """A background computation the page polls."""

    id: str
    kind: str
    done: int = 0
    total: int = 0
    status: str = "running"      # running | done | failed
    result: Any = None
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "done": self.done, "total": self.total, "status": self.status,
                "result": self.result, "error": self.error}


@dataclass
class Scored:
    """One scored variant: the run's result and the true class of each row (None when unlabelled)."""

    id: str
    variant: Variant
    experiment: Experiment
    result: ClassifyResult
    truth: Optional[np.ndarray]
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


class Playground:
    """State of ``embedstore serve`` for one experiment (see the module docstring).

    ``experiment_file``: the experiment the page starts from; ``save_dir``: where "save as
    experiment" writes (default: the experiment file's folder).
    """

    def __init__(self, cache: Cache, experiment_file: Path, encode_prompts: Optional[PromptEncoder] = None,
                 encode_images: Optional[ImageEncoder] = None, thumbnail: Optional[ThumbnailLoader] = None,
                 budget: Optional[Budget] = None, save_dir: Optional[Path] = None):
        self.cache = cache
        self.experiment_file = Path(experiment_file)
        self.experiment = load_experiment(self.experiment_file)
        self.base_dir = self.experiment_file.resolve().parent
        self.save_dir = Path(save_dir) if save_dir is not None else self.base_dir
        self.activity = Activity()
        self._encode_prompts = encode_prompts
        self.encode_images = encode_images
        self.thumbnail = thumbnail
        self.session = Session(cache, self._reporting(encode_prompts) if encode_prompts else None, budget)
        self._work = tempfile.TemporaryDirectory(prefix="embedstore-serve-")
        self._run_lock = threading.Lock()
        self._results: OrderedDict[str, Scored] = OrderedDict()
        self._results_lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="embedstore-serve-job")
        self.variants: list[dict[str, Any]] = []
        self._variants_lock = threading.Lock()
        self._index: Any = None
        self._index_lock = threading.Lock()
        self.base = base_variant(self.experiment)
        first = self._first_zero_shot()
        self.search_member = first
        self.store = cache.open_image_store(self.experiment.dataset, first.spec, first.view)
        rows = self.store.read_keys_labels()
        self._keys = {k: i for i, k in enumerate(rows.keys)}
        self.labels = rows.labels
        self.source = (self.store.manifest().get("source") or {}).get("location")

    def close(self) -> None:
        """Stop background jobs and remove the working folder."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._work.cleanup()

    def _first_zero_shot(self) -> Any:
        for entry in self.experiment.models:
            if entry.kind == "zero-shot":
                return entry
        return self.experiment.models[0]

    def _reporting(self, encode: PromptEncoder) -> PromptEncoder:
        """``encode`` that says on :attr:`activity` how many prompts it is encoding."""
        def encode_missing(texts: Sequence[str], spec: EncoderSpec, digest: str) -> int:
            with self.activity.doing(f"encoding {len(texts)} new prompt(s) with {spec} (text tower)"):
                return encode(texts, spec, digest)
        return encode_missing

    # -- describing
    def describe(self) -> dict[str, Any]:
        """What the page shows before the first run: the experiment, its members and its variant."""
        exp = self.experiment
        return {
            "experiment_file": str(self.experiment_file),
            "dataset": exp.dataset,
            "rows": len(self._keys),
            "labelled": self.labels is not None,
            "classes": list(exp.classes) if exp.classes else sorted(set(self.labels or [])),
            "members": [{"label": m.label, "short": short_label(m), "kind": m.kind, "weight": m.weight}
                        for m in exp.models],
            "variant": variant_json(self.base),
            "thumbnails": self.thumbnail is not None and self._image_base() is not None,
            "image_search": self.encode_images is not None,
            "save_dir": str(self.save_dir),
        }

    # -- scoring
    def experiment_of(self, variant: Variant) -> Experiment:
        """The experiment ``variant`` describes (validated like a file; prompts in a working file)."""
        prompt_set = prompt_set_of_variant(variant)
        classes = self.describe_classes()
        config = variant_config(self.experiment, variant, classes, str(prompt_file(Path(self._work.name), prompt_set)))
        return experiment_from_mapping(config, base=self.base_dir, source=f"{self.experiment_file} (playground)")

    def describe_classes(self) -> list[str]:
        exp = self.experiment
        if exp.classes:
            return list(exp.classes)
        if self.labels is None:
            raise SpecError(f"{self.experiment_file}: no classes given and dataset {exp.dataset!r} has no labels")
        return sorted(set(self.labels))

    def run(self, variant: Variant) -> Scored:
        """Score ``variant`` (one run at a time; prompts missing from a text bank are encoded)."""
        exp = self.experiment_of(variant)
        started = time.perf_counter()
        with self._run_lock:
            result = self.session.run(exp, keep_scores=False)
        truth = None
        if result.metrics is not None and result.true_labels is not None:
            truth = label_ids(result.true_labels, result.classes, f"dataset {exp.dataset!r}")
        scored = Scored(uuid.uuid4().hex[:12], variant, exp, result, truth, time.perf_counter() - started)
        scored.summary = summary(scored)
        with self._results_lock:
            self._results[scored.id] = scored
            while len(self._results) > KEEP_RESULTS:
                self._results.popitem(last=False)
        return scored

    def result(self, result_id: str) -> Scored:
        with self._results_lock:
            scored = self._results.get(result_id)
        if scored is None:
            raise StoreNotFoundError(f"result {result_id!r} is no longer kept (only the last {KEEP_RESULTS}); "
                                     "change anything to run again")
        return scored

    # -- where it goes wrong
    def cell(self, result_id: str, true: int, predicted: int, offset: int = 0, limit: int = 60) -> dict[str, Any]:
        """Images of a confusion-matrix cell with their top-3 classes and probabilities."""
        scored = self.result(result_id)
        if scored.truth is None:
            raise SpecError("this result has no labels, so no confusion matrix")
        c = len(scored.result.classes)
        if not (0 <= true < c and 0 <= predicted < c):
            raise SpecError(f"cell ({true}, {predicted}): class indices must lie in 0..{c - 1}")
        rows = np.flatnonzero((scored.truth == true) & (scored.result.predictions == predicted))
        limit = max(1, min(int(limit), MAX_CELL_IMAGES))
        page = rows[offset:offset + limit]
        return {"true": scored.result.classes[true], "predicted": scored.result.classes[predicted],
                "count": int(rows.size), "offset": offset, "images": [image_json(scored, int(r)) for r in page]}

    def neighbours(self, key: str, k: int = 12, result_id: Optional[str] = None,
                   variant: Optional[Variant] = None) -> dict[str, Any]:
        """A stored image's nearest images (itself left out) and nearest classes under the
        variant's prompts (the first zero-shot member, prompt-averaged: ``query --classes``)."""
        from embedstore.score import query as q

        self.row_of(key)
        k = _k(k)
        vectors = q.key_vectors(self.store, [key])
        found = q.nearest_images(self.index(), vectors, k, exclude=[key])[0]
        out: dict[str, Any] = {"key": key, "member": short_label(self.search_member), "images": [hit_json(h) for h in found]}
        chosen = variant or self.base
        scale = self._scale(chosen)
        with self._run_lock:
            cv = q.class_vectors(self.cache, self.search_member.spec, self.store, self.describe_classes(),
                                 prompt_set_of_variant(chosen), "mean", scale, self.session.encode_prompts)
        ranking = q.nearest_classes(cv, vectors, [key], k=min(5, len(cv.classes)))
        out["classes"] = [{"class": ranking.classes[c], "similarity": float(s), "probability": float(p)}
                          for c, s, p in zip(ranking.top[0].tolist(), ranking.similarity[0].tolist(),
                                             ranking.probability[0].tolist())]
        if result_id is not None:
            with contextlib.suppress(StoreNotFoundError):
                out["image"] = image_json(self.result(result_id), self.row_of(key))
        return out

    def _scale(self, variant: Variant) -> float:
        if variant.scale != "model":
            return float(variant.scale)
        card = self.cache.require_card(self.search_member.spec)
        if card.logit_scale is None:
            raise SpecError(f"scale = \"model\": {self.search_member.label} has no logit_scale")
        return float(card.logit_scale)

    def row_of(self, key: str) -> int:
        """The row of a stored key (anything else is refused: no path from a request is opened)."""
        row = self._keys.get(key)
        if row is None:
            raise StoreNotFoundError(f"key {key!r} is not an image of dataset {self.experiment.dataset!r}")
        return row

    def index(self) -> Any:
        """The store's saved FAISS index when it is current, else exact search (opened once)."""
        with self._index_lock:
            if self._index is None:
                from embedstore.search.index import open_index

                index, staleness = open_index(self.store)
                how = f"saved {index.factory} index" if index.saved else "exact search"
                self._index = (index, how + (f" ({staleness.describe()})" if staleness.stale else ""))
            return self._index[0]

    def search_text(self, text: str, k: int = 24) -> dict[str, Any]:
        """Nearest images to a text (its features from the text bank; a new text is encoded once)."""
        from embedstore.score import query as q

        text = text.strip()
        if not text:
            raise SpecError("text: empty query")
        with self._run_lock:
            vectors = q.text_vectors(self.cache, self.search_member.spec, self.store, [text],
                                     self.session.encode_prompts)
        found = q.nearest_images(self.index(), vectors, _k(k))[0]
        return {"query": text, "member": short_label(self.search_member), "searched": self._index[1],
                "images": [hit_json(h) for h in found]}

    def search_image(self, data: bytes, k: int = 24) -> dict[str, Any]:
        """Nearest images to an uploaded image, encoded with the store's encoder and view."""
        from embedstore.score import query as q

        if self.encode_images is None:
            raise SpecError("image search needs the store's encoder; this server was started without it")
        if not data:
            raise SpecError("image: empty upload")
        with tempfile.NamedTemporaryFile(dir=self._work.name, suffix=".img") as tmp:
            tmp.write(data)
            tmp.flush()
            with self._run_lock, self.activity.doing(f"encoding the uploaded image with {self.search_member.label}"):
                vectors = self.encode_images(self.search_member.spec, self.store, [tmp.name])
        found = q.nearest_images(self.index(), vectors, _k(k))[0]
        return {"query": "uploaded image", "member": short_label(self.search_member), "searched": self._index[1],
                "images": [hit_json(h) for h in found]}

    # -- thumbnails
    def _image_base(self) -> Optional[Path]:
        if not self.source or ":" in self.source.split("/")[0]:  # synthetic: or URL-like sources: no files
            return None
        base = Path(self.source)
        return base.parent if base.is_file() else base

    def thumbnail_of(self, key: str, size: int) -> bytes:
        """A JPEG thumbnail of a stored image (the file found from the store's source and key)."""
        self.row_of(key)
        if self.thumbnail is None:
            raise SpecError("thumbnails are off in this server")
        base = self._image_base()
        if base is None:
            raise StoreNotFoundError(f"dataset {self.experiment.dataset!r} has no image folder ({self.source})")
        return self.thumbnail(base / key, size)

    # -- which prompts matter
    def start_prompt_table(self, variant: Variant) -> Job:
        """Start the prompt table of ``variant`` in the background (see :meth:`prompt_table`)."""
        job = Job(uuid.uuid4().hex[:12], "prompts")
        with self._jobs_lock:
            self._jobs[job.id] = job
            for old in [j for j in self._jobs if self._jobs[j].status != "running"][:-16]:
                self._jobs.pop(old)
        exp = self.experiment_of(variant)
        self._pool.submit(self._run_job, job, lambda: self.prompt_table(exp, variant, job))
        return job

    def _run_job(self, job: Job, work: Callable[[], Any]) -> None:
        try:
            job.result = work()
            job.status = "done"
        except EmbedstoreError as exc:
            job.error, job.status = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001 - reported to the page, logged with its traceback
            log.exception("prompt table failed")
            job.error, job.status = f"unexpected {type(exc).__name__}: {exc}; this is a bug in embedstore", "failed"

    def job(self, job_id: str) -> Job:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise StoreNotFoundError(f"job {job_id!r} is not known")
        return job

    def prompt_table(self, exp: Experiment, variant: Variant, job: Optional[Job] = None) -> dict[str, Any]:
        """Each template's accuracy alone and the change when it is left out, over every row, from
        the prompts' logits held in memory while they fit the memory budget (else an error that
        says so)."""
        from embedstore.tune.study import Objective, template_effects

        if variant.scale == "model":
            raise SpecError("the prompt table needs one numeric scale (scale = \"model\" gives each member its own)")
        objective = Objective(self.cache, exp, "accuracy", encode_prompts=None, budget=self.session.budget,
                              all_rows=True)

        def step(done: int, total: int) -> None:
            if job is not None:
                job.done, job.total = done, total
        weights = [m.weight for m in exp.models]
        full, effects = template_effects(objective, weights, float(variant.scale), variant.drop_below, step)
        return {"accuracy": full, "rows": int(len(objective.val)),
                "templates": [{"template": e.template, "alone": _finite(e.alone), "without": _finite(e.without),
                               "delta": _finite(e.delta)} for e in effects]}

    # -- keeping what was found
    def keep(self, result_id: str, name: str = "") -> dict[str, Any]:
        """Add a scored variant to the session's list (to go back to it)."""
        scored = self.result(result_id)
        entry = {"id": scored.id, "name": name or f"variant {len(self.variants) + 1}", "time": time.strftime("%H:%M:%S"),
                 "variant": variant_json(scored.variant), "metrics": scored.summary.get("metrics_short"),
                 "prompts": len(scored.result.expansion)}
        with self._variants_lock:
            self.variants.append(entry)
        return entry

    def save(self, variant: Variant, name: str, overwrite: bool = False) -> dict[str, Any]:
        """Write ``variant`` as ``<save_dir>/<name>.toml`` (its prompts, when edited, in
        ``<name>.prompts.toml`` beside it), run that file as ``classify`` would, and append the run
        to the cache's run log. Returns the paths and the run's metrics.

        Raises:
            SpecError: a bad name, or the file exists and ``overwrite`` is False.
        """
        from embedstore.report.predictions import (
            append_log,
            log_entry,
            metrics_json,
            new_run_id,
            write_json,
            write_predictions,
        )
        from embedstore.tune.study import write_config
        from embedstore.util.fsutil import atomic_write

        stem = check_name(name)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"{stem}.toml"
        prompts_path = self.save_dir / f"{stem}.prompts.toml"
        if not overwrite and (path.exists() or prompts_path.exists()):
            raise FileExistsError(f"{path} exists; choose another name or overwrite it")
        prompt_set = prompt_set_of_variant(variant, stem)
        base_set = prompt_set_of(self.experiment)
        classes = self.describe_classes()
        if same_prompts(prompt_set, base_set):
            config = variant_config(self.experiment, variant, classes, self.experiment.templates,
                                    self.experiment.use_templates)
            written = [path]
        else:
            text = prompt_set_toml(prompt_set)
            atomic_write(prompts_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            config = variant_config(self.experiment, variant, classes, prompts_path.name)
            written = [prompts_path, path]
        write_config(path, config, [f"saved by `embedstore serve` from {self.experiment_file} on "
                                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
                                    f"reproduce: embedstore classify {path}"])
        exp = load_experiment(path)
        run_id = new_run_id()
        with self._run_lock:
            result = self.session.run(exp)
        out = self.cache.root / "runs" / run_id / "predictions.csv"
        outputs = {"experiment": str(path), "predictions": str(write_predictions(result, out))}
        outputs["metrics"] = str(write_json(out.with_suffix(".metrics.json"), metrics_json(result)))
        append_log(self.cache.root, log_entry(result, run_id, outputs, {"via": "serve"}))
        entry = {"id": run_id, "name": stem, "time": time.strftime("%H:%M:%S"), "variant": variant_json(variant),
                 "metrics": _metrics_short(result), "prompts": len(result.expansion), "file": str(path)}
        with self._variants_lock:
            self.variants.append(entry)
        return {"files": [str(p) for p in written], "run_id": run_id, "metrics": _metrics_short(result),
                "log": str(self.cache.root / "runs.jsonl")}


def short_label(entry: Any) -> str:
    """A member's label for the page: ``name``, or the model (a folder by its last part) and the
    view options that are set."""
    if entry.name:
        return str(entry.name)
    model = str(entry.spec.model)
    for prefix in ("local-dir:", "hf:"):
        if model.startswith(prefix) and "/" in model:
            model = prefix + Path(model[len(prefix):]).name
    if entry.spec.pretrained:
        model += f" {Path(str(entry.spec.pretrained)).name}"
    opts = [f"{k}={getattr(entry.view, k)}" for k in ("resize_mode", "size", "interpolation", "sharpness")
            if getattr(entry.view, k) is not None]
    return model + (f" [{', '.join(opts)}]" if opts else "")


def _k(k: int) -> int:
    if not 1 <= int(k) <= MAX_K:
        raise SpecError(f"k: must be in 1..{MAX_K}, got {k}")
    return int(k)


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def _metrics_short(result: ClassifyResult) -> Optional[dict[str, float]]:
    m = result.metrics
    if m is None:
        return None
    return {"accuracy": m.accuracy, "macro_f1": m.macro_f1, "mean_recall": m.mean_recall}


def summary(scored: Scored) -> dict[str, Any]:
    """What the page shows of a run: metrics, per-class figures, the confusion matrix, timings."""
    r = scored.result
    m = r.metrics
    out: dict[str, Any] = {
        "id": scored.id,
        "classes": list(r.classes),
        "rows": len(r.keys),
        "prompts": len(r.expansion),
        "prompts_per_class": r.expansion.counts.tolist(),
        "new_prompts": r.new_prompts,
        "weights": [mr.weight for mr in r.models],
        "seconds": round(scored.seconds, 4),
        "timings": {k: round(v, 4) for k, v in r.timings.items()},
        "notes": list(r.notes),
        "metrics": None,
        "metrics_short": _metrics_short(r),
        "predicted_counts": np.bincount(r.predictions, minlength=len(r.classes)).tolist(),
    }
    if m is not None:
        out["metrics"] = {
            "accuracy": m.accuracy, "macro_f1": m.macro_f1, "mean_recall": m.mean_recall,
            "top_k": m.top_k, "top_k_accuracy": m.top_k_accuracy, "n": m.n,
            "per_class": [{"name": c.name, "precision": c.precision, "recall": c.recall, "f1": c.f1,
                           "support": c.support} for c in m.per_class],
            "confusion": m.confusion.tolist(),
        }
    return out


def image_json(scored: Scored, row: int) -> dict[str, Any]:
    """One image of a result: key, true label, its top-3 classes with probabilities."""
    r = scored.result
    k = min(3, r.top.shape[1])
    return {"key": r.keys[row], "label": r.true_labels[row] if r.true_labels is not None else None,
            "top": [{"class": r.classes[c], "probability": float(p)}
                    for c, p in zip(r.top[row, :k].tolist(), r.top_probabilities[row, :k].tolist())]}


def hit_json(hit: Any) -> dict[str, Any]:
    return {"key": hit.key, "label": hit.label, "score": hit.score}


def variant_json(v: Variant) -> dict[str, Any]:
    """The JSON form of a variant the page sends back (see :mod:`embedstore.serve.app`)."""
    return {"aggregate": v.aggregate, "scale": v.scale, "drop_below": v.drop_below, "ensemble": v.ensemble,
            "weights": list(v.weights),
            "prompts": [{"text": p.text, "class": p.cls, "on": p.on} for p in v.prompts]}
