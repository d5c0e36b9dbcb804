"""Modules that moved, still importable from their old paths for one release.

Each theme now has a package (``gradwatch.check``, ``gradwatch.report``, ``gradwatch.sinks``,
``gradwatch.integrations.torch``, ``gradwatch.integrations.keras``). The old flat modules keep
working: importing one emits a :class:`DeprecationWarning` naming the new path and gives the new
module itself (the same object, so ``isinstance`` checks and monkeypatches agree). They go away
in the next release.

>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     import gradwatch.report_junit as old
>>> import gradwatch.report.junit as new
>>> old is new, caught[0].category.__name__
(True, 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "install"]

MOVED = {
    "gradwatch.check_loops": "gradwatch.check.loops",
    "gradwatch.check_targets": "gradwatch.check.targets",
    "gradwatch.report_figures": "gradwatch.report.figures",
    "gradwatch.report_html": "gradwatch.report.html",
    "gradwatch.report_junit": "gradwatch.report.junit",
    "gradwatch.integrations.tensorboard": "gradwatch.sinks.tensorboard",
    "gradwatch.integrations.wandb": "gradwatch.sinks.wandb",
    "gradwatch.integrations.torch_demo": "gradwatch.integrations.torch.demo",
}
"""Old module path -> new module path."""


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path of :data:`MOVED` to the module at its new path."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path goes away in the "
            "next release).",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already loaded."""


_FINDER = _MovedFinder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); ``import gradwatch`` calls it."""
    if not any(f is _FINDER for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)
