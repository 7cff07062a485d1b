"""Natural sort order of keys (``img2`` before ``img10``): the order rows, predictions and ids use."""
from __future__ import annotations

from natsort import natsort_keygen

__all__ = ["natural_order"]

_KEY = natsort_keygen()


def natural_order(keys: list[str]) -> list[int]:
    """Indices that put ``keys`` in natural sort order (``img2`` before ``img10``)."""
    return sorted(range(len(keys)), key=lambda i: _KEY(keys[i]))
