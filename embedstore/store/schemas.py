"""JSON schemas of the files embedstore keeps in a cache, and one function that checks them.

Every JSON file read from a cache (store manifests, encoder cards, index pointers, head
metadata) goes through :func:`check` before any field is used, so a foreign, hand-edited or
damaged file is refused with the file, the field and the command that repairs it, instead of
an ``AttributeError`` or ``TypeError`` deep inside a command. Schemas describe what the readers
rely on and allow extra fields, so older files (fewer optional fields) and newer ones (more
fields) keep loading.

Validation uses the ``jsonschema`` library (Draft 2020-12); validators are built once per schema.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from embedstore.errors import CorruptStoreError

_INT = {"type": "integer"}
_NONNEG = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_STRINGS = {"type": "array", "items": _STR}
_OBJ = {"type": "object"}
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

SHARD_ENTRY = {
    "type": "object",
    "required": ["file", "rows", "bytes", "sha256"],
    "properties": {
        # a plain name inside shards/: never a path that leaves the store folder
        "file": {"type": "string", "pattern": r"^shard-[A-Za-z0-9_-]+\.h5$"},
        "rows": _NONNEG,
        "bytes": _NONNEG,
        "sha256": _HEX64,
        "dead": {"type": "array", "items": _NONNEG},
        "format": {"type": "integer", "minimum": 1},
        "chunk_rows": {"type": "integer", "minimum": 1},
        "digests": {"type": "object", "additionalProperties": _STR},
        "versions": _OBJ,
    },
}

MANIFEST = {
    "type": "object",
    "required": ["schema", "fingerprint", "dim", "dtype", "generation", "shards"],
    "properties": {
        "schema": _INT,
        "fingerprint": _OBJ,
        "dim": {"type": "integer", "minimum": 1},
        "dtype": {"enum": ["float16", "float32"]},
        "generation": _NONNEG,
        "commit_id": _STR,
        "rows": _NONNEG,
        "shards": {"type": "array", "items": SHARD_ENTRY},
        "failures": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {"type": _STR, "message": _STR, "size": _INT, "mtime_ns": _INT},
            },
        },
        "labelled": {"type": "boolean"},
        "sorted": {"type": "boolean"},
        "store_id": _STR,
        "source": {"type": ["object", "null"], "properties": {"location": _STR, "images": _NONNEG}},
        "classes": _STRINGS,
    },
}

ENCODER_CARD = {
    "type": "object",
    "required": ["spec", "weights_digest", "weights_files", "default_view", "dim"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["model"],
            "properties": {"kind": _STR, "model": _STR, "pretrained": {"type": ["string", "null"]},
                           "trust_remote_code": {"type": "boolean"}},
        },
        "weights_digest": _STR,
        "weights_files": {
            "type": "array",
            "items": {"type": "object", "required": ["path", "size", "mtime_ns", "sha256"],
                      "properties": {"path": _STR, "size": _INT, "mtime_ns": _INT, "sha256": _STR},
                      "additionalProperties": False},
        },
        "default_view": {
            "type": "object",
            "properties": {
                "resize_mode": _STR, "size": {"type": "integer", "minimum": 1}, "interpolation": _STR,
                "mean": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
                "std": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
                "sharpness": {"type": ["number", "null"]},
            },
        },
        "dim": {"type": "integer", "minimum": 1},
        "logit_scale": {"type": ["number", "null"]},
        "tokenizer": _OBJ,
        "versions": _OBJ,
    },
}

INDEX_POINTER = {
    "type": "object",
    "required": ["schema", "factory", "build", "index_bytes", "store_generation", "fingerprint"],
    "properties": {
        "schema": _INT,
        "factory": _STR,
        "build": {"type": "string", "pattern": "^b-[0-9a-f]+$"},
        "index_bytes": _NONNEG,
        "store_id": {"type": ["string", "null"]},
        "store_generation": _NONNEG,
        "store_commit_id": {"type": ["string", "null"]},
        "fingerprint": _OBJ,
        "tuning": {"type": ["object", "null"]},
        "kind_requested": {"type": ["string", "null"]},
        "files": {
            "type": "object",
            "additionalProperties": {"type": "object", "required": ["bytes", "sha256"],
                                     "properties": {"bytes": _NONNEG, "sha256": _HEX64}},
        },
    },
}

HEAD_META = {
    "type": "object",
    "required": ["classes"],
    "properties": {
        "classes": _STRINGS,
        "shape": {"type": "array", "items": _NONNEG},
        "has_zero_shot": {"type": "boolean"},
        "name": _STR,
    },
}


@functools.lru_cache(maxsize=None)
def _validator(name: str) -> Any:
    from jsonschema import Draft202012Validator

    schema = {"MANIFEST": MANIFEST, "ENCODER_CARD": ENCODER_CARD, "INDEX_POINTER": INDEX_POINTER,
              "HEAD_META": HEAD_META}[name]
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problem(data: Any, schema: str) -> str:
    """The first way ``data`` breaks ``schema`` (``"MANIFEST"``, ``"ENCODER_CARD"``,
    ``"INDEX_POINTER"``, ``"HEAD_META"``) as ``field: message``, or ``""`` when it is valid."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator(schema).iter_errors(data))
    if error is None:
        return ""
    message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
    where = error.json_path if error.json_path != "$" else "the top level"
    return f"{where}: {message}"


def check(data: Any, schema: str, path: Path | str, what_to_do: str,
          error: Callable[[str], Exception] = CorruptStoreError) -> Any:
    """Return ``data`` if it matches ``schema``; else raise ``error`` naming ``path``, the field
    and ``what_to_do``."""
    found = problem(data, schema)
    if found:
        raise error(f"{path}: not a valid embedstore file ({found}); {what_to_do}")
    return data
