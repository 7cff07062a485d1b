"""Memory and disk budgets of stage 2: sizes that never grow with the number of images or prompts.

Stage 2 sizes everything it allocates from a :class:`Budget` rather than from the data: row blocks
are as tall as the per-block share allows, results that grow as images x prompts are kept in
memory only while they fit, and a request that cannot fit at all is refused with
:class:`BudgetError`, naming what it needs and what to change.

Defaults: ``--max-memory`` / ``$EMBEDSTORE_MAX_MEMORY``, else the smaller of 2 GiB and a quarter
of the machine's physical memory; the per-prompt logit cache on disk takes at most
``$EMBEDSTORE_LOGIT_CACHE`` (default 4 GiB; ``0`` or ``off`` turns it off).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from embedstore.errors import BudgetError, SpecError

MEMORY_ENV = "EMBEDSTORE_MAX_MEMORY"
LOGIT_CACHE_ENV = "EMBEDSTORE_LOGIT_CACHE"
GiB = 1 << 30
MiB = 1 << 20
DEFAULT_MEMORY_CAP = 2 * GiB
DEFAULT_LOGIT_CACHE = 4 * GiB
BLOCK_TARGET = 64 * MiB    # working memory of one row block (temporaries stay near the CPU caches' scale)
MIN_BLOCK_ROWS = 16        # below this a matrix product wastes the CPU

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str, what: str = "size") -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (binary units).

    Raises:
        SpecError: not a size (the message names ``what``).
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise SpecError(f"{what} {text!r}: expected a size such as 8G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def physical_memory() -> Optional[int]:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def default_memory() -> int:
    """``$EMBEDSTORE_MAX_MEMORY`` if set, else min(2 GiB, physical memory / 4)."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        return parse_bytes(env, f"${MEMORY_ENV}")
    phys = physical_memory()
    return min(DEFAULT_MEMORY_CAP, phys // 4) if phys else DEFAULT_MEMORY_CAP


def default_logit_cache() -> int:
    """``$EMBEDSTORE_LOGIT_CACHE`` (``off`` or ``0`` disables it), else 4 GiB."""
    env = os.environ.get(LOGIT_CACHE_ENV)
    if env is None or not env.strip():
        return DEFAULT_LOGIT_CACHE
    return 0 if env.strip().lower() in ("off", "none", "0") else parse_bytes(env, f"${LOGIT_CACHE_ENV}")


def human(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class Budget:
    """Bytes stage 2 may hold in memory (``memory``) and keep as per-prompt logits on disk
    (``logit_cache``; 0 disables the cache)."""

    memory: int
    logit_cache: int = DEFAULT_LOGIT_CACHE
    block: Optional[int] = None  # bytes of one row block's working memory (default: see block_bytes)

    def __post_init__(self) -> None:
        if self.memory < 64 * MiB:
            raise SpecError(f"--max-memory {human(self.memory)}: stage 2 needs at least 64 MiB")
        if self.logit_cache < 0:
            raise SpecError("logit cache budget: must be >= 0")

    @classmethod
    def default(cls, memory: Optional[int] = None, logit_cache: Optional[int] = None) -> "Budget":
        """The budget from the arguments, falling back to the environment and machine defaults."""
        return cls(memory if memory is not None else default_memory(),
                   logit_cache if logit_cache is not None else default_logit_cache())

    @property
    def block_bytes(self) -> int:
        """Working memory of one row block: 64 MiB, at most an eighth of the budget."""
        return self.block if self.block is not None else min(BLOCK_TARGET, self.memory // 8)

    @property
    def memo_bytes(self) -> int:
        """What a session may keep between runs (per-member scores, so weight changes are instant)."""
        return self.memory // 2

    def block_rows(self, bytes_per_row: int) -> int:
        """Rows per block when each row needs ``bytes_per_row`` of temporaries (at least
        :data:`MIN_BLOCK_ROWS`, or 1 when ``block`` was set explicitly)."""
        floor = 1 if self.block is not None else MIN_BLOCK_ROWS
        return max(floor, self.block_bytes // max(1, bytes_per_row))

    def fits(self, nbytes: int, share: float = 1.0) -> bool:
        """Whether ``nbytes`` fit in ``share`` of the memory budget."""
        return nbytes <= self.memory * share

    def require(self, nbytes: int, what: str, advice: str) -> None:
        """Raise :class:`BudgetError` unless ``nbytes`` fit the memory budget."""
        if nbytes > self.memory:
            raise BudgetError(f"{what} needs {human(nbytes)}, more than the memory budget of {human(self.memory)}; "
                              f"{advice} (or raise --max-memory / ${MEMORY_ENV})")
