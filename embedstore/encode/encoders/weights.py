"""Locate an encoder's weight files without loading the model, and digest them.

The digest is a SHA-256 over the weight files (name and content). Hashing a 10 GB checkpoint
takes tens of seconds, so a digest is reused while the file's size and mtime are unchanged.
Models without weight files (open_clip architectures with no ``pretrained``, ``local-dir:``
folders without a checkpoint) are refused unless the spec asks for random weights explicitly
(``--random-weights``); they are then initialised from a fixed seed and get the digest
``random-init-seed0:<arch>``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from embedstore.errors import SpecError
from embedstore.store.card import WeightsFile
from embedstore.store.spec import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, EncoderSpec

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.py", "*.tiktoken"]


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weights_in_dir(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def open_clip_checkpoint(spec: EncoderSpec) -> Optional[Path]:
    """The checkpoint file ``open_clip.create_model`` will load for ``spec``, or None (random init)."""
    model = spec.model
    if model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model[len(LOCAL_DIR_PREFIX):])
        if not (folder / "open_clip_config.json").is_file():
            raise SpecError(f"--model {model}: folder has no open_clip_config.json")
        from open_clip.factory import (
            _find_checkpoint_in_dir,  # the same lookup open_clip uses
        )

        found = _find_checkpoint_in_dir(folder)
        return Path(found) if found else None
    if model.startswith(HF_HUB_PREFIX):
        from open_clip.pretrained import download_pretrained_from_hf

        repo = model[len(HF_HUB_PREFIX):]
        with _download_errors(f"--model {model}", f"the weights of the Hugging Face repo {repo}"):
            return Path(download_pretrained_from_hf(repo))
    if spec.pretrained is None:
        return None
    path = Path(spec.pretrained)
    if path.is_file():
        return path
    import open_clip

    name = model.replace("/", "-")
    cfg = open_clip.get_pretrained_cfg(name, spec.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise SpecError(
            f"--pretrained {spec.pretrained}: not a file and not a known tag of {name} "
            f"(known tags: {', '.join(tags) or 'none'})"
        )
    from open_clip.pretrained import download_pretrained

    with _download_errors(f"--pretrained {spec.pretrained}", f"the {spec.pretrained} weights of {name}"):
        return Path(download_pretrained(cfg))


@contextlib.contextmanager
def _download_errors(option: str, what: str, as_file: str = "pass the checkpoint as a file: "
                     "--pretrained /path/to/checkpoint.safetensors") -> Iterator[None]:
    """Turn a failed weights download (offline, no local copy, hub error) into one clear message."""
    try:
        yield
    except (OSError, ValueError) as exc:  # hub, HTTP and offline errors are OSErrors; bad repo ids ValueErrors
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        raise SpecError(
            f"{option}: {what} are not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}: {reason}). Download them once on a machine with internet (run the same "
            f"command there and copy its Hugging Face cache, ~/.cache/huggingface or $HF_HOME), or {as_file}"
        ) from exc


def hf_weight_files(spec: EncoderSpec) -> list[Path]:
    """Weight files of a transformers model folder or hub repo (from the local HF cache if offline)."""
    folder = Path(spec.target)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        if spec.target.startswith((".", "/", "~")) or spec.target.count("/") > 1:
            raise SpecError(f"--model {spec.model}: no such folder ({folder}), and not a Hugging Face repo id "
                            "(ORG/NAME); give the folder of a saved transformers model")
        with _download_errors(f"--model {spec.model}", f"the files of {spec.target}",
                              "save the model with save_pretrained and pass its folder: --model hf:/path/to/folder"):
            folder = Path(snapshot_download(spec.target, allow_patterns=HF_ALLOW_PATTERNS))
    files = _weights_in_dir(folder)
    if not files:
        raise SpecError(f"--model {spec.model}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    return files


def locate_weights(spec: EncoderSpec, allow_random: bool = False) -> list[Path]:
    """All weight files that determine the encoder's numbers (empty for seeded random init).

    Raises:
        SpecError: the spec names no weights and random weights were not asked for
            (``allow_random``, ``spec.random_weights``): the message says how to give weights.
    """
    if spec.kind == "hf":
        return hf_weight_files(spec)
    checkpoint = open_clip_checkpoint(spec)
    if checkpoint is None and not (allow_random or spec.random_weights):
        raise SpecError(_no_weights_message(spec))
    return [checkpoint] if checkpoint is not None else []


def is_random_init(digest: str) -> bool:
    """True for the digest of seeded random weights (see :func:`digest_weights`)."""
    return digest.startswith("random-init-")


def _no_weights_message(spec: EncoderSpec) -> str:
    if spec.model.startswith(LOCAL_DIR_PREFIX):
        where = (f"--model {spec.model}: the folder has no checkpoint (open_clip_model.safetensors or "
                 "open_clip_pytorch_model.bin), so open_clip would initialise it with random weights")
        fix = "Put the checkpoint in the folder"
    else:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(spec.model.replace("/", "-"))
        where = (f"--model {spec.model}: no --pretrained given, so open_clip would initialise it with random "
                 "weights")
        fix = ("Give --pretrained TAG" + (f" (known tags: {', '.join(tags)})" if tags else "")
               + " or --pretrained CHECKPOINT_FILE")
    return (f"{where}, whose features mean nothing. {fix}, or pass --random-weights to encode with seeded "
            "random weights on purpose (tests, benchmarks).")


def digest_weights(
    spec: EncoderSpec, files: Sequence[Path], known: Iterable[WeightsFile] = ()
) -> tuple[str, tuple[WeightsFile, ...]]:
    """Digest ``files``, reusing ``known`` per-file hashes whose size and mtime still match."""
    if not files:
        return f"random-init-seed{RANDOM_INIT_SEED}:{spec.target}", ()
    cache = {(w.path, w.size, w.mtime_ns): w.sha256 for w in known}
    records = []
    total = hashlib.sha256()
    for path in files:
        st = path.stat()
        resolved = str(path.resolve())
        sha = cache.get((resolved, st.st_size, st.st_mtime_ns))
        if sha is None:
            log.info("hashing weights %s (%.1f MB)", path, st.st_size / 1e6)
            sha = _sha256_file(path)
        records.append(WeightsFile(resolved, st.st_size, st.st_mtime_ns, sha))
        total.update(path.name.encode() + b"\0" + sha.encode() + b"\n")
    return "sha256:" + total.hexdigest(), tuple(records)
