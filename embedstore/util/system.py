"""What this machine offers: the CPU cores this process may use, and how its C allocator behaves."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 8  # decoding rarely scales further; more processes only cost memory


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset``
    narrow), falling back to the machine's count where the platform has no affinity."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Default number of decoding workers: the usable cores, at most :data:`MAX_DEFAULT_WORKERS`."""
    return min(usable_cores(), MAX_DEFAULT_WORKERS)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 << 20   # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 512 << 20


def keep_large_blocks_on_the_heap() -> bool:
    """Serve allocations up to 32 MiB from glibc's heap and keep up to 512 MiB freed there for reuse.

    Stage 2 works in row blocks whose temporaries are a few MB each. glibc maps every such
    allocation afresh (mmap) and unmaps it on free, so each block pays a page fault per 4 KB on
    first touch, which on virtual machines costs more than the arithmetic (measured: a 100k-image
    weights-only rerun 0.25 s -> 0.11 s). Raising the mmap and trim thresholds lets blocks reuse
    the same memory; peak memory is unchanged, only returned to the system at exit rather than
    after each block. A no-op (False) where the C library is not glibc. Called by the CLI once.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc thresholds raised: %s", ok)
    return ok
