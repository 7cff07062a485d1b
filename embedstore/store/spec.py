"""Encoder specs: the user's model string, parsed and normalised without importing torch.

``model`` is anything ``open_clip.create_model`` accepts (``ViT-B-32``, ``hf-hub:org/repo``,
``local-dir:PATH``) with ``pretrained`` a tag or a checkpoint path, or ``hf:REPO_OR_DIR`` for a
transformers CLIP-family model. Local paths are resolved to absolute paths so that the same model
reached from another working directory is the same encoder.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from embedstore.errors import SpecError

HF_PREFIX = "hf:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class EncoderSpec:
    """Which model encodes: ``model`` string, ``pretrained`` tag/path, and the remote-code flag.

    ``trust_remote_code`` is part of how the model is loaded, not of what it computes, so it does
    not enter :attr:`id`. ``random_weights`` is the explicit permission to encode with seeded
    random weights when the spec names no weights (an open_clip name without ``pretrained``, a
    ``local-dir:`` folder without a checkpoint); without it such a spec is refused. It is a
    permission, not an identity, so it does not enter :attr:`id` either.
    """

    model: str
    pretrained: Optional[str] = None
    trust_remote_code: bool = False
    random_weights: bool = False

    def __post_init__(self) -> None:
        model = (self.model or "").strip()
        if not model:
            raise SpecError("--model: empty model spec")
        if model.startswith(HF_PREFIX):
            target = model[len(HF_PREFIX):]
            if not target:
                raise SpecError("--model: 'hf:' needs a repo id or a local directory after it")
            if Path(target).expanduser().exists():
                model = HF_PREFIX + _abs(target)
            if self.pretrained:
                raise SpecError("--pretrained: not used with 'hf:' models (the repo or folder holds the weights)")
        elif model.startswith(LOCAL_DIR_PREFIX):
            target = model[len(LOCAL_DIR_PREFIX):]
            if not target:
                raise SpecError("--model: 'local-dir:' needs a folder after it")
            model = LOCAL_DIR_PREFIX + _abs(target)
            if self.pretrained:
                raise SpecError("--pretrained: not used with 'local-dir:' models (the folder holds the weights)")
        elif model.startswith(HF_HUB_PREFIX) and self.pretrained:
            raise SpecError("--pretrained: not used with 'hf-hub:' models (the repo holds the weights)")
        object.__setattr__(self, "model", model)
        pretrained = (self.pretrained or "").strip() or None
        if pretrained is not None and ("/" in pretrained or Path(pretrained).expanduser().exists()):
            pretrained = _abs(pretrained)
        object.__setattr__(self, "pretrained", pretrained)

    @property
    def kind(self) -> str:
        """``hf`` for transformers models, ``open_clip`` otherwise."""
        return "hf" if self.model.startswith(HF_PREFIX) else "open_clip"

    @property
    def target(self) -> str:
        """The model string without the ``hf:`` prefix (what the backend receives)."""
        return self.model[len(HF_PREFIX):] if self.kind == "hf" else self.model

    def identity(self) -> dict[str, Any]:
        """The fields that name this encoder (used for :attr:`id` and in fingerprints)."""
        return {"kind": self.kind, "model": self.model, "pretrained": self.pretrained}

    @property
    def id(self) -> str:
        """Directory name: readable slug plus a hash of :meth:`identity`."""
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        digest = hashlib.sha256(blob).hexdigest()[:10]
        base = Path(self.target).name if self.kind == "hf" or self.model.startswith(LOCAL_DIR_PREFIX) else self.target
        tag = Path(self.pretrained).stem if self.pretrained else ""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{tag}" if tag else base).strip("-")[:48]
        return f"{slug}-{digest}"

    def __str__(self) -> str:
        return self.model + (f" (pretrained {self.pretrained})" if self.pretrained else "")

    def cli_args(self) -> str:
        """The ``--model``/``--pretrained`` options that select this encoder."""
        args = f"--model {self.model}"
        if self.pretrained:
            args += f" --pretrained {self.pretrained}"
        if self.trust_remote_code:
            args += " --trust-remote-code"
        if self.random_weights:
            args += " --random-weights"
        return args
