"""FAISS on arrays: choose an index kind, build it, tune it to a recall target, search it.

Everything here takes and returns plain arrays, as faiss ``contrib/`` does: float32 ``(n, d)``
L2-normalised features (inner product = cosine similarity) and int64 ids. Store files, keys and
staleness live in :mod:`embedstore.search.index`.

Kinds (``--kind``): ``flat`` (exact ``IndexFlatIP``), ``ivf`` (``IVF{nlist},Flat``), ``hnsw``
(``HNSW32``), ``pq`` (``IVF{nlist},PQ{m}x8``), any FAISS factory string, or ``auto``, which picks as
autofaiss does from the row count and a memory budget: exact search for small stores, IVF with
full vectors when they fit the budget, IVF-PQ when they do not. IVF builds in seconds on a CPU
where HNSW takes minutes (``scripts/bench_index.py``), so ``auto`` never picks HNSW; ask for it
when single-query latency matters more than build time.

Approximate indexes are tuned while building (:func:`build_tuned`): a sample of rows is held
out, the index is built from the rest, ``nprobe`` (IVF) or ``efSearch`` (HNSW) is raised until
recall@k of the held-out rows against exact search reaches the target, then they are added.
In-place updates re-tune with :func:`tune` (indexed rows as queries, each one's own row left out).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from embedstore.errors import SpecError

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw", "pq")
FLAT_MAX_ROWS = 100_000      # auto: exact search below this (well under 10 ms per query at d=1024)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80  # FAISS's default 40 builds a graph that tops out near 0.8 recall@10 at 1M x 768
IVF_TRAIN_PER_LIST = 40      # training sample: this many rows per inverted list (FAISS warns below 39)
IVF_TRAIN_ITERATIONS = 10
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512, 1024, 2048)
HOLDOUT_MARGIN = 32          # extra exact neighbours fetched so k remain after dropping held-out rows


def faiss_module() -> Any:
    """Import faiss lazily (it takes a noticeable part of a second)."""
    import faiss

    return faiss


# ---- choosing a kind ---------------------------------------------------------------------------
def nlist_for(n: int) -> int:
    """Number of IVF lists for ``n`` rows: the power of two nearest ``4 * sqrt(n)`` (FAISS's guideline
    is 4 to 16 times sqrt(n)), at most ``n / 39`` (FAISS's minimum of training points per list)."""
    if n < 39 * 8:
        return 1
    nearest = 2 ** round(math.log2(4 * math.sqrt(n)))
    most = 2 ** int(math.log2(n // 39))
    return int(min(65536, nearest, most))


def memory_estimate(factory: str, n: int, d: int) -> int:
    """Approximate bytes an index of ``n`` rows takes in memory (vectors, ids, graph, centroids)."""
    parts = factory.replace(" ", "").split(",")
    total = 8 * n  # ids (IndexIDMap or the IVF lists)
    for part in parts:
        if part.startswith("IVF"):
            nlist = int("".join(ch for ch in part[3:] if ch.isdigit()) or 1)
            total += nlist * d * 4
        elif part.startswith("HNSW"):
            m = int("".join(ch for ch in part[4:] if ch.isdigit()) or HNSW_M)
            total += n * d * 4 + n * m * 2 * 4 + n * 8
        elif part.startswith("PQ"):
            m = int(part[2:].split("x")[0])
            total += n * m
        elif part == "Flat":
            total += n * d * 4
    return total


def pq_factory(n: int, d: int, max_memory: int) -> str:
    """The IVF-PQ factory with the most sub-quantisers (bytes per vector) that fits ``max_memory``."""
    nlist = nlist_for(n)
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if d % m == 0 and memory_estimate(f"IVF{nlist},PQ{m}x8", n, d) <= max_memory:
            return f"IVF{nlist},PQ{m}x8"
    need = memory_estimate(f"IVF{nlist},PQ4x8", n, d)
    raise SpecError(f"--max-memory {max_memory:,} bytes is too small for {n:,} rows of width {d} "
                    f"(the smallest IVF-PQ index needs about {need:,})")


def choose_factory(kind: str, n: int, d: int, max_memory: Optional[int] = None) -> str:
    """Turn ``kind`` (see the module docstring) into a FAISS factory string for ``n`` rows of width ``d``.

    Raises:
        SpecError: an unknown kind, a factory string FAISS refuses, or a budget nothing fits.
    """
    if n <= 0:
        raise SpecError("cannot build an index over an empty store")
    budget = max_memory if max_memory is not None else 1 << 62
    nlist = nlist_for(n)
    if kind == "flat":
        return "Flat"
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M}"
    if kind == "pq":
        return pq_factory(n, d, budget)
    if kind == "auto":
        if n <= FLAT_MAX_ROWS and memory_estimate("Flat", n, d) <= budget:
            return "Flat"
        if memory_estimate(f"IVF{nlist},Flat", n, d) <= budget:
            return f"IVF{nlist},Flat" if nlist > 1 else "Flat"
        return pq_factory(n, d, budget)
    faiss = faiss_module()
    try:
        faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise SpecError(f"--kind {kind!r}: not one of {', '.join(KINDS)} and not a FAISS factory string "
                        f"FAISS accepts ({first})") from None
    return kind


# ---- building ---------------------------------------------------------------------------------
def unwrap(index: Any) -> Any:
    """The innermost index below IDMap / pre-transform / refine wrappers (where nprobe lives)."""
    faiss = faiss_module()
    idx = faiss.downcast_index(index)
    while True:
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            idx = faiss.downcast_index(idx.index)
        elif isinstance(idx, faiss.IndexRefine):
            idx = faiss.downcast_index(idx.base_index)
        else:
            return idx


def supports_removal(index: Any) -> bool:
    """True for indexes whose rows can be removed in place (flat and IVF; not HNSW)."""
    faiss = faiss_module()
    inner = unwrap(index)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVF))


def empty_index(d: int, factory: str, seed: int = 0, device: str = "cpu") -> Any:
    """An untrained index for ``factory`` that takes ids (IDMap around kinds without their own ids)."""
    faiss = faiss_module()
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        inner.cp.niter = IVF_TRAIN_ITERATIONS
        inner.cp.seed = seed
        if isinstance(inner, faiss.IndexIVFPQ):
            inner.pq.cp.niter = IVF_TRAIN_ITERATIONS
            inner.pq.cp.seed = seed
            inner.do_polysemous_training = False  # only for Hamming pre-filtering, which we do not use; 50x the training time
    else:
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap2(index)
    if device == "cuda":
        index = to_gpu(index)
    return index


def training_rows_needed(factory: str) -> tuple[int, str]:
    """The fewest training rows FAISS accepts for ``factory``, and why: an IVF index learns one
    centroid per list, a product quantiser ``2**nbits`` centroids per sub-vector (256 for the
    usual 8 bits). ``(0, "")`` for kinds that need no training."""
    need, why = 0, ""
    for part in factory.replace(" ", "").split(","):
        ivf = re.fullmatch(r"IVF(\d+)(?:_HNSW\d+)?", part)
        pq = re.fullmatch(r"(?:OPQ\d+(?:_\d+)?|PQ(\d+)(?:x(\d+))?(?:np)?)", part)
        if ivf and int(ivf.group(1)) > need:
            need, why = int(ivf.group(1)), f"one per inverted list of {part}"
        elif pq and pq.group(1):
            bits = int(pq.group(2) or 8)
            if 2 ** bits > need:
                need, why = 2 ** bits, f"{part} learns {2 ** bits} centroids per sub-vector"
    return need, why


def check_size(factory: str, n: int) -> None:
    """Raise :class:`SpecError` when ``n`` rows are too few to train ``factory``, saying what it needs."""
    need, why = training_rows_needed(factory)
    if n < need:
        smaller = " or a kind with fewer centroids (e.g. 4-bit PQ codes: IVF1,PQ8x4)" if n >= 16 else ""
        raise SpecError(f"{factory} needs at least {need:,} rows to train ({why}); the store has {n:,}. Use "
                        f"--kind flat (exact) or ivf for a store this small{smaller}")


def train(index: Any, features: np.ndarray, rows: Optional[np.ndarray] = None, seed: int = 0,
          factory: str = "") -> None:
    """Train ``index`` (if it needs it) on a seeded sample of ``features[rows]``.

    Raises:
        SpecError: too few rows for ``factory`` (:func:`training_rows_needed`), or FAISS refused
            the training (its message quoted).
    """
    if index.is_trained:
        return
    rows = np.arange(len(features)) if rows is None else rows
    check_size(factory, len(rows))
    n_train = min(len(rows), max(IVF_TRAIN_PER_LIST * _nlist(index), 10_000))
    chosen = np.sort(np.random.default_rng(seed).choice(rows, n_train, replace=False)) if n_train < len(rows) else rows
    try:
        index.train(np.ascontiguousarray(features[chosen], dtype=np.float32))
    except RuntimeError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise SpecError(f"{factory or 'the index'}: FAISS cannot train it on {len(chosen):,} rows "
                        f"({lines[-1] if lines else 'no message'})") from None


def build(features: np.ndarray, ids: np.ndarray, factory: str, seed: int = 0, device: str = "cpu") -> Any:
    """Train (on a seeded sample, when needed) and fill an index with ``features`` under ``ids``.

    ``device="cuda"`` trains and fills a GPU copy (faiss-gpu) and returns it; save it with
    :func:`to_cpu` first.
    """
    check_size(factory, len(features))
    index = empty_index(features.shape[1], factory, seed, device)
    train(index, features, seed=seed, factory=factory)
    add(index, features, ids)
    return index


def build_tuned(features: np.ndarray, ids: np.ndarray, factory: str, target: float = 0.95, k: int = 10,
                sample: int = 1000, seed: int = 0, device: str = "cpu",
                on_stage: Optional[Callable[[str], None]] = None) -> tuple[Any, "Tuning"]:
    """Build an index and tune nprobe/efSearch on a truly held-out sample.

    ``sample`` rows (at most a tenth of them) are left out while the index is trained and
    filled; they query it, their exact neighbours among the indexed rows are the truth, the
    search parameter is raised until recall@k reaches ``target``; then they are added too.
    The returned :class:`Tuning` says whether the target was reached (:attr:`Tuning.reached`).
    ``on_stage`` is told each stage as it starts (``train``, ``add``, ``tune``), for progress output.
    """
    stage = on_stage or (lambda name: None)
    check_size(factory, len(features))
    index = empty_index(features.shape[1], factory, seed, device)
    n = len(features)
    m = min(sample, n // 10)
    need, _ = training_rows_needed(factory)
    if need <= n < need + m:
        m = n - need  # hold out fewer rows so that enough remain to train on
    if search_parameter(index) is None or m < 1:
        stage("train")
        train(index, features, seed=seed, factory=factory)
        stage("add")
        add(index, features, ids)
        if is_exact(index):
            return index, Tuning(None, None, 1.0, min(k, max(1, n - 1)), 0, target)
        stage("tune")
        return index, tune(index, features, ids, target, k, sample, seed)  # no row to spare: measured in place
    held = np.sort(np.random.default_rng(seed + 1).choice(n, m, replace=False))
    kept = np.ones(n, dtype=bool)
    kept[held] = False
    kept_rows = np.flatnonzero(kept)
    stage("train")
    train(index, features, kept_rows, seed, factory)
    stage("add")
    for start in range(0, len(kept_rows), 65_536):
        chunk = kept_rows[start:start + 65_536]
        add(index, features[chunk], np.asarray(ids)[chunk])
    k_eff = max(1, min(k, len(kept_rows)))
    queries = np.ascontiguousarray(features[held], dtype=np.float32)
    _, exact = exact_knn(features, queries, min(n, k_eff + HOLDOUT_MARGIN))
    truth = np.full((m, k_eff), -1, dtype=np.int64)
    for i, row in enumerate(exact):
        others = row[kept[row]][:k_eff]  # neighbours that are in the index (held-out rows are not)
        truth[i, :len(others)] = np.asarray(ids)[others]
    stage("tune")
    tuning = _raise_until(index, queries, truth, k_eff, target, m, lambda found: found)
    add(index, features[held], np.asarray(ids)[held])
    return index, tuning
def _nlist(index: Any) -> int:
    inner = unwrap(index)
    return int(getattr(inner, "nlist", 1))


def add(index: Any, features: np.ndarray, ids: np.ndarray, chunk: int = 65_536) -> None:
    """Add rows in chunks (bounded temporary memory)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    for start in range(0, len(x), chunk):
        index.add_with_ids(x[start:start + chunk], ids[start:start + chunk])


def remove(index: Any, ids: np.ndarray) -> int:
    """Remove ``ids`` in place; returns how many were removed."""
    if len(ids) == 0:
        return 0
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))


# ---- search parameters ------------------------------------------------------------------------
def search_parameter(index: Any) -> Optional[str]:
    """``"nprobe"``, ``"efSearch"`` or None (exact or nothing to tune)."""
    faiss = faiss_module()
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return "nprobe"
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    return None


def is_exact(index: Any) -> bool:
    """True for flat (brute-force) indexes, whose results are the exact neighbours."""
    faiss = faiss_module()
    inner = unwrap(index)
    return isinstance(inner, faiss.IndexFlat) or type(inner).__name__.startswith("GpuIndexFlat")


def set_search_parameter(index: Any, value: int) -> None:
    """Set ``nprobe`` / ``efSearch`` on the index (no-op for exact indexes)."""
    faiss = faiss_module()
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = int(min(value, inner.nlist))
    elif isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(value)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(m, k)``, best first; missing neighbours have id -1.

    Raises:
        SpecError: the query width differs from the index width.
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != index.d:
        raise SpecError(f"query width {q.shape[1]} does not match the index width {index.d}")
    scores, ids = index.search(q, int(k))
    return scores, ids


def exact_knn(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` over ``database`` rows (ids = row numbers)."""
    faiss = faiss_module()
    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                     np.ascontiguousarray(database, dtype=np.float32), int(k), metric=faiss.METRIC_INNER_PRODUCT)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each ``truth`` row's ids (``-1`` = none) present in the same ``found`` row."""
    total = int((truth >= 0).sum())
    if total == 0:
        return 1.0
    hits = sum(len(set(f.tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    return hits / total


def _without_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(ids, self_ids)):
        kept = row[(row != me) & (row >= 0)][:k]
        out[i, :len(kept)] = kept
    return out


@dataclass(frozen=True)
class Tuning:
    """What :func:`tune` chose and measured."""

    parameter: Optional[str]   # "nprobe", "efSearch" or None (exact)
    value: Optional[int]
    recall: float              # recall@k of the sample at that value
    k: int
    sample: int
    target: float

    @property
    def reached(self) -> bool:
        """Whether the measured recall meets the target."""
        return self.recall >= self.target

    def describe(self) -> str:
        """One line for logs and the CLI."""
        setting = f" at {self.parameter}={self.value}" if self.parameter else " (exact)"
        return f"recall@{self.k} {self.recall:.3f}{setting}, measured on {self.sample} sampled rows"


def tune(index: Any, features: np.ndarray, ids: np.ndarray, target: float = 0.95, k: int = 10,
         sample: int = 1000, seed: int = 0) -> Tuning:
    """Re-tune an index that already holds ``features``/``ids`` (after an in-place update).

    Queries are sampled indexed rows; each query's own row is excluded from both the exact and
    the approximate neighbours. Slightly optimistic for HNSW (a query that is in the graph helps
    the search find its neighbourhood); full builds use :func:`build_tuned`'s true hold-out.
    """
    parameter = search_parameter(index)
    n = len(features)
    m = min(sample, n)
    k_eff = max(1, min(k, n - 1))
    if n < 2 or is_exact(index):
        return Tuning(None, None, 1.0, k_eff, m, target)
    rows = np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    queries = np.ascontiguousarray(features[rows], dtype=np.float32)
    own = np.asarray(ids)[rows]
    _, exact = exact_knn(features, queries, k_eff + 1)
    truth = _without_self(np.asarray(ids)[exact], own, k_eff)
    if parameter is None:  # lossy but nothing to tune (PQ, SQ codes): measured, never assumed exact
        _, found = search(index, queries, k_eff + 1)
        recall = recall_at_k(_without_self(found, own, k_eff), truth)
        if recall < target:
            log.warning("index reaches recall@%d %.3f, below the target %.2f (it has no search parameter to raise)",
                        k_eff, recall, target)
        return Tuning(None, None, recall, k_eff, m, target)
    return _raise_until(index, queries, truth, k_eff, target, m, lambda found: _without_self(found, own, k_eff),
                        extra=1)


def _raise_until(index: Any, queries: np.ndarray, truth: np.ndarray, k: int, target: float, m: int,
                 clean: Any, extra: int = 0) -> Tuning:
    """Try nprobe/efSearch steps in increasing order; keep the first reaching ``target`` (else the best)."""
    parameter = search_parameter(index)
    steps = NPROBE_STEPS if parameter == "nprobe" else EF_SEARCH_STEPS
    limit = _nlist(index) if parameter == "nprobe" else max(EF_SEARCH_STEPS)
    best = Tuning(parameter, None, -1.0, k, m, target)
    for value in steps:
        if parameter == "efSearch" and value < k + extra:
            continue
        set_search_parameter(index, value)
        _, found = search(index, queries, k + extra)
        recall = recall_at_k(clean(found), truth)
        log.debug("%s=%d: recall@%d %.4f", parameter, value, k, recall)
        if recall > best.recall:
            best = Tuning(parameter, min(value, limit), recall, k, m, target)
        if recall >= target or value >= limit:
            break
    set_search_parameter(index, int(best.value or 1))
    if best.recall < target:
        log.warning("index reaches recall@%d %.3f at best (%s=%s), below the target %.2f",
                    k, best.recall, parameter, best.value, target)
    return best


# ---- GPU ----------------------------------------------------------------------------------------
def gpu_available() -> bool:
    """True when faiss was built with GPU support (faiss-gpu) and sees a GPU."""
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and int(faiss.get_num_gpus()) > 0


def gpu_capable(factory: str) -> bool:
    """Flat and IVF indexes run on FAISS GPUs; HNSW does not."""
    return "HNSW" not in factory


def resolve_device(device: str, factory: str) -> str:
    """``auto`` -> ``cuda`` when faiss-gpu sees a GPU and the kind runs there, else ``cpu``.

    Raises:
        SpecError: ``cuda`` asked for without faiss-gpu or a GPU, or for a kind FAISS has no GPU code for.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise SpecError(f"--device {device}: expected auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    usable = gpu_available()
    if device == "cuda" and not usable:
        raise SpecError("--device cuda: faiss has no GPU here (pip install -e .[gpu] on a machine with a GPU)")
    if device == "cuda" and not gpu_capable(factory):
        raise SpecError(f"--device cuda: FAISS has no GPU version of {factory!r}; use --device cpu")
    return "cuda" if usable and gpu_capable(factory) else "cpu"


_GPU_RESOURCES: list[Any] = []


def to_gpu(index: Any) -> Any:
    """A GPU copy of a CPU index (one StandardGpuResources per process, made on first use)."""
    faiss = faiss_module()
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index)


def to_cpu(index: Any, on_gpu: bool) -> Any:
    """The CPU version of ``index`` (what :func:`faiss.write_index` can save)."""
    if not on_gpu:
        return index
    return faiss_module().index_gpu_to_cpu(index)
