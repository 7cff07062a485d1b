"""Helpers shared by the benchmark scripts (never imported by the package)."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def machine_info() -> dict:
    """CPU model, cores, load and library versions (for the header of a benchmark's report)."""
    import importlib.metadata as md

    import h5py
    import numpy as np

    blas = "?"
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    except (TypeError, KeyError):
        pass
    try:
        embedstore_version = md.version("embedstore")
    except md.PackageNotFoundError:
        embedstore_version = "absent"
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable_cores(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "embedstore": embedstore_version}


def machine_busy_seconds():
    """CPU seconds all processes have used since boot (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_load(busy0, own0: float, wall: float):
    """Share of the machine's CPUs that other processes used since ``busy0``/``own0`` (0..1)."""
    busy1 = machine_busy_seconds()
    if busy0 is None or busy1 is None or wall <= 0:
        return None
    other = (busy1 - busy0) - (own_cpu_seconds() - own0)
    return max(0.0, other) / (wall * (os.cpu_count() or 1))


def markdown_table(headers, rows) -> str:
    """A markdown table of string cells."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]

    def line(c):
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(c, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
