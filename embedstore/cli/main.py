"""The ``embedstore`` command line: option parsing, output and exit codes only.

Exit codes: 0 success, 1 an :class:`~embedstore.errors.EmbedstoreError` (message printed without
a traceback), 2 usage error, 130 interrupted (committed work is kept; re-run to resume).
"""
from __future__ import annotations

import logging
import sys
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
    random_weights_option,
    setup_logging,
    spec_from,
    table,
    view_from,
    view_options,
)

log = logging.getLogger("embedstore")


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v: embedstore, -vv: libraries too).")
@click.option("--no-progress", is_flag=True,
              help="Hide every progress bar (bars go to stderr, by default only on a terminal; "
                   "EMBEDSTORE_PROGRESS=always|never|auto).")
@click.version_option(package_name="embedstore")
def main(verbose: int, no_progress: bool) -> None:
    """Encode images and prompts once with CLIP-style models; experiment from the cache."""
    from embedstore.util.progress import hide_progress
    from embedstore.util.system import keep_large_blocks_on_the_heap

    setup_logging(verbose)
    hide_progress(no_progress)
    click.get_current_context().call_on_close(lambda: hide_progress(False))
    keep_large_blocks_on_the_heap()


def _print_encode(result: Any) -> None:
    dropped = ""
    if result.replaced:
        dropped = f", source {result.replaced} replaced ({result.dropped} of its rows dropped)"
    elif result.dropped:
        dropped = f", {result.dropped} rows of images deleted from the source dropped"
    click.echo(
        f"dataset {result.dataset}: {result.rows} rows in store, {result.encoded} encoded, "
        f"{result.cached} already cached, {result.failed} failed"
        + (f", {result.skipped_failed} earlier failures skipped (--retry-failed to retry)" if result.skipped_failed else "")
        + dropped
        + f", {result.seconds:.1f} s"
    )
    click.echo(f"view {result.view.key}: {result.view.describe()}")
    click.echo(f"store {result.store_path}")


def _fail_if_nothing_encoded(result: Any) -> None:
    """Exit 1 when this run tried images and every one failed (a wrong list, a wrong folder), or
    when the store is left without a row and earlier failures were all skipped (the same again)."""
    if result.encoded or not (result.failed or (result.rows == 0 and result.skipped_failed)):
        return
    key, failure = next(iter(result.failures.items()), ("?", {"type": "?", "message": "?"}))
    hint = ""
    if Path(result.source).is_file():
        hint = f"; paths in a list file are relative to the list file's folder ({Path(result.source).parent})"
    tried = result.failed or len(result.failures)
    click.secho(f"error: none of the {tried} image(s) tried could be encoded, e.g. {key!r}: "
                f"{failure['type']}: {failure['message']}{hint}. `embedstore info --failures` lists them all.",
                fg="red", err=True)
    sys.exit(1)


@main.command()
@click.argument("source", nargs=-1)
@model_options
@random_weights_option
@view_options
@cache_option
@click.option("--hf-dataset", type=click.Path(path_type=Path), default=None,
              help="A Hugging Face dataset saved with save_to_disk (instead of SOURCE); needs embedstore[hf].")
@click.option("--split", default=None, help="With --hf-dataset: the split to encode (e.g. validation).")
@click.option("--image-column", default=None,
              help="Shards: the column with the image bytes (default: 'image' or the only binary column); "
                   "for tars, the image member's extension (default: the sample's only image).")
@click.option("--label-column", default=None,
              help="Shards: the label column (default: 'label' when present, or a dataset's ClassLabel); for tars "
                   "cls, txt or json:FIELD (default: cls when every sample has one).")
@click.option("--key-column", default=None,
              help="Tables: the column whose values are the keys (default: SHARD/ROW).")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Shards: a file with one class name per line; integer label i becomes line i.")
@click.option("--dataset", default=None,
              help="Dataset name (default: the folder's name, list file's stem, or the shards' common name prefix). "
                   "A name already used for another source is refused (see --replace).")
@click.option("--replace", is_flag=True,
              help="Encode SOURCE under a dataset name that holds another source, dropping that source's rows "
                   "from this store.")
@device_option("Where images are encoded.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="auto: fp16 on GPU, fp32 on CPU.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass (halved and retried on GPU out-of-memory).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes (with --decode gpu: file-reading threads); 0 decodes in this process. "
                   "[default: the usable CPU cores, at most 8]")
@click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="gpu: JPEGs decoded and preprocessed in batches on the encode device, other files with PIL; "
                   "cpu: PIL in worker processes; auto: gpu when the device is cuda.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Stored feature type.")
@click.option("--strict", is_flag=True, help="Detect changed images by content hash, not size and mtime.")
@click.option("--retry-failed", is_flag=True, help="Try images that failed before again.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Rows per committed shard (a crash loses at most one shard's work).")
@click.option("--loader-timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds without a batch from the decoding workers before the run ends with an error.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@cli_errors
def encode(source: tuple[str, ...], model: str, pretrained: Optional[str], trust_remote_code: bool,
           random_weights: bool, resize_mode: Optional[str],
           size: Optional[int], interpolation: Optional[str], mean: Optional[str], std: Optional[str],
           sharpness: Optional[float], cache_dir: Optional[Path], hf_dataset: Optional[Path], split: Optional[str],
           image_column: Optional[str], label_column: Optional[str], key_column: Optional[str],
           classes_file: Optional[Path], dataset: Optional[str], replace: bool, device: str,
           precision: str, batch_size: int, workers: Optional[int], decode: str, dtype: str, strict: bool, retry_failed: bool,
           shard_rows: int, loader_timeout: float, no_progress: bool) -> None:
    """Encode the images of SOURCE into the cache: a folder, a .txt/.csv list, WebDataset .tar
    shards or .parquet/.arrow files (several, globs and brace ranges such as 'data/{00000..00099}.tar'),
    or a saved Hugging Face dataset (--hf-dataset DIR --split NAME).

    Class subfolders become labels. Paths in a list file are relative to the list file's folder.
    Re-running resumes: only new, changed or missing rows are encoded, images deleted from the
    source are dropped. Exits with 1 when images were tried and none could be encoded.
    """
    from embedstore.encode.loop import EncodeOptions, encode_images
    from embedstore.encode.sources_shards import ShardOptions, resolve_source
    from embedstore.util.system import default_workers

    options = EncodeOptions(device=device, precision=precision, batch_size=batch_size,
                            workers=default_workers() if workers is None else workers,
                            dtype=dtype, strict=strict, retry_failed=retry_failed, shard_rows=shard_rows,
                            progress=not no_progress, decode=decode, replace=replace,
                            loader_timeout=loader_timeout)
    from embedstore.encode.distributed import encode_distributed, from_environment

    spec, cache, view = spec_from(model, pretrained, trust_remote_code, random_weights), cache_at(cache_dir), \
        view_from(resize_mode, size, interpolation, mean, std, sharpness)
    columns = ShardOptions.from_classes_file(classes_file, image_column=image_column, label_column=label_column,
                                             key_column=key_column)
    src = resolve_source(source, columns, str(hf_dataset) if hf_dataset is not None else None, split)
    partition = from_environment()
    if partition is None:
        result = encode_images(src, spec, cache, dataset, view, options)
        _print_encode(result)
        _fail_if_nothing_encoded(result)
        return
    part, merged = encode_distributed(src, spec, cache, dataset, view, options, partition)
    click.echo(f"rank {partition.rank} of {partition.world}: {part.encoded} encoded, {part.cached} already cached, "
               f"{part.failed} failed in {part.seconds:.1f} s")
    if merged is not None:
        click.echo(f"merged {merged.encoded} rows from {partition.world} ranks into {merged.store_path}: "
                   f"{merged.rows} rows, {merged.dropped} dropped, {merged.failed} failures recorded")


@main.command()
@click.argument("texts", nargs=-1)
@model_options
@random_weights_option
@cache_option
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text file with one prompt per line.")
@device_option("Where prompts are encoded.")
@cli_errors
def prompts(texts: tuple[str, ...], model: str, pretrained: Optional[str], trust_remote_code: bool,
            random_weights: bool, cache_dir: Optional[Path], file: Optional[Path], device: str) -> None:
    """Encode prompt TEXTS (or --file) into the encoder's text bank; only new ones are encoded."""
    from embedstore.encode.loop import encode_prompts

    items = list(texts)
    if file is not None:
        items += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise click.UsageError("give prompt TEXTS or --file")
    result = encode_prompts(items, spec_from(model, pretrained, trust_remote_code, random_weights), cache_at(cache_dir),
                            device=device)
    click.echo(f"{result.new} new prompts encoded, {result.cached} already in the text bank ({result.seconds:.1f} s)")


@main.command()
@cache_option
@click.option("--no-source-check", is_flag=True, help="Do not list source folders to detect changes.")
@click.option("--failures", "show_failures", is_flag=True, help="List every failed image.")
@cli_errors
def info(cache_dir: Optional[Path], no_source_check: bool, show_failures: bool) -> None:
    """List datasets, encoders, views, rows, failures and disk size of the cache."""
    from embedstore.cli.info import describe_cache
    from embedstore.util.budget import LOGIT_CACHE_ENV

    cache = cache_at(cache_dir)
    stores = describe_cache(cache, check_source=not no_source_check)
    cards = cache.encoder_cards()
    click.echo(f"cache {cache.root.resolve()}")
    if not stores and not cards:
        click.echo("empty: run `embedstore encode` (or `embedstore demo`) first")
        return
    rows = [[s.dataset, s.encoder, s.weights, s.view, s.rows, len(s.failures), human_size(s.bytes), s.source_status]
            for s in stores]
    click.echo(table(["dataset", "encoder", "weights", "view", "rows", "failed", "size", "source"], rows))
    from embedstore.cli.info import bank_weights, describe_encoder, describe_weights
    from embedstore.errors import CorruptStoreError

    banks = []
    for enc_id, bank in cache.text_banks():
        card = cards.get(enc_id, {})
        name = describe_encoder(card, enc_id) if "damaged" not in card else f"{enc_id} (card damaged)"
        try:
            manifest = bank.manifest()
            banks.append([name, describe_weights(bank_weights(manifest, card)),
                          manifest.get("dim", "?"), manifest.get("rows", 0), human_size(bank.disk_bytes())])
        except CorruptStoreError:  # listed as damaged; verify names the file
            banks.append([name, "?", "?", "damaged: run `embedstore verify`", "?"])
    click.echo("\ntext banks")
    click.echo(table(["encoder", "weights", "dim", "prompts", "size"], banks))
    from embedstore.store.logit_cache import LogitCache
    from embedstore.util.budget import Budget

    logits = LogitCache(cache.root, Budget.default().logit_cache)
    click.echo(f"\nlogit cache {logits.root}: {human_size(logits.size())} in {len(logits.chunks())} chunk(s), "
               f"budget {human_size(logits.budget)} (${LOGIT_CACHE_ENV}; safe to delete)")
    failed = [(s, key, f) for s in stores for key, f in s.failures.items()]
    if failed:
        click.echo(f"\nfailures ({len(failed)})")
        shown = failed if show_failures else failed[:10]
        click.echo(table(["dataset", "image", "error", "message"],
                          [[s.dataset, key, f["type"], f["message"][:80]] for s, key, f in shown]))
        if len(shown) < len(failed):
            click.echo(f"... {len(failed) - len(shown)} more (--failures lists all)")


@main.command()
@cache_option
@click.option("--repair", is_flag=True,
              help="Drop damaged rows (sound rows are kept), fall back to the previous manifest, rebuild "
                   "damaged indexes, remove damaged encoder cards; then `encode` re-encodes what was dropped.")
@cli_errors
def verify(cache_dir: Optional[Path], repair: bool) -> None:
    """Check every store, text bank, encoder card and index of the cache byte for byte; name damaged
    files (exit 1 when any). With --repair, fix them (each store in one atomic commit)."""
    from embedstore.maintain.repair import verify_cache

    report = verify_cache(cache_at(cache_dir), repair=repair)
    for problem in report.problems:
        click.secho(f"damaged: {problem}", fg="red")
    for action in report.repaired:
        click.secho(f"repaired: {action}", fg="green")
    for problem in report.unrepaired if repair else []:
        click.secho(f"not repaired: {problem}", fg="red")
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"{report.stores} stores, {report.banks} text banks, {report.indexes} indexes and {report.cards} "
               f"encoder cards checked: {len(report.problems)} problems"
               + (f", {len(report.problems) - len(report.unrepaired)} repaired" if repair else ""))
    if report.problems and not repair:
        click.echo("run `embedstore verify --repair" + (f" --cache {cache_dir}" if cache_dir else "") + "` to repair them")
    if not report.ok:
        sys.exit(1)


@main.command()
@model_options
@view_options
@cache_option
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for features.npy, keys.txt and labels.txt.")
@cli_errors
def export(model: str, pretrained: Optional[str], trust_remote_code: bool, resize_mode: Optional[str],
           size: Optional[int], interpolation: Optional[str], mean: Optional[str], std: Optional[str],
           sharpness: Optional[float], cache_dir: Optional[Path], dataset: str, out_dir: Path) -> None:
    """Write a store as features.npy (float32, unit rows), keys.txt and labels.txt."""
    from embedstore.store.export import export_features

    cache = cache_at(cache_dir)
    store = cache.open_image_store(dataset, spec_from(model, pretrained, trust_remote_code),
                                   view_from(resize_mode, size, interpolation, mean, std, sharpness))
    n, d = export_features(store, out_dir)
    click.echo(f"wrote {n} x {d} features, keys and labels to {out_dir}")


def _print_metrics(result: Any, confusion_file: Optional[Path] = None) -> None:
    m = result.metrics
    top = f"   top-{m.top_k} {m.top_k_accuracy:.4f}" if m.top_k_accuracy is not None and m.top_k > 1 else ""
    click.echo(f"accuracy {m.accuracy:.4f}{top}   mean recall {m.mean_recall:.4f}   macro-F1 {m.macro_f1:.4f}   "
               f"({m.n} images)")
    per_class = list(m.per_class)
    if confusion_file is not None:  # many classes: the weakest ones here, everything in the files
        per_class = sorted(per_class, key=lambda c: (c.recall, c.name))[:10]
        click.echo(f"the 10 classes with the lowest recall (all {len(m.per_class)} in the metrics JSON):")
    click.echo(table(
        ["class", "precision", "recall", "f1", "error rate", "support"],
        [[c.name, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", f"{c.error_rate:.3f}", c.support]
         for c in per_class],
    ))
    if confusion_file is not None:
        click.echo(f"\nconfusion matrix ({len(result.classes)} x {len(result.classes)}): {confusion_file}")
        return
    click.echo("\nconfusion matrix (rows: true, columns: predicted)")
    names = list(result.classes)
    click.echo(table(["true \\ pred", *names], [[n, *row] for n, row in zip(names, m.confusion.tolist())]))


def run_classify(experiment: Any, cache: Any, out: Optional[Path], fmt: str, report: Optional[Path],
                 device: str, encode_missing: bool = True, session: Any = None, probs: str = "auto",
                 budget: Any = None, missing_label: Optional[int] = None) -> Any:
    """Run, write outputs and the log entry, print the summary; shared by ``classify`` and ``demo``."""
    from embedstore.report.predictions import (
        WIDE_CLASSES,
        append_log,
        log_entry,
        metrics_json,
        new_run_id,
        write_confusion,
        write_json,
        write_predictions,
    )
    from embedstore.score.session import Session

    session = session or Session(cache, prompt_encoder_for(cache, device, encode_missing), budget)
    run_id = new_run_id()
    out = out or cache.root / "runs" / run_id / ("submission.csv" if fmt == "ajou" else "predictions.csv")
    probs_file = out.with_suffix(".probs.npy") if probs == "all" else None
    result = session.run(experiment, probabilities_out=probs_file)
    outputs = {"predictions": str(write_predictions(result, out, fmt, probs, missing_label))}
    if result.probabilities_file is not None:
        outputs["probabilities"] = str(result.probabilities_file)
    outputs["metrics"] = str(write_json(out.with_suffix(".metrics.json"), metrics_json(result)))
    confusion_file = None
    if result.metrics is not None and len(result.classes) > WIDE_CLASSES:
        confusion_file = write_confusion(result, out.with_suffix(".confusion.csv"))
        outputs["confusion"] = str(confusion_file)
    if report is not None:
        from embedstore.report.html import write_report

        outputs["report"] = str(write_report(result, report))
    append_log(cache.root, log_entry(result, run_id, outputs))
    click.echo(f"run {run_id}: {len(result.keys)} images, {len(result.classes)} classes, "
               f"{len(result.expansion)} prompts ({result.new_prompts} newly encoded), "
               f"aggregate {experiment.aggregate}, {result.timings['total']:.2f} s")
    click.echo(table(["model", "weight", "scale", "dim", "store generation"],
                      [[m.label, f"{m.weight:.3f}", f"{m.scale:g}", m.dim, m.generation] for m in result.models]))
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.metrics is not None:
        click.echo("")
        _print_metrics(result, confusion_file)
    click.echo("")
    for name, path in outputs.items():
        click.echo(f"{name}: {path}")
    return result


@main.command()
@click.argument("experiment_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@cache_option
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Predictions CSV (default: <cache>/runs/<run id>/predictions.csv); metrics JSON goes beside it.")
@click.option("--format", "fmt", type=click.Choice(["csv", "ajou"]), default="csv", show_default=True,
              help="csv: key,label,label_index and probabilities; ajou: the seed's id_idx,label submission "
                   "(id_idx: the file name's number, else the position in the full source listing).")
@click.option("--missing-label", type=int, default=None, metavar="N",
              help="With --format ajou: the label written for images that failed to encode (without it, such "
                   "images make the command refuse).")
@click.option("--probs", type=click.Choice(["auto", "all", "topk", "none"]), default="auto", show_default=True,
              help="Probabilities in the CSV: auto = one column per class up to 20 classes, else the top-5 classes "
                   "(class_i, probability_i); topk = always the top 5; none = key,label,label_index only; all = as "
                   "auto, plus the full matrix as OUT.probs.npy (float32, rows in CSV order).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an experiment key, e.g. --set aggregate=embed-mean --set models.0.weight=0.7.")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write confusion.png and index.html (misclassified thumbnails) into this folder.")
@device_option("Where prompts missing from a text bank are encoded.")
@click.option("--no-encode", is_flag=True, help="Fail instead of encoding prompts missing from a text bank.")
@click.option("--logit-cache", "logit_cache", default=None, metavar="SIZE|off", envvar="EMBEDSTORE_LOGIT_CACHE",
              show_envvar=True, help="Disk budget of the per-prompt logit cache (default 4G; off: neither read nor "
                                     "written). `embedstore info` shows its size.")
@budget_option
@cli_errors
def classify(experiment_file: Path, cache_dir: Optional[Path], out: Optional[Path], fmt: str,
             missing_label: Optional[int], probs: str, overrides: tuple[str, ...], report: Optional[Path],
             device: str, no_encode: bool, logit_cache: Optional[str], max_memory: Optional[str]) -> None:
    """Zero-shot classify a cached dataset as EXPERIMENT_FILE (TOML) describes."""
    from embedstore.score.experiment import load_experiment

    if missing_label is not None and fmt != "ajou":
        raise click.UsageError("--missing-label applies to --format ajou")
    experiment = load_experiment(experiment_file, overrides)
    run_classify(experiment, cache_at(cache_dir), out, fmt, report, device, encode_missing=not no_encode, probs=probs,
                 budget=budget_from(max_memory, logit_cache), missing_label=missing_label)


@main.command()
@click.argument("name", required=False)
@click.option("--classes", default=None, help="Comma-separated class names, or a file with one per line.")
@cli_errors
def templates(name: Optional[str], classes: Optional[str]) -> None:
    """List built-in prompt sets, or print NAME's prompts for --classes, one per line."""
    from embedstore.score.prompts import (
        builtin_sets,
        expand,
        load_classes,
        load_prompt_set,
    )

    if name is None:
        rows = []
        for set_name in builtin_sets():
            ps = load_prompt_set(set_name)
            rows.append([set_name, len(ps.templates), len(ps.class_prompts), ps.description])
        click.echo(table(["name", "templates", "classes with own prompts", "description"], rows))
        return
    prompt_set = load_prompt_set(name)
    if classes is None:
        for template in prompt_set.templates:
            click.echo(template)
        for cls, prompts in prompt_set.class_prompts.items():
            for prompt in prompts:
                click.echo(f"[{cls}] {prompt}")
        return
    class_list = load_classes(classes if Path(classes).is_file() else [c for c in classes.split(",") if c.strip()])
    expansion = expand(prompt_set, class_list)
    for text in expansion.texts:
        click.echo(text)
    counts = ", ".join(f"{c} {n}" for c, n in zip(class_list, expansion.counts.tolist()))
    click.echo(f"# {len(expansion)} prompts: {counts}", err=True)


def _number_cell(value: Any) -> str:
    """A metric for the runs table: 4 decimals, or ``-`` when absent or not a number (logged as null)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


@main.command()
@cache_option
@click.option("--last", type=click.IntRange(min=1), default=20, show_default=True, help="Show the last N runs.")
@cli_errors
def runs(cache_dir: Optional[Path], last: int) -> None:
    """List the experiment log (<cache>/runs.jsonl) as a table."""
    from embedstore.report.predictions import read_log

    cache = cache_at(cache_dir)
    entries = read_log(cache.root)[-last:]
    if not entries:
        click.echo(f"no runs logged in {cache.root} yet")
        return
    rows = []
    for e in entries:
        res = e.get("resolved", {})
        metrics = e.get("metrics") or {}
        models = ", ".join(f"{m.get('label', '?')}:{m.get('weight', 0):.2f}" for m in e.get("models", []))
        rows.append([
            e.get("run_id", "?"), e.get("kind", ""), res.get("dataset", ""), res.get("aggregate", ""),
            res.get("prompts", ""), models[:60],
            _number_cell(metrics.get("accuracy")),
            _number_cell(metrics.get("macro_f1")),
            f"{e.get('timings', {}).get('total', 0):.2f}",
        ])
    click.echo(table(["run", "kind", "dataset", "aggregate", "prompts", "models:weight", "accuracy", "macro-F1", "s"], rows))


@main.command()
@cache_option
@cli_errors
def demo(cache_dir: Optional[Path]) -> None:
    """Run encode and classify offline on a TOY model the demo trains itself (about a minute, once)."""
    from embedstore.cli.demo import prepare_demo
    from embedstore.score.experiment import load_experiment

    cache = cache_at(cache_dir)
    click.echo("embedstore demo: everything is made locally under "
               f"{cache.root / 'demo'}: synthetic images of six 'scene' classes (coloured noise) and a")
    click.echo("TOY model (a tiny open_clip trained here on such images; it knows six colours, not the world).")
    click.echo("Nothing is downloaded. The toy model trains for about a minute on 2 CPU cores the first time")
    click.echo("(a bar on stderr shows it); later runs reuse it.\n")
    setup = prepare_demo(cache)
    if setup.reused:
        click.echo(f"reused from an earlier demo run: {', '.join(setup.reused)}")
    if setup.kept_experiment:
        click.echo(f"kept your edited {setup.experiment_file} (delete it to get the demo's own back)")
    click.echo("encode:")
    _print_encode(setup.first)
    click.echo("\nencode again (nothing to do; the model is not even loaded):")
    _print_encode(setup.second)
    click.echo(f"\nclassify {setup.experiment_file}"
               + (" (your edited file):" if setup.kept_experiment else " (the seed's 312 prompts, prob-mean):"))
    run_classify(load_experiment(setup.experiment_file), cache, None, "csv", None, "cpu")
    click.echo("")
    ctx = click.get_current_context()
    ctx.invoke(info, cache_dir=cache_dir, no_source_check=False, show_failures=False)
    click.echo(
        "\nWith a real model (needs internet once for the weights):\n"
        "  embedstore encode IMAGES --model ViT-B-32 --pretrained laion2b_s34b_b79k\n"
        "then point an experiment's [[models]] at it (see recipes/ajou-2024.toml) and run\n"
        "  embedstore classify EXPERIMENT.toml\n"
        "or edit the prompts and weights in the browser, with live metrics:\n"
        f"  embedstore serve {setup.experiment_file}" + (f" --cache {cache_dir}" if cache_dir else "")
    )


from embedstore.cli.rm import rm  # noqa: E402 - registers the rm command
from embedstore.cli.search import index_group, query  # noqa: E402 - registers the search commands
from embedstore.cli.serve import serve  # noqa: E402 - registers the serve command
from embedstore.cli.soup import soup  # noqa: E402 - registers the soup command
from embedstore.cli.train import heads_group, tune  # noqa: E402 - registers tune and heads
from embedstore.cli.vote import vote  # noqa: E402 - registers the vote command

main.add_command(index_group)
main.add_command(query)
main.add_command(tune)
main.add_command(heads_group)
main.add_command(vote)
main.add_command(soup)
main.add_command(rm)
main.add_command(serve)

if __name__ == "__main__":  # pragma: no cover
    main()
