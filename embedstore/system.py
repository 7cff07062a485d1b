"""What this machine offers the encode loop: the CPU cores this process may use."""
from __future__ import annotations

import os

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
