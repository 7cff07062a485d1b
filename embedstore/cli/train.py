"""``embedstore tune`` and ``embedstore heads train|soup``: searches and linear heads on the cache."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import click

from embedstore.cli.common import (
    budget_from,
    budget_option,
    cache_at,
    cache_option,
    cli_errors,
    device_option,
    prompt_encoder_for,
    table,
)
from embedstore.errors import SpecError


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"{what} {text!r}: expected comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise SpecError(f"{what} {text!r}: expected finite numbers (no nan or inf)")
    return values


def _range(text: Optional[str], what: str) -> Optional[tuple[float, float]]:
    if text is None or text.lower() == "off":
        return None
    values = _floats(text, what)
    if len(values) != 2 or values[0] > values[1]:
        raise SpecError(f"{what} {text!r}: expected LOW,HIGH (or off)")
    return values[0], values[1]


def _log(cache: object, kind: str, entry: dict) -> str:
    from embedstore.report.predictions import append_log, new_run_id

    run_id = new_run_id()
    append_log(cache.root, {"run_id": run_id, "kind": kind, **entry})  # type: ignore[attr-defined]
    return run_id


@click.command()
@click.argument("experiment_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@cache_option
@click.option("--trials", type=click.IntRange(min=1), default=100, show_default=True,
              help="Finished trials the study should have in all (re-running continues it).")
@click.option("--metric", type=click.Choice(["accuracy", "macro-f1"]), default="accuracy", show_default=True)
@click.option("--scale-range", default="10,200", show_default=True, help="LOW,HIGH (log scale) or off.")
@click.option("--drop-range", default="0,0.02", show_default=True, help="LOW,HIGH for drop_below (prob-mean) or off.")
@click.option("--no-weights", is_flag=True, help="Keep the experiment's model weights.")
@click.option("--templates", "search_templates", is_flag=True, help="Also search template subsets.")
@click.option("--greedy-templates", is_flag=True, help="Greedy template selection instead of an Optuna study.")
@click.option("--seed", type=int, default=0, show_default=True, help="TPE sampler seed.")
@click.option("--study", default=None, help="Study name (default: derived from the experiment and search space).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Best experiment TOML (default: EXPERIMENT.best.toml next to the file; with --greedy-templates "
                   "EXPERIMENT.greedy.toml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override experiment keys first.")
@device_option("Where prompts missing from a text bank are encoded;")
@click.option("--no-encode", is_flag=True, help="Fail instead of encoding prompts missing from a text bank.")
@budget_option
@cli_errors
def tune(experiment_file: Path, cache_dir: Optional[Path], trials: int, metric: str, scale_range: str, drop_range: str,
         no_weights: bool, search_templates: bool, greedy_templates: bool, seed: int, study: Optional[str],
         out: Optional[Path], overrides: tuple[str, ...], device: str, no_encode: bool,
         max_memory: Optional[str]) -> None:
    """Search weights, scale, drop_below and templates on the validation split; write the best TOML.

    The best trial is written only when it beats the experiment as written; otherwise the file
    holds the experiment itself.
    """
    from embedstore.score.experiment import load_experiment
    from embedstore.tune import study as t

    cache = cache_at(cache_dir)
    exp = load_experiment(experiment_file, overrides)
    encoder, budget = prompt_encoder_for(cache, device, not no_encode), budget_from(max_memory)
    if greedy_templates:
        out = out or experiment_file.with_name(experiment_file.stem + ".greedy.toml")
        g = t.greedy_templates(cache, exp, metric, encoder, budget)
        kept = sum(s["kept"] for s in g.steps)
        t.write_config(out, g.config, [
            f"written by `embedstore tune --greedy-templates` from {experiment_file}",
            f"kept {kept} of {len(g.steps)} templates: validation {metric} {g.best:.4f} on {g.n_val} images "
            f"(all templates: {g.baseline:.4f})"])
        click.echo(table(["template", f"alone {metric}", f"soup {metric}", "kept"],
                          [[s["template"], f"{s['alone']:.4f}", f"{s['with']:.4f}", "yes" if s["kept"] else "no"]
                           for s in g.steps]))
        for note in g.notes:
            click.echo(f"note: {note}")
        click.echo(f"\nkept {kept} of {len(g.steps)} templates: validation {metric} {g.best:.4f}; wrote {out}")
        _log(cache, "tune-templates", {"experiment_file": str(experiment_file), "metric": metric, "best": g.best,
                                       "baseline": g.baseline, "steps": g.steps, "outputs": {"config": str(out)}})
        return
    out = out or experiment_file.with_name(experiment_file.stem + ".best.toml")
    space = t.SearchSpace(not no_weights, _range(scale_range, "--scale-range"), _range(drop_range, "--drop-range"),
                          search_templates)
    report = t.run_study(cache, exp, trials, space, metric, seed, study, encode_prompts=encoder, budget=budget)
    source = (f"trial {report.best_trial} of study {report.study}" if report.improved
              else f"the experiment as written (no trial of study {report.study} scored higher)")
    t.write_config(out, report.best_config, [
        f"written by `embedstore tune` from {experiment_file}: {source}",
        f"validation {metric} {max(report.best_value, report.baseline):.4f} on {report.n_val} images "
        f"(experiment as written: {report.baseline:.4f}); journal {report.storage}"])
    rows = []
    for r in report.top:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r.params.items() if not (k.startswith("t") and k[1:].isdigit()))
        n_t = sum(1 for k, v in r.params.items() if k.startswith("t") and k[1:].isdigit() and v)
        rows.append([r.number, f"{r.value:.4f}", params + (f", templates={n_t}" if search_templates else "")])
    click.echo(table(["trial", metric, "parameters"], rows))
    click.echo(f"\nstudy {report.study}: {report.trials_total} trials ({report.trials_run} new, "
               f"{report.seconds:.1f} s), validation split {report.n_val} images")
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"best {metric} {report.best_value:.4f} (the experiment as written: {report.baseline:.4f}); "
               f"wrote {out} ({source})")
    _log(cache, "tune", {"experiment_file": str(experiment_file), "study": report.study, "storage": report.storage,
                         "metric": metric, "space": space.to_dict(), "baseline": report.baseline,
                         "metrics": {metric.replace("-", "_"): report.best_value}, "best_config": report.best_config,
                         "improved": report.improved, "best_trial": report.best_trial, "notes": report.notes,
                         "trials": report.trials_total, "timings": {"total": report.seconds},
                         "outputs": {"config": str(out)}})


@click.group("heads")
def heads_group() -> None:
    """Linear heads on cached features: train (with WiSE-FT sweeps) and soups."""


@heads_group.command("train")
@click.argument("experiment_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@cache_option
@click.option("--member", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which [[models]] entry's features to train on.")
@click.option("--C", "c_values", default="1", show_default=True, help="Inverse L2 strength(s), comma-separated.")
@click.option("--seeds", default="0", show_default=True, help="Seed(s), comma-separated (oversampling draws).")
@click.option("--balance", type=click.Choice(["none", "class-weight", "oversample"]), default="class-weight",
              show_default=True)
@click.option("--init", type=click.Choice(["zero-shot", "zeros"]), default="zero-shot", show_default=True)
@click.option("--relabel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV key,label of label overrides.")
@click.option("--name", default=None, help="Head name (default: experiment name or dataset, plus -m<member>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@device_option("Where prompts missing from a text bank are encoded;")
@click.option("--no-encode", is_flag=True, help="Fail instead of encoding prompts missing from a text bank.")
@budget_option
@cli_errors
def heads_train(experiment_file: Path, cache_dir: Optional[Path], member: int, c_values: str, seeds: str,
                balance: str, init: str, relabel: Optional[Path], name: Optional[str], overrides: tuple[str, ...],
                device: str, no_encode: bool, max_memory: Optional[str]) -> None:
    """Train linear heads on the training split; report validation metrics and a WiSE-FT sweep."""
    from embedstore.score.experiment import load_experiment
    from embedstore.tune.training import train_heads

    cache = cache_at(cache_dir)
    exp = load_experiment(experiment_file, overrides)
    seed_list = [int(s) for s in _floats(seeds, "--seeds")]
    report = train_heads(cache, exp, _floats(c_values, "--C"), seed_list, balance, init, relabel, member, name,
                         prompt_encoder_for(cache, device, not no_encode), budget_from(max_memory))
    click.echo(f"train {report.n_train} / validation {report.n_val} images; zero-shot head: accuracy "
               f"{report.zero_shot_accuracy:.4f}, macro-F1 {report.zero_shot_macro_f1:.4f}")
    click.echo(table(["head", "val accuracy", "val macro-F1"],
                      [[h.name, f"{h.accuracy:.4f}", f"{h.macro_f1:.4f}"] for h in report.heads]))
    for h in report.heads:
        click.echo(f"\nWiSE-FT {h.name}: (1-a)*zero-shot + a*trained, on the validation split")
        click.echo(table(["alpha", "accuracy", "macro-F1"], [[f"{a:.1f}", f"{acc:.4f}", f"{f1:.4f}"] for a, acc, f1 in h.wise]))
    click.echo("\nuse one in an experiment: [[models]] kind = \"head\", head = NAME, alpha = A, with the member's model")
    _log(cache, "heads", {"experiment_file": str(experiment_file), "zero_shot": {
        "accuracy": report.zero_shot_accuracy, "macro_f1": report.zero_shot_macro_f1},
        "heads": [{"name": h.name, "accuracy": h.accuracy, "macro_f1": h.macro_f1, "wise": h.wise} for h in report.heads],
        "metrics": {"accuracy": max(h.accuracy for h in report.heads), "macro_f1": max(h.macro_f1 for h in report.heads)},
        "resolved": {"dataset": exp.dataset}, "split": report.meta.get("validation")})


@heads_group.command("soup")
@click.argument("experiment_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("heads", nargs=-1, required=True)
@cache_option
@click.option("--mode", type=click.Choice(["greedy", "uniform"]), default="greedy", show_default=True)
@click.option("--metric", type=click.Choice(["accuracy", "macro-f1"]), default="accuracy", show_default=True)
@click.option("--member", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--name", "out_name", required=True, help="Name of the soup head.")
@click.option("--relabel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The label overrides the heads were trained with.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@budget_option
@cli_errors
def heads_soup(experiment_file: Path, heads: tuple[str, ...], cache_dir: Optional[Path], mode: str, metric: str,
               member: int, out_name: str, relabel: Optional[Path], overrides: tuple[str, ...],
               max_memory: Optional[str]) -> None:
    """Average saved HEADS (uniform, or greedy on the validation split) into a new head."""
    from embedstore.score.experiment import load_experiment
    from embedstore.tune.training import soup_heads

    cache = cache_at(cache_dir)
    exp = load_experiment(experiment_file, overrides)
    report = soup_heads(cache, exp, list(heads), mode, out_name, metric, member, relabel, budget_from(max_memory))
    click.echo(table(["ingredient", f"own {metric}", f"soup {metric}", "accepted"],
                      [[s.name, f"{s.own_score:.4f}", "-" if s.soup_score != s.soup_score else f"{s.soup_score:.4f}",
                        "yes" if s.accepted else "no"] for s in report.steps]))
    click.echo(f"\n{mode} soup {report.name}: {len(report.ingredients)} ingredient(s); validation accuracy "
               f"{report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f}")
    _log(cache, "head-soup", {"experiment_file": str(experiment_file), "mode": mode, "name": out_name,
                              "steps": [s.__dict__ for s in report.steps], "resolved": {"dataset": exp.dataset},
                              "metrics": {"accuracy": report.accuracy, "macro_f1": report.macro_f1}})
