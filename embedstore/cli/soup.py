"""``embedstore soup``: average open_clip checkpoints (uniform or greedy soup) into a ``local-dir:`` model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from embedstore.cli.common import (
    cache_at,
    cache_option,
    cli_errors,
    device_option,
    table,
)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_run(run: Any, metric: str) -> None:
    result = run.result
    info = run.info
    val = info["validation"]
    exp = info["experiment"]
    click.echo(f"soup {run.info['run_id']}: {result.mode}, {metric} on {val['name']} ({val['images']} images, "
               f"{len(exp['classes'])} classes, {exp['prompts']} prompts, {exp['aggregate']}), "
               f"{info['evaluations']} evaluations, {run.timings['total']:.1f} s")
    if result.mode == "greedy":
        rows = [[i + 1, t.name, _fmt(t.own_score), _fmt(t.soup_score), "yes" if t.accepted else "no", t.size]
                for i, t in enumerate(result.trials)]
        click.echo(table(["#", "ingredient", f"own {metric}", f"soup {metric}", "accepted", "soup size"], rows))
    else:
        rows = [[i + 1, t.name, _fmt(t.own_score)] for i, t in enumerate(result.trials)]
        click.echo(table(["#", "ingredient", f"own {metric}"], rows))
    final = info["soup"]
    best = max(result.trials, key=lambda t: t.own_score if t.own_score is not None else float("-inf"))
    scores = (f"accuracy {final['accuracy']:.4f}, macro-F1 {final['macro_f1']:.4f}" if "accuracy" in final
              else f"{metric} {_fmt(result.score)}")
    click.echo(f"soup of {len(result.ingredients)} of {len(result.trials)} ingredients: {scores}; "
               f"best single ingredient {best.name}: {metric} {_fmt(best.own_score)}")
    for note in run.notes:
        click.echo(f"note: {note}")
    click.echo(f"saved local-dir:{run.out}")


@click.command("soup")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--arch", default=None,
              help="open_clip model name (ViT-B-32) or local-dir:FOLDER whose config the checkpoints share. "
                   "Default: the first checkpoint when it is a local-dir: folder.")
@click.option("--val", "val", required=True,
              help="Validation set: a cached labelled dataset (re-encoded from the folder it was encoded from), "
                   "or a labelled image folder / .txt / .csv list.")
@click.option("--experiment", "experiment_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Experiment TOML: classes, templates, aggregate, scale, drop_below and the first zero-shot "
                   "member's view options are used.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder to write the soup to (open_clip local-dir: layout plus soup.json).")
@click.option("--mode", type=click.Choice(["greedy", "uniform"]), default="greedy", show_default=True)
@click.option("--metric", type=click.Choice(["accuracy", "macro-f1"]), default="accuracy", show_default=True,
              help="Validation score that ranks ingredients and accepts greedy candidates.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override an experiment key.")
@cache_option
@device_option("Where the candidates encode the validation set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Validation images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes decoding the validation images (once). [default: the usable CPU cores, at most 8]")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists and is not empty.")
@cli_errors
def soup(checkpoints: tuple[str, ...], arch: Optional[str], val: str, experiment_file: Path, out: Path,
         mode: str, metric: str, overrides: tuple[str, ...], cache_dir: Optional[Path], device: str,
         batch_size: int, workers: Optional[int], overwrite: bool) -> None:
    """Average CHECKPOINTS (local-dir: folders, .safetensors, .pt/.bin state dicts) of one
    architecture into a soup: greedy (the seed's: best first, keep an ingredient only if the
    validation score strictly improves) or uniform (the plain mean)."""
    from embedstore.encode.soup import SoupOptions, log_entry, run_soup
    from embedstore.report.predictions import append_log, new_run_id
    from embedstore.score.experiment import load_experiment

    experiment = load_experiment(experiment_file, overrides)
    cache = cache_at(cache_dir)
    from embedstore.util.system import default_workers

    options = SoupOptions(mode=mode, metric=metric, device=device, batch_size=batch_size,
                          workers=default_workers() if workers is None else workers, overwrite=overwrite)
    run = run_soup(checkpoints, val, experiment, out, cache, arch=arch, options=options, run_id=new_run_id())
    append_log(cache.root, log_entry(run, experiment))
    _print_run(run, metric)
