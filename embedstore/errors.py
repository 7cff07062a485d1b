"""Exception types that users of embedstore can catch.

Every error raised on bad input is an :class:`EmbedstoreError` whose message names the file,
field or option at fault, so the CLI can print it without a traceback.
"""
from __future__ import annotations


class EmbedstoreError(Exception):
    """Base class of every error embedstore raises on purpose."""


class SpecError(EmbedstoreError, ValueError):
    """A model spec, view option or other user-supplied setting is invalid."""


class SourceError(EmbedstoreError):
    """An image source (folder or list file) cannot be read."""


class StoreNotFoundError(EmbedstoreError):
    """The requested store, encoder or dataset is not in the cache."""


class StoreLockedError(EmbedstoreError):
    """Another process holds the write lock of a store."""


class FingerprintMismatchError(EmbedstoreError):
    """A store was opened with settings that differ from the ones it was written with."""

    def __init__(self, path: str, differences: list[tuple[str, object, object]]):
        self.path = path
        self.differences = differences
        lines = [f"  {field}: store has {old!r}, requested {new!r}" for field, old, new in differences]
        super().__init__(
            f"store {path} was written with different settings; refusing to mix them:\n"
            + "\n".join(lines)
            + "\nUse another --cache or --dataset, or other view options, to keep both."
        )


class CorruptStoreError(EmbedstoreError):
    """A store file is damaged, truncated or does not match its manifest (or a cache JSON file
    does not match its schema). The message names the file and the command that repairs it."""


class SearchIndexError(EmbedstoreError):
    """Base of the FAISS index errors below."""


class IndexNotFoundError(SearchIndexError, StoreNotFoundError):
    """No index has been built for the store."""


class CorruptIndexError(SearchIndexError):
    """An index file is damaged or truncated."""


class IndexMismatchError(SearchIndexError):
    """An index does not belong to the store it was found in (other store, encoder or view)."""


class StoreChangedError(EmbedstoreError):
    """A store was committed to between two reads that must see the same commit."""


class WriteFailedError(EmbedstoreError, OSError):
    """Writing a file failed (no space left, file-size limit, permission, read-only file system).

    Also an :class:`OSError` (``errno`` and ``filename`` are set), so code that catches OS errors
    keeps working. The message names the path, says what was kept and what to do.
    """

    _ADVICE = {
        "ENOSPC": "free some disk space",
        "EDQUOT": "free some space in your disk quota",
        "EFBIG": "raise the file-size limit (`ulimit -f`) or use a file system that allows larger files",
        "EACCES": "fix the folder's permissions or use another --cache",
        "EPERM": "fix the folder's permissions or use another --cache",
        "EROFS": "use a --cache on a writable file system",
        "ENOTDIR": "a part of the path is a file where a folder is needed: check the path (and --cache)",
        "EEXIST": "a file stands where a folder is needed: check the path",
    }

    def __init__(self, path: object, cause: BaseException | str, kept: str = "", again: str = "run the same command again"):
        import errno as errno_codes

        code = getattr(cause, "errno", None)
        name = errno_codes.errorcode.get(code, "") if code else ""
        reason = (getattr(cause, "strerror", None) or str(cause)) if not isinstance(cause, str) else cause
        advice = self._ADVICE.get(name, "check the disk and the folder")
        text = f"cannot write {path}: {reason}" + (f" ({name})" if name else "")
        text += (f"; {kept}" if kept else "") + f"; {advice} and {again}"
        EmbedstoreError.__init__(self, text)
        self.errno = code
        self.strerror = reason
        self.filename = str(path)
        self.path = str(path)

    def __str__(self) -> str:
        return str(self.args[0])


class EncodeWorkerError(EmbedstoreError):
    """A decoding worker process died, could not start, or sent nothing before the loader timeout."""


class WeightsChangedError(EmbedstoreError):
    """The model behind a spec now has other weights than the features it is to be combined with."""

    def __init__(self, spec: object, expected: str, found: str):
        self.expected, self.found = expected, found
        model = f"--model {getattr(spec, 'model', spec)}"
        super().__init__(
            f"{spec}: the cached image features were encoded with weights {expected}, but the model now has "
            f"weights {found}; refusing to combine features of different weights. Either restore the old weights "
            f"file, or encode the images again with the new weights: `embedstore rm --dataset DATASET {model}` "
            f"then `embedstore encode IMAGES --dataset DATASET {model} ...`"
        )


class BudgetError(EmbedstoreError):
    """A request needs more memory than the budget (``--max-memory``) allows."""
