"""``embedstore rm``: remove stores, text banks, empty stores and derived data (see :mod:`embedstore.store.remove`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from embedstore.cli.common import (
    cache_at,
    cache_option,
    cli_errors,
    human_size,
    spec_from,
    table,
    view_from,
    view_options,
)


@click.command("rm")
@click.option("--dataset", default=None, help="Remove this dataset's stores (with their indexes and logits).")
@click.option("--model", default=None, help="Only the stores (or with --texts, the text bank) of this encoder.")
@click.option("--pretrained", default=None, help="The encoder's pretrained tag or checkpoint, as it was encoded.")
@view_options
@click.option("--texts", is_flag=True, help="Remove the text bank of --model.")
@click.option("--empty", is_flag=True, help="Remove stores without rows (runs where every image failed or that "
                                            "were killed before their first commit).")
@click.option("--index", "index", is_flag=True, help="With --dataset: remove only the saved indexes.")
@click.option("--logits", is_flag=True, help="Remove the logit cache (<cache>/logits; recomputed on demand).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@cache_option
@cli_errors
def rm(dataset: Optional[str], model: Optional[str], pretrained: Optional[str], resize_mode: Optional[str],
       size: Optional[int], interpolation: Optional[str], mean: Optional[str], std: Optional[str],
       sharpness: Optional[float], texts: bool, empty: bool, index: bool, logits: bool, dry_run: bool, yes: bool,
       cache_dir: Optional[Path]) -> None:
    """Remove what is no longer wanted from the cache, asking first (-y: do not ask).

    A store being written (or an index being built) is refused, naming the writer, and nothing
    is removed.
    """
    from embedstore.store.remove import plan_removal, remove

    if pretrained and not model:
        raise click.UsageError("--pretrained needs --model")
    cache = cache_at(cache_dir)
    spec = spec_from(model, pretrained, False) if model else None
    view = view_from(resize_mode, size, interpolation, mean, std, sharpness)
    targets = plan_removal(cache, dataset, spec, view, texts=texts, empty=empty, index=index, logits=logits)
    if not targets:
        click.echo(f"nothing to remove in {cache.root}")
        return
    total = sum(t.bytes for t in targets)
    click.echo(table(["remove", "size", "path"], [[t.what, human_size(t.bytes), t.path] for t in targets]))
    if dry_run:
        click.echo(f"dry run: {len(targets)} item(s), {human_size(total)} would be removed")
        return
    if not yes:
        click.confirm(f"remove {len(targets)} item(s), {human_size(total)}?", abort=True)
    freed = remove(cache, targets)
    click.echo(f"removed {len(targets)} item(s), {human_size(freed)} freed")
