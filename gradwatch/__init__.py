"""gradwatch: watch the gradients of a training run, say what is wrong, fix what can be fixed.

The core (this package) imports numpy and pluggy only. Framework adapters live in
``gradwatch.integrations`` and are imported on first use: ``gradwatch.watch`` (PyTorch) and
``gradwatch.GradWatch`` (Keras 3) resolve lazily, so ``import gradwatch`` imports no framework.

>>> import gradwatch
>>> from gradwatch.testing import exploding_stream
>>> monitor = gradwatch.Monitor()
>>> decisions = [monitor.observe(s) for s in exploding_stream(onset=40, steps=60)]
>>> sorted(monitor.report().action_counts)
['clip', 'lr_decay']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch import moved
from gradwatch.check import CheckSpec
from gradwatch.detectors import Detector
from gradwatch.errors import BadTargetError, GradwatchError, GradwatchWarning, MissingExtraError
from gradwatch.findings import ACTION_KINDS, FINDING_KINDS, SEVERITIES, Action, Finding
from gradwatch.hookspecs import hookimpl
from gradwatch.monitor import Monitor
from gradwatch.policy import AutoPolicy, Controls, Decision, ObservePolicy, Policy
from gradwatch.report import Report
from gradwatch.stats import Layout, StepStats

moved.install()  # the old module paths (gradwatch.report_html, ...) keep importing, with a warning

__version__ = "0.1.0.dev0"

__all__ = [
    "ACTION_KINDS",
    "FINDING_KINDS",
    "SEVERITIES",
    "Action",
    "AutoPolicy",
    "BadTargetError",
    "CheckSpec",
    "Controls",
    "Decision",
    "Detector",
    "Finding",
    "GradWatch",
    "GradwatchError",
    "GradwatchWarning",
    "Layout",
    "MissingExtraError",
    "Monitor",
    "ObservePolicy",
    "Policy",
    "Report",
    "StepStats",
    "__version__",
    "hookimpl",
    "watch",
]

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch.integrations.keras import GradWatch
    from gradwatch.integrations.torch import watch

_LAZY = {
    "watch": ("gradwatch.integrations.torch", "watch"),
    "GradWatch": ("gradwatch.integrations.keras", "GradWatch"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
