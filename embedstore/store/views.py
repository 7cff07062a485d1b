"""Preprocessing views: the exact recipe that turns a decoded image into a model input.

A :class:`View` is a frozen dataclass; two views with the same fields produce the same tensors and
share a store, any difference gets a store of its own (its :attr:`View.key`). The default view of
an encoder is what the model's own inference transform does (open_clip's ``preprocess`` or the
transformers image processor); :class:`ViewOptions` overrides some of its fields, with the same
spelling on the command line (``--resize-mode``, ``--size``, ...) and in experiment files.

The PIL path here mirrors open_clip's inference transform step by step (resize, crop, RGB, then
the optional sharpening the seed used, then to-tensor and normalisation).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence

from embedstore.errors import SpecError

RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class View:
    """A deterministic image preprocessing recipe.

    Attributes:
        resize_mode: ``shortest`` (resize the shortest side to ``size`` then centre-crop),
            ``squash`` (resize to exactly ``size``×``size``, ignoring the aspect ratio, as the
            seed did) or ``longest`` (resize the longest side, then pad to a square).
        size: output side in pixels.
        interpolation: resampling filter used by the resize.
        mean, std: per-channel normalisation applied after conversion to [0, 1].
        sharpness: PIL ``ImageEnhance.Sharpness`` factor applied to every image after
            resize/crop and RGB conversion, or ``None`` for none (1.0 is the identity and is
            stored as ``None``).
    """

    resize_mode: str = "shortest"
    size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    sharpness: Optional[float] = None

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise SpecError(f"resize_mode: {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(
                f"interpolation: {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise SpecError(f"size: must be a positive integer, got {self.size!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise SpecError(f"{name}: needs 3 values (R, G, B), got {len(value)}")
            if not all(math.isfinite(v) for v in value):
                raise SpecError(f"{name}: every value must be a finite number, got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise SpecError(f"std: every value must be positive, got {self.std}")
        if self.sharpness is not None:
            sharp = float(self.sharpness)
            if not math.isfinite(sharp) or sharp < 0:
                raise SpecError(f"sharpness: must be a finite number >= 0, got {sharp}")
            object.__setattr__(self, "sharpness", None if sharp == 1.0 else sharp)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples become lists)."""
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "View":
        """Inverse of :meth:`to_dict`; unknown fields are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"view: unknown field(s) {', '.join(sorted(unknown))}")
        values = dict(data)
        for name in ("mean", "std"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @property
    def key(self) -> str:
        """Stable, readable directory name: ``squash224-bicubic-sharp2-<hash>``."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        digest = hashlib.sha256(blob).hexdigest()[:10]
        sharp = "" if self.sharpness is None else f"-sharp{self.sharpness:g}"
        return f"{self.resize_mode}{self.size}-{self.interpolation}{sharp}-{digest}"

    def describe(self) -> str:
        """One-line human description."""
        sharp = "none" if self.sharpness is None else f"{self.sharpness:g}"
        mean = ",".join(f"{v:.4g}" for v in self.mean)
        std = ",".join(f"{v:.4g}" for v in self.std)
        return (
            f"{self.resize_mode} {self.size}px {self.interpolation}, sharpness {sharp}, "
            f"mean ({mean}), std ({std})"
        )


@dataclass(frozen=True)
class ViewOptions:
    """Overrides of an encoder's default view; ``None`` keeps the default's value."""

    resize_mode: Optional[str] = None
    size: Optional[int] = None
    interpolation: Optional[str] = None
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    sharpness: Optional[float] = None

    def __post_init__(self) -> None:
        if self.sharpness is not None:
            sharp = self.sharpness
            if isinstance(sharp, bool) or not isinstance(sharp, (int, float)) or not math.isfinite(sharp) or sharp < 0:
                raise SpecError(f"--sharpness / sharpness: expected a finite number >= 0, got {sharp!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise SpecError(f"--{name} / {name}: every value must be a finite number, got {value!r}")

    def apply(self, default: View) -> View:
        """Return ``default`` with every option that is set replaced."""
        changes = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(default, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "view options") -> "ViewOptions":
        """Build from a mapping (an experiment-file table); unknown keys are ignored by the caller."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data and data[f.name] is not None:
                values[f.name] = data[f.name]
        for name in ("mean", "std"):
            if name in values:
                values[name] = parse_triplet(values[name], f"{where}: {name}")
        if "size" in values and not isinstance(values["size"], int):
            raise SpecError(f"{where}: size must be an integer, got {values['size']!r}")
        return cls(**values)


def parse_triplet(value: Any, what: str) -> tuple[float, float, float]:
    """Parse ``"0.5,0.5,0.5"`` or a 3-sequence into a float triple."""
    if isinstance(value, str):
        parts: Sequence[Any] = [p for p in value.replace(" ", "").split(",") if p]
    else:
        parts = list(value)
    try:
        floats = tuple(float(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{what}: expected three numbers like 0.5,0.5,0.5, got {value!r}") from exc
    if not all(math.isfinite(f) for f in floats):
        raise SpecError(f"{what}: expected three finite numbers, got {value!r}")
    if len(floats) != 3:
        raise SpecError(f"{what}: expected three numbers like 0.5,0.5,0.5, got {value!r}")
    return floats  # type: ignore[return-value]
