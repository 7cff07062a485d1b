"""``embedstore index build|info`` and ``embedstore query``: FAISS indexes and nearest-neighbour queries."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Optional

import click

from embedstore.cli.common import (
    budget_from,
    budget_option,
    cache_at,
    cache_option,
    cli_errors,
    device_option,
    human_size,
    model_options,
    prompt_encoder_for,
    spec_from,
    table,
    view_from,
    view_options,
)
from embedstore.errors import SpecError
from embedstore.util.budget import parse_bytes


@click.group("index")
def index_group() -> None:
    """Build and inspect FAISS indexes over cached image views."""


@index_group.command("build")
@model_options
@view_options
@cache_option
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--kind", default=None,
              help="auto | flat | ivf | hnsw | pq | a FAISS factory string. Default: the existing index's "
                   "kind, or auto for a new one.")
@click.option("--max-memory", default=None, help="Memory budget for auto (e.g. 4G); PQ compression when needed.")
@click.option("--recall", "recall", type=float, default=0.95, show_default=True,
              help="recall@10 target that nprobe/efSearch are tuned to.")
@click.option("--sample", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Rows sampled to measure recall.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="cuda needs faiss-gpu (pip install -e .[gpu]).")
@click.option("--rebuild", is_flag=True, help="Build from scratch even if an index can be updated.")
@cli_errors
def build(model: str, pretrained: Optional[str], trust_remote_code: bool, resize_mode: Optional[str],
          size: Optional[int], interpolation: Optional[str], mean: Optional[str], std: Optional[str],
          sharpness: Optional[float], cache_dir: Optional[Path], dataset: str, kind: Optional[str],
          max_memory: Optional[str], recall: float, sample: int, device: str, rebuild: bool) -> None:
    """Build (or bring up to date) the FAISS index of a cached image view."""
    from embedstore.search.index import IndexOptions, build_index

    cache = cache_at(cache_dir)
    store = cache.open_image_store(dataset, spec_from(model, pretrained, trust_remote_code),
                                   view_from(resize_mode, size, interpolation, mean, std, sharpness))
    options = IndexOptions(kind=kind, max_memory=parse_bytes(max_memory, "--max-memory") if max_memory else None, recall_target=recall, sample=sample,
                           device=device, rebuild=rebuild)
    _, report = build_index(store, options)
    tuning = report.tuning or {}
    how = (f" at {tuning['parameter']}={tuning['value']}" if tuning.get("parameter")
           else " (exact)" if not tuning.get("sample") else "") if tuning else ""
    quality = (f"recall@{tuning['k']} {tuning['recall']:.3f}{how} on {tuning['sample']} sampled rows"
               if tuning else "")
    if report.action == "unchanged":
        click.echo(f"index {report.factory} over {report.rows:,} rows is up to date ({quality})")
        return
    what = (f"updated {report.factory}: +{report.added:,} / -{report.removed:,} rows"
            if report.action == "updated" else f"built {report.factory} over {report.rows:,} rows")
    click.echo(f"{what} in {report.seconds:.1f} s on {report.device}; {quality}; {human_size(report.index_bytes)}")
    if report.reason:
        click.echo(f"(rebuilt because {report.reason})")
    if tuning and tuning["recall"] < tuning["target"]:
        click.secho(f"warning: recall@{tuning['k']} {tuning['recall']:.3f} is below the target {tuning['target']:g} "
                    f"(--recall), the most this index reaches"
                    + (f" even at {tuning['parameter']}={tuning['value']}" if tuning.get("parameter") else "")
                    + "; compressed kinds (PQ) lose precision: use --kind ivf or flat, or a larger --max-memory, "
                      "for higher recall", fg="yellow", err=True)


@index_group.command("info")
@cache_option
@cli_errors
def index_info(cache_dir: Optional[Path]) -> None:
    """List the indexes of the cache, their kind, recall and whether they are stale."""
    from embedstore.errors import SearchIndexError
    from embedstore.search.index import StoreIndex
    from embedstore.store.store import Store

    cache = cache_at(cache_dir)
    rows = []
    for loc in cache.stores():
        store = Store(loc.path)
        if not StoreIndex.exists(store):
            continue
        try:
            idx = StoreIndex.load(store)
        except SearchIndexError as exc:
            rows.append([loc.dataset, loc.encoder_id, loc.view_key, "-", "-", "-", f"unusable: {exc}"])
            continue
        t = idx.meta.get("tuning") or {}
        stale = idx.staleness()
        rows.append([loc.dataset, loc.encoder_id, loc.view_key, idx.factory, f"{idx.rows.n_live:,}",
                     f"{t.get('recall', 1.0):.3f}" + (f" ({t['parameter']}={t['value']})" if t.get("parameter") else ""),
                     stale.describe().split(":")[0] if stale.stale else "up to date"])
    if not rows:
        click.echo(f"no indexes in {cache.root}; build one with `embedstore index build`")
        return
    click.echo(table(["dataset", "encoder", "view", "kind", "rows", "recall@10", "state"], rows))


@click.command()
@model_options
@view_options
@cache_option
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--text", "texts", multiple=True, help="Query text (repeatable); uses the text bank.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query image file (repeatable); encoded with the store's encoder and view.")
@click.option("--key", "keys", multiple=True, help="Query by a stored row's key (repeatable); the row itself is left out.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours (or classes) per query.")
@click.option("--classes", "classes", default=None,
              help="Nearest classes instead of images: an experiment TOML (classes, templates, scale) or a class "
                   "list file. Without --text/--image/--key: every image of the dataset.")
@click.option("--templates", default=None, help="Prompt set for --classes FILE (default openai-imagenet).")
@click.option("--match", type=click.Choice(["mean", "best"]), default="mean", show_default=True,
              help="Class score: prompt-averaged class vector, or the best-matching prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --classes over a dataset: write every row's ranking to this CSV.")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="Rows printed for a whole-dataset --classes query.")
@device_option("Where new texts and query images are encoded.")
@budget_option
@cli_errors
def query(model: str, pretrained: Optional[str], trust_remote_code: bool, resize_mode: Optional[str],
          size: Optional[int], interpolation: Optional[str], mean: Optional[str], std: Optional[str],
          sharpness: Optional[float], cache_dir: Optional[Path], dataset: str, texts: tuple[str, ...],
          images: tuple[Path, ...], keys: tuple[str, ...], k: int, classes: Optional[str], templates: Optional[str],
          match: str, as_json: bool, out: Optional[Path], limit: int, device: str, max_memory: Optional[str]) -> None:
    """Nearest images (or, with --classes, nearest classes) to texts, images or stored rows."""
    from embedstore.score import query as q

    cache = cache_at(cache_dir)
    spec = spec_from(model, pretrained, trust_remote_code)
    store = cache.open_image_store(dataset, spec, view_from(resize_mode, size, interpolation, mean, std, sharpness))
    given = sum(bool(x) for x in (texts, images, keys))
    if given > 1:
        raise click.UsageError("give one of --text, --image or --key")
    if not given and classes is None:
        raise click.UsageError("give --text, --image or --key (or --classes to rank classes)")
    labels: list[str] = list(texts) or [str(p) for p in images] or list(keys)
    vectors = None
    if texts:
        vectors = q.text_vectors(cache, spec, store, list(texts), prompt_encoder_for(cache, device))
    elif images:
        from embedstore.encode.image_query import (
            image_vectors,  # stage 1: only when an image is given
        )

        vectors = image_vectors(cache, spec, store, list(images), device)
    elif keys:
        vectors = q.key_vectors(store, list(keys))

    if classes is not None:
        _query_classes(cache, spec, store, classes, templates, match, vectors, labels, k, as_json, out, limit, device,
                       budget_from(max_memory))
        return

    from embedstore.search.index import open_index

    index, staleness = open_index(store)
    if staleness.stale:
        click.secho(f"warning: {staleness.describe()}; until then, queries search the store's current rows "
                    "exactly", fg="yellow", err=True)
    assert vectors is not None
    results = q.nearest_images(index, vectors, k, exclude=list(keys) if keys else None)
    source = (index.factory if index.saved else
              "exact search (the saved index is stale)" if staleness.stale else "exact search (no index built)")
    if as_json:
        click.echo(json.dumps({"index": source, "stale": staleness.stale, "queries": [
            {"query": label, "hits": [h.__dict__ for h in found]} for label, found in zip(labels, results)]}, indent=1))
        return
    for label, found in zip(labels, results):
        click.echo(f"\n{label!r} ({source}):")
        click.echo(table(["#", "key", "label", "score"],
                          [[i + 1, h.key, h.label or "", f"{h.score:.4f}"] for i, h in enumerate(found)]))


def _query_classes(cache: Any, spec: Any, store: Any, classes: str, templates: Optional[str], match: str,
                   vectors: Any, labels: list[str], k: int, as_json: bool, out: Optional[Path], limit: int,
                   device: str, budget: Any) -> None:
    from embedstore.score import query as q
    from embedstore.score.prompts import load_classes
    from embedstore.store.reader import StoreReader
    from embedstore.util.arrays import unit_rows

    path = Path(classes)
    scale = 100.0
    template_set: Any
    if path.suffix == ".toml":
        from embedstore.score.experiment import load_experiment, prompt_set_of

        exp = load_experiment(path)
        class_list = list(exp.classes) if exp.classes else sorted(set(store.read_keys_labels().labels or []))
        template_set = templates or prompt_set_of(exp)  # the experiment's use_templates included
        if exp.scale == "model":
            card_scale = cache.require_card(spec).logit_scale
            if card_scale is None:
                raise SpecError(f"--classes {classes}: scale = \"model\" but {spec} has no logit_scale")
            scale = float(card_scale)
        else:
            scale = float(exp.scale)
    else:
        class_list = load_classes(classes)
        template_set = templates or "openai-imagenet"
    if not class_list:
        raise SpecError(f"--classes {classes}: no classes")
    cv = q.class_vectors(cache, spec, store, class_list, template_set, match, scale, prompt_encoder_for(cache, device))
    header = {"match": match, "templates": getattr(template_set, "name", template_set), "scale": scale}
    if vectors is not None:
        records = _records(q.nearest_classes(cv, vectors, labels, k))
        if as_json:
            click.echo(json.dumps({**header, "results": records}, indent=1))
        else:
            _print_rankings(records, k)
        return
    # every image of the dataset, in row blocks: memory stays bounded, rankings stream to --out
    shown: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    total = 0
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(StoreReader(store))
        writer = stack.enter_context(_RankingWriter(out, min(k, len(class_list)))) if out is not None else None
        step = budget.block_rows(reader.dim * 6 + len(cv.vectors) * 8 + len(class_list) * 12)
        every = as_json and out is None
        for start in range(0, len(reader.keys), step):
            stop = min(len(reader.keys), start + step)
            features = unit_rows(reader.features(reader.rows(start, stop)), copy=False)
            records = _records(q.nearest_classes(cv, features, reader.keys[start:stop], k))
            total += len(records)
            for r in records:
                counts[r["classes"][0]["class"]] = counts.get(r["classes"][0]["class"], 0) + 1
            if writer is not None:
                writer.write(records)
            if every or len(shown) < limit:
                shown.extend(records if every else records[:limit - len(shown)])
    if out is not None:
        click.echo(f"wrote {total:,} rankings to {out}", err=True)
    if as_json:
        click.echo(json.dumps({**header, "results": shown, "rows": total, "top1_counts": counts}, indent=1))
        return
    _print_rankings(shown, k)
    if total > len(shown):
        click.echo(f"... {total - len(shown):,} more rows (--out FILE.csv for all); top-1 counts: "
                   + ", ".join(f"{c} {n:,}" for c, n in sorted(counts.items(), key=lambda x: -x[1])))


def _records(ranking: Any) -> list[dict[str, Any]]:
    return [{"query": key, "classes": [
        {"class": ranking.classes[c], "similarity": float(s), "probability": float(p)}
        for c, s, p in zip(top, sims, probs)]} for key, top, sims, probs in
        zip(ranking.keys, ranking.top.tolist(), ranking.similarity.tolist(), ranking.probability.tolist())]


def _print_rankings(records: list[dict[str, Any]], k: int) -> None:
    width = len(records[0]["classes"]) if records else k
    click.echo(table(["query", *[f"#{i + 1}" for i in range(width)]],
                      [[r["query"], *[f"{c['class']} {c['similarity']:.3f} ({c['probability']:.2f})"
                                      for c in r["classes"]]] for r in records]))


class _RankingWriter:
    """Rankings CSV (``key,class_1,similarity_1,probability_1,...``) written as blocks arrive, atomically."""

    def __init__(self, path: Path, k: int):
        self.path, self.k = path, k

    def __enter__(self) -> "_RankingWriter":
        import csv

        from embedstore.util.fsutil import temp_path

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path.parent, ".csv")
        self.fh = open(self.tmp, "w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.fh)
        self.csv.writerow(["key"] + [f"{f}_{i + 1}" for i in range(self.k) for f in ("class", "similarity", "probability")])
        return self

    def write(self, records: list[dict[str, Any]]) -> None:
        self.csv.writerows([r["query"]] + [v for c in r["classes"]
                                           for v in (c["class"], f"{c['similarity']:.6f}", f"{c['probability']:.6f}")]
                           for r in records)

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        import os

        from embedstore.util.fsutil import fsync_dir

        self.fh.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        else:
            self.tmp.unlink(missing_ok=True)
