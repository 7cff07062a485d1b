"""Helpers shared by the command modules: option decorators, error handling, tables."""
from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import click

from embedstore.errors import EmbedstoreError, WriteFailedError
from embedstore.store.cache import Cache
from embedstore.store.spec import EncoderSpec
from embedstore.store.views import (
    INTERPOLATIONS,
    RESIZE_MODES,
    ViewOptions,
    parse_triplet,
)
from embedstore.util.budget import Budget, parse_bytes


def setup_logging(verbose: int) -> None:
    """Warnings by default; ``-v`` info, ``-vv`` debug."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("embedstore").setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.getLogger().setLevel(logging.INFO if verbose > 1 else logging.WARNING)  # open_clip logs to root


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so a terminated command unwinds like Ctrl-C: the
    store writer commits what is encoded, decoding workers are shut down, temp files removed."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def os_error_message(exc: OSError) -> str:
    """``what, where, what to do`` for an OS (or HDF5) error that reached the command line."""
    import errno

    where = exc.filename or ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return str(WriteFailedError(where or "a file", exc))
    if isinstance(exc, PermissionError):
        return f"permission denied: {where}; fix its permissions or use another --cache"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {where}; check the path"
    if isinstance(exc, IsADirectoryError):
        return f"{where} is a folder where a file was expected; check the path"
    if isinstance(exc, NotADirectoryError):
        return f"a part of {where} is a file where a folder was expected; check the path (and --cache)"
    reason = exc.strerror or str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{reason}" + (f": {where}" if where else "") + "; check the file (run `embedstore verify` for cache files)"


def verbosity() -> int:
    ctx = click.get_current_context(silent=True)
    return int(ctx.find_root().params.get("verbose") or 0) if ctx is not None else 0


def fail(message: str, code: int = 1) -> None:
    if verbosity():
        traceback.print_exc()
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command so that every failure is one ``error: what, where, what to do`` line and a
    non-zero exit (the traceback only with ``-v``): embedstore's own errors, OS and HDF5 errors,
    and anything unexpected (said to be a bug). SIGTERM unwinds like Ctrl-C (exit 143, 130)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _terminate_as_interrupt():
                return fn(*args, **kwargs)
        except EmbedstoreError as exc:
            fail(str(exc))
        except Terminated:
            click.secho("terminated: committed rows are kept; run the same command again to resume", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.secho("interrupted: committed rows are kept; run the same command again to resume", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OSError as exc:
            fail(os_error_message(exc))
        except MemoryError:
            fail("out of memory; use a smaller --batch-size, fewer --workers, or a machine with more memory")
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a raw traceback
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            fail(f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")
                  + "; this is a bug in embedstore: run the command again with -v and report the traceback")
    return wrapper


def cache_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        envvar="EMBEDSTORE_CACHE", show_envvar=True, help="Cache root (default ./cache).",
    )(fn)


def budget_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--max-memory", "max_memory", default=None, envvar="EMBEDSTORE_MAX_MEMORY", show_envvar=True,
        help="Memory budget of stage 2 (e.g. 2G, 512M); default min(2 GiB, RAM/4). Work is done in row blocks "
             "sized from it; a run that cannot fit says what it needs.",
    )(fn)


def budget_from(max_memory: Optional[str], logit_cache: Optional[str] = None) -> Budget:
    """The memory budget of ``--max-memory`` and ``--logit-cache`` (``off``: no logit cache)."""
    memory = parse_bytes(max_memory, "--max-memory") if max_memory else None
    cache_bytes = None
    if logit_cache is not None:
        cache_bytes = 0 if logit_cache.strip().lower() == "off" else parse_bytes(logit_cache, "--logit-cache")
    return Budget.default(memory, cache_bytes)


def prompt_encoder_for(cache: Any, device: str, encode: bool = True) -> Any:
    """What stage-2 commands use to encode prompts missing from a text bank (None: refuse them)."""
    if not encode:
        return None
    from embedstore.encode.loop import prompt_encoder

    return prompt_encoder(cache, device)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--trust-remote-code", is_flag=True,
                      help="Allow transformers models that run code from their repository (off by default).")(fn)
    fn = click.option("--pretrained", default=None,
                      help="open_clip pretrained tag (e.g. laion2b_s34b_b79k) or checkpoint path.")(fn)
    fn = click.option("--model", "model", required=True,
                      help="open_clip name (ViT-B-32), hf-hub:ORG/REPO, local-dir:PATH, or hf:REPO_OR_DIR.")(fn)
    return fn


def view_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--sharpness", type=float, default=None,
                      help="PIL ImageEnhance.Sharpness factor applied after resize (seed: 2.0 / 2.3).")(fn)
    fn = click.option("--std", default=None, help="Normalisation std, e.g. 0.5,0.5,0.5.")(fn)
    fn = click.option("--mean", default=None, help="Normalisation mean, e.g. 0.5,0.5,0.5.")(fn)
    fn = click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None, help="Resize filter.")(fn)
    fn = click.option("--size", type=click.IntRange(min=1), default=None, help="Input side in pixels.")(fn)
    fn = click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default=None,
                      help="squash: exact square (seed); shortest: shortest side then centre crop; "
                           "longest: longest side then pad to a square.")(fn)
    return fn


DEVICES = ("auto", "cpu", "cuda")


def device_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--device auto|cpu|cuda`` (default auto: the GPU when one is visible) with ``what`` it is for."""
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help=f"{what} auto: the GPU when one is visible, else the CPU.")


def spec_from(model: str, pretrained: Optional[str], trust_remote_code: bool, random_weights: bool = False) -> EncoderSpec:
    """The encoder spec of the model options."""
    return EncoderSpec(model, pretrained, trust_remote_code, random_weights)


def random_weights_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--random-weights``: the explicit ask for seeded random weights (commands that load a new encoder)."""
    return click.option("--random-weights", is_flag=True,
                        help="Allow a model without weights (no --pretrained, or a local-dir: folder without a "
                             "checkpoint): seeded random weights, for tests and benchmarks. Refused otherwise.")(fn)


def view_from(resize_mode: Optional[str], size: Optional[int], interpolation: Optional[str], mean: Optional[str],
          std: Optional[str], sharpness: Optional[float]) -> ViewOptions:
    """The view options given on the command line (unset ones keep the encoder's default view)."""
    return ViewOptions(
        resize_mode=resize_mode, size=size, interpolation=interpolation,
        mean=parse_triplet(mean, "--mean") if mean else None,
        std=parse_triplet(std, "--std") if std else None,
        sharpness=sharpness,
    )


def cache_at(cache_dir: Optional[Path]) -> Cache:
    """The cache at ``--cache`` (default: ``EMBEDSTORE_CACHE`` or ``./cache``)."""
    return Cache(cache_dir)


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with a header rule, columns as wide as their widest cell."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
