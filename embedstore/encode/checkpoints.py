"""Soup ingredients: open_clip checkpoints, read safely and checked to share one architecture.

This module owns what a checkpoint *is* for ``embedstore soup``, not what is done with it:

- :func:`parse_checkpoint`: a spec (``local-dir:FOLDER`` or a folder, a ``.safetensors`` file,
  a ``.pt``/``.pth``/``.bin`` state dict) -> :class:`Checkpoint`.
- :func:`load_state_dict`: safetensors via safetensors, anything else via
  ``torch.load(weights_only=True)``; a file that would need unpickling code (e.g. a whole pickled
  model) is refused. A ``{"state_dict": ...}`` wrapper and a ``module.`` prefix are removed.
- layouts (key -> shape and float-ness, :func:`layout_of`, :func:`read_layout`; safetensors
  headers are read without loading tensors) and the checks that checkpoints share one
  (:func:`check_same_layout`, :func:`check_checkpoints`), naming the first difference.
- the errors soups raise: :class:`CheckpointError`, :class:`CheckpointMismatchError` and
  :class:`SoupError` (here, below both :mod:`embedstore.encode.soup_eval` and :mod:`embedstore.encode.soup`,
  so that neither imports the other to raise it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from embedstore.errors import EmbedstoreError, SpecError
from embedstore.store.spec import LOCAL_DIR_PREFIX

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CONFIG_NAME = "open_clip_config.json"

StateDict = Mapping[str, Any]        # key -> torch.Tensor
Layout = dict[str, tuple[tuple[int, ...], bool]]   # key -> (shape, is floating point)


class CheckpointError(SpecError):
    """A checkpoint cannot be used: missing, unreadable, not a plain state dict, or unknown kind."""


class CheckpointMismatchError(CheckpointError):
    """Two checkpoints (or a checkpoint and ``--arch``) differ in their keys or shapes."""

    def __init__(self, name: str, reference: str, key: str, found: Optional[tuple[int, ...]],
                 expected: Optional[tuple[int, ...]], detail: str = ""):
        self.name, self.reference, self.key = name, reference, key
        self.found, self.expected = found, expected
        if found is None:
            what = f"has no key {key!r} (shape {expected} in {reference})"
        elif expected is None:
            what = f"has key {key!r} (shape {found}) that {reference} does not have"
        else:
            what = f"key {key!r} has shape {found}, {reference} has {expected}"
        super().__init__(f"{name}: {what}{detail}; soups need checkpoints of one architecture")


class SoupError(EmbedstoreError):
    """A soup cannot be made or saved (bad options, output folder in the way, invalid scores)."""


@dataclass(frozen=True)
class Checkpoint:
    """One ingredient: its name (as given) and the weights file to read."""

    name: str
    path: Path
    config: Optional[Path] = None   # open_clip_config.json of a local-dir: folder

    def load(self) -> dict[str, Any]:
        """The state dict (CPU tensors)."""
        return load_state_dict(self.path, self.name)

    def layout(self) -> Layout:
        """Keys, shapes and float-ness, read without loading tensors where the format allows."""
        return read_layout(self.path, self.name)


def parse_checkpoint(text: str) -> Checkpoint:
    """``local-dir:FOLDER`` (or a folder), a ``.safetensors`` file or a ``.pt/.pth/.bin`` state dict.

    Raises:
        CheckpointError: no such file or folder, a folder without an open_clip config or
            weights, or an unknown file kind (all named in the message).
    """
    target = text[len(LOCAL_DIR_PREFIX):] if text.startswith(LOCAL_DIR_PREFIX) else text
    path = Path(target).expanduser()
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            raise CheckpointError(f"{text}: folder has no {CONFIG_NAME} (not an open_clip local-dir: folder)")
        from open_clip.factory import (
            _find_checkpoint_in_dir,  # the lookup open_clip itself uses
        )

        found = _find_checkpoint_in_dir(path)
        if not found:
            raise CheckpointError(f"{text}: folder has no weights (.safetensors, .bin or .pth)")
        return Checkpoint(text, Path(found).resolve(), config.resolve())
    if text.startswith(LOCAL_DIR_PREFIX):
        raise CheckpointError(f"{text}: no such folder")
    if not path.is_file():
        raise CheckpointError(f"{text}: no such file or folder")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{text}: unknown checkpoint kind {path.suffix!r} "
                              f"(expected a local-dir: folder or {', '.join(CHECKPOINT_SUFFIXES)})")
    return Checkpoint(text, path.resolve())


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the ``module.`` prefix DataParallel/DDP training adds (as open_clip does)."""
    keys = list(state)
    if keys and keys[0].startswith("module."):
        return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    return dict(state)


def _unpickler_reason(exc: Exception) -> str:
    """The useful part of torch's long ``weights_only`` failure message."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip().split("\n")[0].split(". Please")[0].strip()
        if reason:
            return reason
    return "torch.load(weights_only=True) failed"


def load_state_dict(path: Path, name: str = "") -> dict[str, Any]:
    """Read a state dict without running pickled code.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``. A
    ``{"state_dict": ...}`` wrapper and a ``module.`` key prefix are removed, as open_clip does.

    Raises:
        CheckpointError: unreadable file, pickled objects other than tensors, or non-tensor values.
    """
    import pickle

    import torch

    name = name or str(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{name}: cannot read safetensors file {path} ({exc})") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{name}: refused: {path} is not a plain state dict of tensors ({_unpickler_reason(exc)}); "
                "embedstore never unpickles code or objects. Re-save model.state_dict(), e.g. as .safetensors"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{name}: cannot read {path} ({exc})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{name}: {path} holds {type(obj).__name__}, not a non-empty state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} of {path} is a {type(value).__name__}, not a tensor")
    return _strip_module(obj)


def refusal(exc: BaseException, name: str, path: Path | str) -> Optional[CheckpointError]:
    """The guard's one-line refusal when ``exc`` (or an error it was raised from, e.g. inside
    transformers' loader) is torch's ``weights_only`` unpickling refusal; None otherwise."""
    import pickle

    seen: set[int] = set()
    cause: Optional[BaseException] = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, pickle.UnpicklingError):
            return CheckpointError(
                f"{name}: refused: {path} is not a plain state dict of tensors ({_unpickler_reason(cause)}); "
                "embedstore never unpickles code or objects. Re-save model.state_dict(), e.g. as .safetensors")
        cause = cause.__cause__ or cause.__context__
    return None


def load_into_open_clip(model: Any, path: Path, name: str) -> None:
    """Load the checkpoint ``path`` into an open_clip ``model`` built without weights: read through
    :func:`load_state_dict` (the guard every weights load goes through), then open_clip's own
    conversions as ``open_clip.load_checkpoint`` applies them (third-party layouts, old text
    towers, scalar logit scale, position embeddings resized). big_vision ``.npz`` files are numpy
    arrays, read by open_clip with ``np.load`` (no pickle).

    Raises:
        CheckpointError: refused, unreadable, or keys/shapes that do not fit the model.
    """
    import torch

    if path.suffix.lower() in (".npz", ".npy"):
        from open_clip.convert import load_big_vision_weights

        load_big_vision_weights(model, str(path))
        return
    from open_clip.factory import (
        convert_state_dict,
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    state = convert_state_dict(model, load_state_dict(path, name))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"  # gone from transformers >= 4.31 towers
    if position_ids in state and not hasattr(model, position_ids):
        del state[position_ids]
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{name}: {path} does not fit the model ({' '.join(first[:2])[:300]})") from None


def layout_of(state: StateDict) -> Layout:
    """Keys -> (shape, is floating point) of a loaded state dict (or a model's)."""
    return {k: (tuple(int(s) for s in v.shape), bool(v.is_floating_point())) for k, v in state.items()}


def read_layout(path: Path, name: str = "") -> Layout:
    """:func:`layout_of` the file; safetensors headers are read without loading any tensor."""
    if path.suffix.lower() != ".safetensors":
        return layout_of(load_state_dict(path, name))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            layout = {}
            for key in fh.keys():
                part = fh.get_slice(key)
                layout[key] = (tuple(int(s) for s in part.get_shape()), part.get_dtype().startswith(("F", "BF")))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{name or path}: cannot read safetensors file {path} ({exc})") from None
    if not layout:
        raise CheckpointError(f"{name or path}: {path} holds no tensors")
    return _strip_module(layout)


def check_same_layout(layout: Layout, name: str, reference: Layout, reference_name: str) -> None:
    """Raise :class:`CheckpointMismatchError` at the first key or shape that differs.

    Keys are walked in the reference's order (a key missing from ``layout`` or a shape that
    differs), then ``layout``'s extra keys. A float tensor where the reference has an integer
    one (or the reverse) also counts as a mismatch.
    """
    for key, (shape, floating) in reference.items():
        if key not in layout:
            raise CheckpointMismatchError(name, reference_name, key, None, shape)
        other_shape, other_floating = layout[key]
        if other_shape != shape:
            raise CheckpointMismatchError(name, reference_name, key, other_shape, shape)
        if other_floating != floating:
            kinds = {True: "floating point", False: "integer/bool"}
            raise CheckpointMismatchError(name, reference_name, key, other_shape, shape,
                                          f" but is {kinds[other_floating]} where {reference_name} is {kinds[floating]}")
    for key, (shape, _) in layout.items():
        if key not in reference:
            raise CheckpointMismatchError(name, reference_name, key, shape, None)


def check_checkpoints(checkpoints: Sequence[Checkpoint]) -> Layout:
    """Check that every checkpoint has the first one's keys and shapes; return that layout.

    Raises:
        CheckpointError: fewer than two checkpoints, the same weights file given twice.
        CheckpointMismatchError: the first difference, naming the checkpoint, key and shapes.
    """
    if len(checkpoints) < 2:
        raise CheckpointError(f"a soup needs at least two checkpoints, got {len(checkpoints)}")
    seen: dict[Path, str] = {}
    for ckpt in checkpoints:
        if ckpt.path in seen:
            raise CheckpointError(f"{ckpt.name}: the same weights file as {seen[ckpt.path]} ({ckpt.path})")
        seen[ckpt.path] = ckpt.name
    reference = checkpoints[0].layout()
    for ckpt in checkpoints[1:]:
        check_same_layout(ckpt.layout(), ckpt.name, reference, checkpoints[0].name)
    return reference
