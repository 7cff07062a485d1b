"""Writing what a classification run produced: predictions CSV, metrics JSON, the run log.

The run log (``<cache>/runs.jsonl``) gets one JSON line per run with the full experiment
config, the fingerprints and generations of the stores it read, timings and metrics, so every
number a user saw can be traced and reproduced.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

import numpy as np

from embedstore.errors import SpecError
from embedstore.score.scoring import sum_to_one
from embedstore.score.session import ClassifyResult
from embedstore.store.store import Store
from embedstore.util.fsutil import atomic_write
from embedstore.util.order import natural_order

FORMATS = ("csv", "ajou")
PROBS = ("auto", "all", "topk", "none")
RUN_LOG = "runs.jsonl"
WIDE_CLASSES = 20      # above this many classes the CSV holds the top-k classes, not a column per class
WRITE_ROWS = 20_000    # rows formatted per write
_NUMBER = re.compile(r"[0-9]+")


def class_columns(result: ClassifyResult, probs: str = "auto") -> bool:
    """Whether the predictions CSV gets one probability column per class (else the top-k classes)."""
    if probs not in PROBS:
        raise ValueError(f"probs must be one of {PROBS}")
    return probs in ("auto", "all") and len(result.classes) <= WIDE_CLASSES and result.scores is not None


def _natural_sorted(keys: Any) -> list[str]:
    """``keys`` in natural sort order."""
    keys = list(keys)
    return [keys[i] for i in natural_order(keys)]


def submission_ids(keys: Sequence[str]) -> dict[str, int]:
    """The ``id_idx`` of every image of a source listing (encoded and failed images alike).

    When every file name is a number (``0.jpg``, ``17.png``: the seed's numbered files) and no
    number repeats, the id is that number; otherwise it is the key's position in the natural-sorted
    listing of all ``keys``. Never a position among the rows that happened to encode.
    """
    numbers = [PurePosixPath(key).stem for key in keys]
    if keys and all(_NUMBER.fullmatch(n) for n in numbers) and len({int(n) for n in numbers}) == len(keys):
        return {key: int(n) for key, n in zip(keys, numbers)}
    return {keys[i]: position for position, i in enumerate(natural_order(list(keys)))}


def failed_images(result: ClassifyResult) -> dict[str, dict[str, Any]]:
    """Images of the classified dataset that failed to encode (key -> failure record), from the
    stores the run read; they have no features and so no prediction."""
    failed: dict[str, dict[str, Any]] = {}
    for model in result.models:
        failed.update(Store(model.store).manifest().get("failures", {}))
    return {key: failed[key] for key in _natural_sorted(failed)}


def ajou_rows(result: ClassifyResult, missing_label: Optional[int] = None) -> list[tuple[int, int]]:
    """The seed's submission rows ``(id_idx, label)`` in id order (see :func:`submission_ids`).

    Raises:
        SpecError: images of the dataset failed to encode and no ``missing_label`` says what to
            write for them (the message names one), or ``missing_label`` is not a class index.
    """
    failed = failed_images(result)
    n_classes = len(result.classes)
    if missing_label is not None and not 0 <= missing_label < n_classes:
        raise SpecError(f"--missing-label {missing_label}: not a class index (0..{n_classes - 1})")
    if failed and missing_label is None:
        key, record = next(iter(failed.items()))
        raise SpecError(
            f"--format ajou: {len(failed)} image(s) of dataset {result.experiment.dataset!r} failed to encode and "
            f"have no prediction, e.g. {key!r} ({record.get('type')}: {record.get('message')}); a submission needs a "
            "label for every image. Pass --missing-label N to write class N for them, or fix the images and "
            "re-run `embedstore encode ... --retry-failed`."
        )
    ids = submission_ids(list(result.keys) + list(failed))
    rows = [(ids[key], int(label)) for key, label in zip(result.keys, result.predictions.tolist())]
    rows += [(ids[key], int(missing_label)) for key in failed]  # type: ignore[arg-type]
    return sorted(rows)


def write_predictions(result: ClassifyResult, path: str | os.PathLike[str], fmt: str = "csv",
                      probs: str = "auto", missing_label: Optional[int] = None) -> Path:
    """Write predictions atomically, in row blocks.

    ``csv``: ``key,label,label_index``, then (``probs`` auto/all) one probability column per class
    when there are at most 20 classes (rows sum to 1), else (or ``probs="topk"``) the top-k classes
    and their probabilities: ``class_1,probability_1,...``; ``probs="none"``: nothing more.
    ``ajou``: the seed's submission, ``id_idx,label`` with integer labels in id order, ids from
    :func:`ajou_rows` (failed images refused unless ``missing_label``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    out = Path(path)
    classes = result.classes
    per_class = class_columns(result, probs)
    submission = ajou_rows(result, missing_label) if fmt == "ajou" else []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            if fmt == "ajou":
                w.writerow(["id_idx", "label"])
                w.writerows(submission)
                return
            k = result.top.shape[1]
            extra = (list(classes) if per_class else
                     [] if probs == "none" else [f"{f}_{i + 1}" for i in range(k) for f in ("class", "probability")])
            w.writerow(["key", "label", "label_index", *extra])
            for start in range(0, len(result.keys), WRITE_ROWS):
                stop = min(len(result.keys), start + WRITE_ROWS)
                w.writerows(_rows(result, start, stop, per_class, probs != "none"))

    atomic_write(out, write)
    return out


def _rows(result: ClassifyResult, start: int, stop: int, per_class: bool, top: bool) -> list[list[Any]]:
    classes = result.classes
    pred = result.predictions[start:stop].tolist()
    head = [[key, classes[i], i] for key, i in zip(result.keys[start:stop], pred)]
    if per_class:
        assert result.scores is not None
        values = sum_to_one(result.scores[start:stop])
        c = values.shape[1]
        flat = list(map("%.6g".__mod__, values.astype(np.float64).ravel().tolist()))
        return [row + flat[i * c:(i + 1) * c] for i, row in enumerate(head)]
    if not top:
        return head
    names = [[classes[j] for j in row] for row in result.top[start:stop].tolist()]
    values = [list(map("%.6g".__mod__, row)) for row in result.top_probabilities[start:stop].astype(np.float64).tolist()]
    return [row + [v for pair in zip(n, p) for v in pair] for row, n, p in zip(head, names, values)]


def write_confusion(result: ClassifyResult, path: str | os.PathLike[str]) -> Path:
    """The confusion matrix as CSV (rows: true class, columns: predicted), atomically."""
    assert result.metrics is not None
    out = Path(path)
    names = list(result.classes)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["true \\ predicted", *names])
            for name, row in zip(names, result.metrics.confusion.tolist()):
                w.writerow([name, *row])

    atomic_write(out, write)
    return out


def metrics_json(result: ClassifyResult) -> dict[str, Any]:
    """Metrics (or why there are none), with the classes and the prompt counts per class; the
    confusion matrix only up to 20 classes (above, it goes to its own CSV)."""
    wide = len(result.classes) > WIDE_CLASSES
    return {
        "dataset": result.experiment.dataset,
        "classes": list(result.classes),
        "prompts_per_class": result.expansion.counts.tolist(),
        "metrics": result.metrics.to_dict(with_confusion=not wide) if result.metrics else None,
        "failed_images": result.failed,
        "notes": result.notes,
    }


def json_safe(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, ±inf, also numpy scalars) replaced by ``None``, so
    that the JSON written is valid (Python's ``json`` would write bare ``NaN``/``Infinity`` tokens)."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if isinstance(data, (float, np.floating)):
        return float(data) if math.isfinite(data) else None
    if isinstance(data, np.integer):
        return int(data)
    return data


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomically write indented JSON (non-finite numbers become ``null``, see :func:`json_safe`)."""
    out = Path(path)
    text = json.dumps(json_safe(data), indent=1, allow_nan=False)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out


def new_run_id() -> str:
    """Sortable unique run id: ``YYYYmmdd-HHMMSS-<6 hex>``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def log_entry(result: ClassifyResult, run_id: str, outputs: dict[str, str], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The run-log record of a classification run."""
    exp = result.experiment
    entry = {
        "run_id": run_id,
        "kind": "classify",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "experiment_file": exp.source,
        "config": exp.config,
        "resolved": {
            "dataset": exp.dataset,
            "classes": list(result.classes),
            "templates": exp.templates,
            "aggregate": exp.aggregate,
            "scale": exp.scale,
            "drop_below": exp.drop_below,
            "prompts": len(result.expansion),
        },
        "models": [m.__dict__ for m in result.models],
        "rows": len(result.keys),
        "new_prompts": result.new_prompts,
        "timings": result.timings,
        "metrics": _summary(result.metrics) if result.metrics else None,
        "failed_images": result.failed,
        "notes": result.notes,
        "outputs": outputs,
    }
    if extra:
        entry.update(extra)
    return entry


def _summary(metrics: Any) -> dict[str, Any]:
    out = {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "mean_recall": metrics.mean_recall}
    if metrics.top_k_accuracy is not None:
        out[f"top{metrics.top_k}_accuracy"] = metrics.top_k_accuracy
    return out


def append_log(cache_root: str | os.PathLike[str], entry: dict[str, Any]) -> Path:
    """Append one JSON line to ``<cache>/runs.jsonl`` (one ``write`` call, flushed and fsynced).

    The line is strict JSON: non-finite numbers are written as ``null`` (:func:`json_safe`).
    """
    path = Path(cache_root) / RUN_LOG
    line = json.dumps(json_safe(entry), default=str, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = line.encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, end)  # no half line left behind to garble the next entry
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        from embedstore.errors import WriteFailedError

        raise WriteFailedError(path, exc, "the run's own outputs were written; only its log line is missing") from exc
    return path


def read_log(cache_root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All run-log entries (a damaged line is reported by its number, not skipped silently)."""
    path = Path(cache_root) / RUN_LOG
    if not path.exists():
        return []
    entries = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"run_id": f"<damaged line {no} of {path}>"})
    return entries
