"""``classify --report DIR``: a confusion-matrix PNG and a self-contained HTML page.

The page lists per-class precision/recall and, for each class, thumbnails of its misclassified
images with their top-3 classes and scores. Images are linked from the source folder by
relative URLs (percent-encoded; text HTML-escaped), not copied; the page opens in any browser
without a server.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import numpy as np

from embedstore.score.session import ClassifyResult
from embedstore.util.fsutil import atomic_write

MAX_PER_CLASS = 60


def image_path(source_location: Optional[str], key: str) -> Optional[Path]:
    """Where the image of ``key`` lives (keys are relative to the folder or list file's folder)."""
    if not source_location:
        return None
    base = Path(source_location)
    return (base.parent if base.is_file() else base) / key


def image_url(image: Optional[Path], page_folder: Path) -> str:
    """A relative URL from the report page to ``image``: percent-encoded, so that file names with
    spaces, ``%``, ``#``, ``?``, quotes or ``<>`` link to the file itself (HTML-escape it too when
    placing it in an attribute)."""
    if image is None:
        return ""
    return quote(Path(os.path.relpath(image, page_folder)).as_posix(), safe="/")


def confusion_png(result: ClassifyResult, path: Path) -> Path:
    """Save the confusion matrix (counts, rows = true class) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert result.metrics is not None
    cm = result.metrics.confusion
    n = len(result.classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), result.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), result.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    ax.set_title(f"{result.experiment.dataset}: accuracy {result.metrics.accuracy:.3f}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_report(result: ClassifyResult, folder: str | os.PathLike[str]) -> Path:
    """Write ``index.html`` (and ``confusion.png`` when there are metrics) into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>embedstore report: {e(result.experiment.dataset)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        ".thumbs{display:flex;flex-wrap:wrap;gap:8px}.thumb{width:150px;font-size:12px}"
        ".thumb img{width:150px;height:150px;object-fit:cover}</style></head><body>",
        f"<h1>{e(result.experiment.dataset)}</h1>",
        f"<p>{len(result.keys)} images, {len(result.classes)} classes, aggregate {e(result.experiment.aggregate)}, "
        f"models: {', '.join(e(m.label) + f' (weight {m.weight:.3g})' for m in result.models)}</p>",
    ]
    for note in result.notes:
        parts.append(f"<p><em>{e(note)}</em></p>")
    if result.metrics is None:
        parts.append("<p>No labels: no metrics and no misclassified images to show.</p></body></html>")
    else:
        m = result.metrics
        confusion_png(result, out / "confusion.png")
        parts.append(f"<p>accuracy <b>{m.accuracy:.4f}</b>, macro-F1 <b>{m.macro_f1:.4f}</b></p>")
        parts.append("<img src='confusion.png' alt='confusion matrix'>")
        parts.append("<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th>"
                     "<th>F1</th><th>error rate</th><th>support</th></tr>")
        for c in m.per_class:
            parts.append(f"<tr><td>{e(c.name)}</td><td>{c.precision:.3f}</td><td>{c.recall:.3f}</td>"
                         f"<td>{c.f1:.3f}</td><td>{c.error_rate:.3f}</td><td>{c.support}</td></tr>")
        parts.append("</table><h2>Misclassified images</h2>")
        index = {c: i for i, c in enumerate(result.classes)}
        true = np.asarray([index[t] for t in result.true_labels or []])
        for ci, cls in enumerate(result.classes):
            wrong = np.flatnonzero((true == ci) & (result.predictions != ci))
            parts.append(f"<h3>{e(cls)}: {wrong.size} misclassified</h3><div class='thumbs'>")
            for row in wrong[:MAX_PER_CLASS]:
                key = result.keys[row]
                img = image_path(result.source_location, key)
                src = image_url(img, out)
                scores = "<br>".join(
                    f"{e(result.classes[j])} {p:.3f}"
                    for j, p in zip(result.top[row, :3].tolist(), result.top_probabilities[row, :3].tolist())
                )
                parts.append(f"<div class='thumb'><a href='{e(src)}'><img src='{e(src)}' loading='lazy' "
                             f"alt='{e(key)}'></a><br>{e(key)}<br>{scores}</div>")
            if wrong.size > MAX_PER_CLASS:
                parts.append(f"<p>... and {wrong.size - MAX_PER_CLASS} more</p>")
            parts.append("</div>")
        parts.append("</body></html>")
    page = out / "index.html"
    text = "\n".join(parts)
    atomic_write(page, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return page
