"""Sinks: where a watched run's numbers, findings and actions go (pluggy plugins).

A sink is a plugin that implements the ``gradwatch_on_*`` hooks of :mod:`gradwatch.hookspecs`.
:class:`Sink` is the convenient base: subclasses override the plain methods :meth:`Sink.write_step`,
:meth:`Sink.write_finding`, :meth:`Sink.write_action`, :meth:`Sink.write_report` and
:meth:`Sink.close`, and the base class does the plumbing:

* **one run or all runs**. ``sink.attach(monitor)`` registers the sink with the monitor's plugin
  manager and makes it ignore every other monitor (two watched models in one process, two sinks,
  no mixing). ``sink.register()`` registers it process-wide: it sees every monitor. The Lightning
  and Hugging Face callbacks take ``sinks=[...]`` and attach them for you; with
  ``gradwatch.watch`` call ``sink.attach(watch.monitor)``.
* **cheap by default**. Step records are written every ``every`` measured steps; findings,
  actions and the final report always.
* **never breaks training**. An exception inside a sink becomes one
  :class:`~gradwatch.GradwatchWarning`, the sink detaches itself and training goes on (unless
  ``strict=True``).

Every sink lives in this package, one module each: :class:`JsonlSink` (``jsonl``: one JSON object
per line; what a bare path resolves to, see :func:`resolve_sinks`), :class:`LoggingSink` and
:class:`WarnOnceSink` (``logs``: Python's ``logging`` and ``warnings``), :class:`TensorBoardSink`
(``tensorboard``) and :class:`WandbSink` (``wandb``). The last two import their framework only
when they are first used (``from gradwatch.sinks import TensorBoardSink``), so ``import gradwatch``
stays free of them; a missing one raises :class:`gradwatch.MissingExtraError` naming the extra.

Per-layer values are *grouped and few*: :func:`group_layers` groups layers by their module path at
the deepest depth that yields at most ``max_groups`` groups, so a 200-tensor model logs about 8
per-layer curves, not 200. :func:`step_scalars` gives the scalar names every sink and callback uses
(``grad_norm/total``, ``grad_norm/<group>``, ``gradwatch/lr_factor``, ...).

Example:
    >>> import io, json, gradwatch
    >>> from gradwatch.sinks import JsonlSink
    >>> from gradwatch.testing import nan_at
    >>> monitor = gradwatch.Monitor()
    >>> out = io.StringIO()
    >>> sink = JsonlSink(out).attach(monitor)
    >>> for stats in nan_at(step=3, steps=5):
    ...     _ = monitor.observe(stats)
    >>> _ = monitor.finish()
    >>> [json.loads(line)["event"] for line in out.getvalue().splitlines()][2:]
    ['step', 'finding', 'action', 'step', 'step', 'report']
    >>> sink.detach()
"""


from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradwatch.sinks.base import Sink, resolve_sinks
from gradwatch.sinks.jsonl import JsonlSink, read_jsonl
from gradwatch.sinks.logs import LoggingSink, WarnOnceSink
from gradwatch.sinks.scalars import group_layers, grouped_grad_norms, step_scalars

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch.sinks.tensorboard import TensorBoardSink
    from gradwatch.sinks.wandb import WandbSink

__all__ = [
    "JsonlSink",
    "LoggingSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "WarnOnceSink",
    "group_layers",
    "grouped_grad_norms",
    "read_jsonl",
    "resolve_sinks",
    "step_scalars",
]

_LAZY = {"TensorBoardSink": "gradwatch.sinks.tensorboard", "WandbSink": "gradwatch.sinks.wandb"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradwatch.sinks' has no attribute {name!r}")
