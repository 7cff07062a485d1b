"""The card that describes an encoder without loading it: identity, weights digest, default view,
width, logit scale and text settings. Saved as JSON in the cache; read by both stages."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from embedstore.store.spec import EncoderSpec
from embedstore.store.views import View

__all__ = ["EncoderCard", "WeightsFile"]


@dataclass(frozen=True)
class WeightsFile:
    """A weights file and the file state its digest was computed at."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class EncoderCard:
    """What a loaded encoder is: identity, weights digest, default view, width and text settings."""

    spec: EncoderSpec
    weights_digest: str
    weights_files: tuple[WeightsFile, ...]
    default_view: View
    dim: int
    logit_scale: Optional[float]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def identity_fingerprint(self) -> dict[str, Any]:
        """Fields that change the numbers an encoder produces (compared strictly)."""
        return {**self.spec.identity(), "weights_digest": self.weights_digest, "dim": self.dim}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "spec": {**self.spec.identity(), "trust_remote_code": self.spec.trust_remote_code},
            "weights_digest": self.weights_digest,
            "weights_files": [asdict(w) for w in self.weights_files],
            "default_view": self.default_view.to_dict(),
            "dim": self.dim,
            "logit_scale": self.logit_scale,
            "tokenizer": self.tokenizer,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], spec: EncoderSpec) -> "EncoderCard":
        """Inverse of :meth:`to_dict`; ``spec`` is the caller's (it carries the remote-code flag)."""
        return cls(
            spec=spec,
            weights_digest=data["weights_digest"],
            weights_files=tuple(WeightsFile(**w) for w in data["weights_files"]),
            default_view=View.from_dict(data["default_view"]),
            dim=int(data["dim"]),
            logit_scale=data.get("logit_scale"),
            tokenizer=dict(data.get("tokenizer", {})),
            versions=dict(data.get("versions", {})),
        )
