"""A ``kind = "knn"`` experiment member: class probabilities from the labels of each image's nearest
rows in a labelled reference store (a saved, up-to-date FAISS index, else exact search).

Queries go to the index in row blocks of the classified store, so memory stays bounded. When
the reference is the classified store itself each row's own id is left out (leave-one-out), so
a dataset never votes for itself. The vote itself is :func:`embedstore.score.knn.class_votes`.
"""
from __future__ import annotations

import numpy as np

from embedstore.errors import SpecError
from embedstore.score.experiment import Experiment, ModelEntry
from embedstore.score.knn import class_votes
from embedstore.score.metrics import label_ids
from embedstore.store.cache import Cache
from embedstore.store.reader import StoreReader
from embedstore.store.store import Store
from embedstore.util.arrays import unit_rows
from embedstore.util.budget import Budget


def knn_probabilities(cache: Cache, exp: Experiment, entry: ModelEntry, store: Store, reader: StoreReader,
                      classes: tuple[str, ...], notes: list[str], budget: Budget) -> np.ndarray:
    """Class probabilities ``(n, c)`` of a kNN member for every row of ``reader`` (natural order)."""
    from embedstore.search.index import open_index

    assert entry.knn is not None
    options = entry.knn
    ref_name = options.reference or exp.dataset
    ref_store = cache.open_image_store(ref_name, entry.spec, entry.view)
    ref_manifest = ref_store.manifest()
    if not ref_manifest.get("labelled"):
        raise SpecError(f"{entry.label}: dataset {ref_name!r} has no labels to vote with")
    ours = reader.manifest["fingerprint"]["encoder"]
    theirs = ref_manifest["fingerprint"]["encoder"]
    if ours != theirs:
        raise SpecError(f"{entry.label}: dataset {ref_name!r} was encoded with weights "
                        f"{str(theirs.get('weights_digest'))[:12]}, dataset {exp.dataset!r} with "
                        f"{str(ours.get('weights_digest'))[:12]}; re-encode one of them")
    index, staleness = open_index(ref_store)  # a stale saved index comes back as exact search over the rows
    if staleness.stale:
        notes.append(f"{entry.label}: {staleness.describe()}; used exact search over the current rows instead")
    same = ref_store.path == store.path
    n_ref = index.rows.n_live - (1 if same else 0)
    if options.k > n_ref:
        raise SpecError(f"{entry.label}: k = {options.k} but dataset {ref_name!r} has only {n_ref} rows to vote")
    live = np.flatnonzero(index.rows.live)
    ref_class = np.full(len(index.rows), -1, dtype=np.int64)
    ref_class[live] = label_ids([index.rows.labels[i] for i in live], classes, entry.label)
    own = index.rows.live_ids() if same else {}
    n = len(reader.keys)
    k_search = options.k + (1 if same else 0)
    out = np.empty((n, len(classes)), dtype=np.float32)
    step = budget.block_rows(reader.dim * 6 + k_search * 16 + len(classes) * 8)
    for start in range(0, n, step):
        stop = min(n, start + step)
        scores, ids = index.search(unit_rows(reader.features(reader.rows(start, stop)), copy=False), k_search)
        if same:  # leave-one-out: drop each row's own id, keep the first k others
            self_id = np.asarray([own.get(key, -2) for key in reader.keys[start:stop]], dtype=np.int64)
            order = np.argsort(ids == self_id[:, None], axis=1, kind="stable")[:, :options.k]
            scores = np.take_along_axis(scores, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        labels = np.where(ids >= 0, ref_class[np.clip(ids, 0, None)], -1)
        out[start:stop] = class_votes(labels, scores, len(classes), options.weighting, options.temperature)
    return out
