"""``embedstore vote``: hard voting over prediction CSVs joined by key (see :mod:`embedstore.tune.vote`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from embedstore.cli.common import cache_at, cache_option, cli_errors
from embedstore.tune.vote import OUTPUT_FORMATS, TIE_RULES


@click.command("vote")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output CSV key,label,label_index,votes (default: <cache>/runs/<run id>/voted.csv).")
@click.option("--ties", "tie", type=click.Choice(TIE_RULES), default="confidence", show_default=True,
              help="confidence: the tied label with the highest probability summed over its voters; "
                   "first: the tied label of the first-listed file.")
@click.option("--split", "split", default=None, metavar="NAME=N,...",
              help="Vote per attribute of a composite integer label; numbers of values per attribute, most "
                   "significant first. The seed's 6*mask + 3*gender + age is mask=3,gender=2,age=3 (or 3,2,3).")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default="auto", show_default=True,
              help="csv: key,label,label_index,votes; ajou: the seed's id_idx,label submission; auto: ajou when "
                   "every input is a --format ajou file.")
@cache_option
@cli_errors
def vote(files: tuple[Path, ...], out: Optional[Path], tie: str, split: Optional[str], fmt: str,
         cache_dir: Optional[Path]) -> None:
    """Hard-vote the prediction CSVs FILES (key and label columns, or the id_idx,label files of
    classify --format ajou), joined by key.

    Every key must be in every file once. Rows come out in natural key order; each vote is logged
    in <cache>/runs.jsonl (kind "vote").
    """
    from embedstore.report.predictions import append_log, new_run_id
    from embedstore.tune.vote import (
        output_format,
        parse_split,
        vote_files,
        vote_log_entry,
        write_votes,
    )

    outcome = vote_files([str(f) for f in files], tie=tie, split=parse_split(split) if split else None)
    fmt = output_format(outcome, fmt)
    cache = cache_at(cache_dir)
    run_id = new_run_id()
    out = out or cache.root / "runs" / run_id / ("submission.csv" if fmt == "ajou" else "voted.csv")
    outputs = {"predictions": str(write_votes(outcome, out, fmt))}
    append_log(cache.root, vote_log_entry(outcome, run_id, outputs))
    counts = outcome.counts()
    how = f"per attribute {outcome.split.describe()}" if outcome.split else "by label"
    click.echo(f"vote {run_id}: {len(outcome.keys)} keys from {len(files)} files, voted {how}: "
               f"{counts['unanimous']} unanimous, {counts['majority']} majority, {counts['tied']} tied "
               f"(ties: {tie})")
    if outcome.attribute_ties:
        click.echo("ties per attribute: " + ", ".join(f"{k} {v}" for k, v in outcome.attribute_ties.items()))
    click.echo(f"label_index order: {outcome.label_order}")
    for note in outcome.notes:
        click.echo(f"note: {note}")
    click.echo(f"predictions: {outputs['predictions']}")
