"""Saved Hugging Face datasets (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``).

``datasets.load_from_disk`` opens the folder (memory-mapped, nothing is copied) and says which
Arrow files hold the split and what its features are: the ``Image`` column holds the images, a
``ClassLabel`` column the labels and their names. The Arrow files are then listed and read as
shards by :mod:`embedstore.encode.sources_table`, so a split of many files is read in parallel
like any shard set. The location recorded is ``hf-dataset:<folder>#split=<split>`` (and the
column options given, see :meth:`~embedstore.encode.sources_shards.ShardOptions.fragment`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from embedstore.errors import SourceError

if TYPE_CHECKING:
    from embedstore.encode.sources import Source
    from embedstore.encode.sources_shards import ShardOptions

log = logging.getLogger(__name__)


def hf_location(folder: str | Path, split: Optional[str], options: ShardOptions) -> str:
    """The location string of a saved dataset's split, read with ``options``."""
    from embedstore.encode.sources_shards import HF_PREFIX

    resolved = Path(folder).expanduser().resolve().as_posix()
    return f"{HF_PREFIX}{resolved}" + options.fragment([("split", split)] if split else [])


def _load(folder: Path, split: Optional[str]) -> tuple[Any, str]:
    try:
        import datasets
    except ImportError:
        raise SourceError("--hf-dataset needs the datasets library: pip install 'embedstore[hf]'") from None
    if not folder.is_dir():
        raise SourceError(f"--hf-dataset {folder}: no such folder")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise SourceError(f"--hf-dataset {folder}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise SourceError(f"--hf-dataset {folder}: {'pick a split with --split' if split is None else f'no split {split!r}'}"
                              f" (splits: {', '.join(splits)})")
        return loaded[split], split
    if split is not None and split != str(loaded.split or split):
        raise SourceError(f"--hf-dataset {folder}: holds one split ({loaded.split}), not {split!r}")
    return loaded, split or ""


def _column_of(features: Any, kind: str) -> Optional[str]:
    names = [name for name, feature in features.items() if type(feature).__name__ == kind]
    return names[0] if len(names) == 1 else None


def list_hf_location(folder: str | Path, split: Optional[str], options: ShardOptions) -> Source:
    """List a saved dataset's split (``split`` may be None for a single-split folder) as a shard source.

    The image column defaults to the dataset's ``Image`` feature, the label column to its
    ``ClassLabel`` feature (whose names name the classes unless ``--classes`` is given).

    Raises:
        SourceError: no saved dataset, an unknown split, a split stored with an indices mapping
            (``select``/``filter`` without ``flatten_indices``), or what shard listing refuses.
    """
    from dataclasses import replace

    from embedstore.encode.sources_shards import list_shards

    folder = Path(folder).expanduser()
    ds, split = _load(folder, split)
    if getattr(ds, "_indices", None) is not None:
        raise SourceError(f"--hf-dataset {folder}: the split is a selection of rows (an indices mapping); save it "
                          "with dataset.flatten_indices().save_to_disk(...) first")
    files = [Path(f["filename"]).resolve() for f in ds.cache_files]
    if not files:
        raise SourceError(f"--hf-dataset {folder}: split {split!r} has no Arrow files on disk (an in-memory dataset)")
    image = options.image_column or _column_of(ds.features, "Image")
    label = options.label_column or _column_of(ds.features, "ClassLabel")
    classes = options.classes
    if classes is None and label is not None and type(ds.features.get(label)).__name__ == "ClassLabel":
        classes = tuple(ds.features[label].names)
    opts = replace(options, image_column=image, classes=classes)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    name = folder.resolve().name + (f"-{split}" if split else "")
    return list_shards(files, root, hf_location(folder, split or None, options), name, opts, default_labels=label)
