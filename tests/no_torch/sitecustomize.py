"""Makes the model libraries unimportable, as on a machine without torch: ``PYTHONPATH=tests/no_torch``.

``.ci/run`` runs the stage-2 tests (``-m "not torch"``) this way, so a stage-2 import of torch,
torchvision, open_clip or transformers fails CI even where those libraries are installed. PIL is
not blocked here: matplotlib (the HTML report's confusion matrix) needs it; that stage 2's scoring
never imports PIL is checked by tests/integration/test_stage2_imports.py.
"""
import importlib.abc
import sys

BLOCKED = ("torch", "torchvision", "open_clip", "transformers")


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - the finder protocol
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by tests/no_torch)", name=fullname)
        return None


sys.meta_path.insert(0, _Blocked())
