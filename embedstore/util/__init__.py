"""Small helpers both stages use: arrays, memory budget, files, natural order, progress, system facts.

The names below are this package's public surface; other modules are its implementation.
"""

from __future__ import annotations

from embedstore.util.arrays import as_f32 as as_f32
from embedstore.util.arrays import unit_rows as unit_rows
from embedstore.util.budget import Budget as Budget
from embedstore.util.budget import parse_bytes as parse_bytes
from embedstore.util.order import natural_order as natural_order
from embedstore.util.progress import progress_bar as progress_bar

__all__ = ["Budget", "as_f32", "natural_order", "parse_bytes", "progress_bar", "unit_rows"]
