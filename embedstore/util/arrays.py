"""Array helpers both stages use: float32 conversion for computing and L2-normalised rows."""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embedstore.util.system import usable_cores

__all__ = ["as_f32", "unit_rows"]

PARALLEL_CAST = 1 << 20  # elements above which a float16 block is converted by several threads


def as_f32(x: np.ndarray) -> np.ndarray:
    """float32 view or copy (float16 matrix products are ~400x slower on CPUs). Large float16
    blocks are converted by one thread per usable core: numpy's half-to-single cast is scalar
    code that releases the GIL, and it costs more than a block's matrix product."""
    a = np.asarray(x)
    if a.dtype == np.float32:
        return a
    if a.dtype != np.float16 or a.size < PARALLEL_CAST or a.ndim != 2:
        return a.astype(np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    pool, workers = _cast_pool()
    step = -(-a.shape[0] // workers)
    list(pool.map(lambda i: np.copyto(out[i:i + step], a[i:i + step]), range(0, a.shape[0], step)))
    return out


@functools.lru_cache(maxsize=1)
def _cast_pool() -> tuple[ThreadPoolExecutor, int]:
    """The conversion threads (made on first use) and their number."""
    workers = usable_cores()
    return ThreadPoolExecutor(workers, thread_name_prefix="embedstore-cast"), workers


def unit_rows(features: np.ndarray, copy: bool = True) -> np.ndarray:
    """``features`` as float32 with every row L2-normalised (zero rows stay zero); ``copy=False``
    normalises a float32 array in place."""
    out = np.asarray(features, dtype=np.float32)
    if copy and out is features:  # a float32 input; any other dtype was converted into a new array already
        out = out.copy()
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
    np.divide(out, norms, out=out, where=norms > 0)
    return out
