"""``embedstore serve``: the prompt playground in the browser (see :mod:`embedstore.serve`)."""
from __future__ import annotations

import ipaddress
import secrets
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
    prompt_encoder_for,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _image_encoder(cache: Any, device: str) -> Any:
    """Encodes uploaded images exactly as a store's rows were encoded (refused when it cannot)."""
    from embedstore.encode.image_query import image_vectors

    def encode(spec: Any, store: Any, paths: Any) -> Any:
        return image_vectors(cache, spec, store, paths, device)
    return encode


@click.command()
@click.argument("experiment_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@cache_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but a loopback address prints a warning and requires the random "
                   "access token printed in the URL.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port to bind.")
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where 'save as experiment' writes TOML files (default: the experiment file's folder).")
@device_option("Where new prompts and uploaded images are encoded.")
@click.option("--no-encode", is_flag=True, help="Refuse prompts missing from a text bank instead of encoding them.")
@click.option("--logit-cache", "logit_cache", default=None, metavar="SIZE|off", envvar="EMBEDSTORE_LOGIT_CACHE",
              show_envvar=True, help="Disk budget of the per-prompt logit cache (default 4G).")
@budget_option
@cli_errors
def serve(experiment_file: Optional[Path], cache_dir: Optional[Path], host: str, port: int, save_dir: Optional[Path],
          device: str, no_encode: bool, logit_cache: Optional[str], max_memory: Optional[str]) -> None:
    """Start the prompt playground for EXPERIMENT_FILE (default: the demo's experiment) and print its URL.

    Edit prompts, weights, scale and drop_below and see the metrics and confusion matrix change;
    click a cell for its images, an image for its neighbours; search by text or image; save a
    variant as an experiment file that `embedstore classify` reproduces. Ctrl-C stops it.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        raise click.UsageError(f"embedstore serve needs {exc.name}: pip install 'embedstore[serve]'") from None
    from embedstore.encode.thumbnails import thumbnail
    from embedstore.serve.app import create_app
    from embedstore.serve.playground import Playground

    cache = cache_at(cache_dir)
    if experiment_file is None:
        demo = cache.root / "demo" / "experiment.toml"
        if not demo.is_file():
            raise click.UsageError("give an EXPERIMENT_FILE (or run `embedstore demo` first to serve its experiment)")
        experiment_file = demo
    playground = Playground(cache, experiment_file, prompt_encoder_for(cache, device, not no_encode),
                            _image_encoder(cache, device), thumbnail, budget_from(max_memory, logit_cache), save_dir)
    token = None
    allowed: Optional[list[str]] = ["127.0.0.1", "localhost", "[::1]", "::1"]
    if not _is_loopback(host):
        token = secrets.token_urlsafe(24)
        allowed = None
        click.secho(f"warning: binding {host} makes the playground reachable from other machines; it can read "
                    "the cache and the dataset's images. Anyone with the URL below (its token) can use it.",
                    fg="yellow", err=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/" + (f"?token={token}" if token else "")
    click.echo(f"embedstore playground for {experiment_file} ({playground.experiment.dataset}, "
               f"{len(playground.describe()['members'])} model(s))")
    click.echo(f"open {url}   (Ctrl-C stops it)")
    app = create_app(playground, token, allowed)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        playground.close()
