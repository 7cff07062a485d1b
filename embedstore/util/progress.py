"""Progress bars: tqdm on stderr, and the switches that show or hide them all.

Long steps (encoding images or prompts, index builds, checkpoint soups, the demo's toy training)
show a bar on stderr, so stdout stays the command's result. ``EMBEDSTORE_PROGRESS`` decides:
``auto`` (the default) shows bars when stderr is a terminal, ``always`` shows them anywhere (logs,
tests), ``never`` hides them. A caller hides its bar with ``progress=False`` (``encode
--no-progress``), and ``embedstore --no-progress COMMAND`` hides every bar of the command.
"""
from __future__ import annotations

import contextvars
import os
import sys
from typing import Any, Optional

ENV_VAR = "EMBEDSTORE_PROGRESS"
MODES = ("auto", "always", "never")
_HIDDEN: contextvars.ContextVar[bool] = contextvars.ContextVar("embedstore_progress_hidden", default=False)


def hide_progress(hidden: bool = True) -> None:
    """Hide (or show again) every bar started later in this context (the CLI's ``--no-progress``)."""
    _HIDDEN.set(hidden)


def progress_enabled(requested: bool = True) -> bool:
    """Whether a bar the caller ``requested`` is shown (see the module docstring)."""
    if not requested or _HIDDEN.get():
        return False
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode == "always":
        return True
    if mode == "never":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm`` bar on stderr (a disabled one when :func:`progress_enabled` says no); use it as a
    context manager (or ``close()`` it) and call ``update(n)``."""
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.5)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress_enabled(enabled),
                dynamic_ncols=True, **kwargs)
