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

Built-in sinks here need only the core: :class:`JsonlSink` (one JSON object per line; what a bare
path resolves to, see :func:`resolve_sinks`) and :class:`LoggingSink` (Python's ``logging``). The
TensorBoard and Weights & Biases sinks live in ``gradwatch.integrations.tensorboard`` and
``gradwatch.integrations.wandb``.

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

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pluggy

from gradwatch.errors import GradwatchWarning
from gradwatch.findings import _jsonable, severity_rank
from gradwatch.hookspecs import hookimpl

if TYPE_CHECKING:
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import Layout, StepStats

__all__ = [
    "JsonlSink",
    "LoggingSink",
    "Sink",
    "group_layers",
    "grouped_grad_norms",
    "resolve_sinks",
    "step_scalars",
]

_SEPARATOR = re.compile(r"[./]")


# -- grouping --------------------------------------------------------------------------------------


def group_layers(layer_names: Sequence[str], max_groups: int = 8) -> tuple[tuple[str, ...], np.ndarray]:
    """Group layers for logging: few groups, named by module path, in forward order.

    Layers are grouped by their top-level module (the name up to the first ``.`` or ``/``); then,
    while there is room for at most ``max_groups`` groups, the group with the most layers is split
    into its sub-modules (``bert`` into ``bert.embeddings``, ``bert.encoder.layer.0``, ...). When
    even the top level has more than ``max_groups`` modules (a long ``nn.Sequential``),
    consecutive ones are merged into ``max_groups`` runs named ``first..last``.

    Args:
        layer_names: Distinct layer names in forward order (``Layout.layer_names()``).
        max_groups: The most groups to return. Defaults to 8.

    Returns:
        The group names, and for each layer the index of its group.

    Raises:
        ValueError: if ``max_groups < 1``.

    Example:
        >>> group_layers(["enc.0", "enc.1", "dec.0", "head"], max_groups=4)
        (('enc.0', 'enc.1', 'dec', 'head'), array([0, 1, 2, 3]))
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1. Received max_groups={max_groups}.")
    names = list(layer_names)
    if not names:
        return (), np.zeros(0, dtype=np.int64)
    cuts = [[m.start() for m in _SEPARATOR.finditer(n)] + [len(n)] for n in names]

    def prefix(i: int, depth: int) -> str:
        return names[i][: cuts[i][min(depth, len(cuts[i])) - 1]]

    def split(members: list[int], depth: int) -> dict[str, list[int]]:
        kids: dict[str, list[int]] = {}
        for i in members:
            kids.setdefault(prefix(i, depth), []).append(i)
        return kids

    top = split(list(range(len(names))), 1)
    if len(top) > max_groups:
        distinct = list(top)
        buckets: dict[int, list[str]] = {}
        for k, g in enumerate(distinct):
            buckets.setdefault(k * max_groups // len(distinct), []).append(g)
        labels = [m[0] if len(m) == 1 else f"{m[0]}..{m[-1]}" for m in buckets.values()]
        bucket_of = {g: b for b, m in enumerate(buckets.values()) for g in m}
        return tuple(labels), np.array([bucket_of[prefix(i, 1)] for i in range(len(names))], dtype=np.int64)
    nodes: list[tuple[int, list[int]]] = [(1, m) for m in top.values()]  # (depth, layer indices)

    def split_one() -> bool:
        """Split the largest group that can be split within the budget; False if none can."""
        for node in sorted(nodes, key=lambda n: (-len(n[1]), n[1][0])):
            depth, members = node
            kids: dict[str, list[int]] = {}
            while len(kids) < 2 and max(len(cuts[i]) for i in members) > depth:
                depth += 1  # descend through single-child chains (bert.encoder -> .layer -> .0, .1)
                kids = split(members, depth)
            if len(kids) > 1 and len(nodes) - 1 + len(kids) <= max_groups:
                at = nodes.index(node)
                nodes[at : at + 1] = [(depth, m) for m in kids.values()]
                return True
        return False

    while len(nodes) < max_groups and split_one():
        pass
    nodes.sort(key=lambda n: n[1][0])
    index = np.zeros(len(names), dtype=np.int64)
    for position, (_, members) in enumerate(nodes):
        index[members] = position
    return tuple(prefix(m[0], d) for d, m in nodes), index


_GROUP_CACHE: dict[tuple[int, int], tuple[Layout, tuple[str, ...], np.ndarray]] = {}


def _groups_for(layout: Layout, max_groups: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Tensor -> group index for a layout, computed once per layout object."""
    key = (id(layout), max_groups)
    hit = _GROUP_CACHE.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1], hit[2]
    layer_names = layout.layer_names()
    groups, layer_group = group_layers(layer_names, max_groups)
    position = {name: i for i, name in enumerate(layer_names)}
    tensor_group = np.array([layer_group[position[layer]] for layer in layout.layers], dtype=np.int64)
    if len(_GROUP_CACHE) > 64:
        _GROUP_CACHE.clear()
    _GROUP_CACHE[key] = (layout, groups, tensor_group)
    return groups, tensor_group


def grouped_grad_norms(stats: StepStats, max_groups: int = 8) -> dict[str, float]:
    """The L2 gradient norm of each layer group (see :func:`group_layers`), forward order.

    Groups without any gradient this step (frozen, unused) are left out; a group holding a
    non-finite gradient has a non-finite norm.

    Args:
        stats: The step's statistics.
        max_groups: The most groups. Defaults to 8.

    Returns:
        ``{group: norm}``.
    """
    groups, tensor_group = _groups_for(stats.layout, max_groups)
    grad = np.where(stats.has_grad, stats.grad_norm, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = np.bincount(tensor_group, weights=grad * grad, minlength=len(groups))
    present = np.bincount(tensor_group, weights=stats.has_grad.astype(float), minlength=len(groups)) > 0
    return {g: float(np.sqrt(s)) for g, s, p in zip(groups, sums, present) if p}


def step_scalars(stats: StepStats, decision: Decision | None = None, max_groups: int = 8) -> dict[str, float]:
    """The scalars gradwatch logs for one step, under the names every sink and callback uses.

    * ``grad_norm/total``: the global gradient norm (unscaled, before any clipping).
    * ``grad_norm/<group>``: one per layer group (:func:`grouped_grad_norms`).
    * ``gradwatch/lr_factor``, ``gradwatch/clipped``, ``gradwatch/skipped``: the decision.
    * ``gradwatch/loss``: the loss gradwatch saw, when known.

    Args:
        stats: The step's statistics.
        decision: The decision for the step. Defaults to None (no decision scalars).
        max_groups: The most per-layer groups. Defaults to 8.

    Returns:
        ``{name: value}`` in a stable order.
    """
    scalars = {"grad_norm/total": stats.global_norm}
    for group, norm in grouped_grad_norms(stats, max_groups).items():
        scalars[f"grad_norm/{group}"] = norm
    if decision is not None:
        scalars["gradwatch/lr_factor"] = float(decision.lr_factor)
        scalars["gradwatch/clipped"] = float(decision.clip_norm is not None)
        scalars["gradwatch/skipped"] = float(decision.skip)
    if stats.loss is not None:
        scalars["gradwatch/loss"] = float(stats.loss)
    return scalars


# -- the base class ----------------------------------------------------------------------------


class Sink:
    """Base class of gradwatch sinks: subclasses override the ``write_*`` methods and ``close``.

    Args:
        every: Write a step record every this many measured steps (findings, actions and reports
            are always written). Defaults to 1.
        max_groups: The most per-layer groups in a step record. Defaults to 8.
        strict: Raise a sink's own errors instead of warning once and detaching. Defaults to False.

    Raises:
        ValueError: if ``every < 1`` or ``max_groups < 1``.
    """

    def __init__(self, *, every: int = 1, max_groups: int = 8, strict: bool = False) -> None:
        if every < 1 or max_groups < 1:
            raise ValueError(f"every and max_groups must be >= 1. Received every={every}, max_groups={max_groups}.")
        self.every = every
        self.max_groups = max_groups
        self.strict = strict
        self.monitors: list[Monitor] = []
        self._managers: list[pluggy.PluginManager] = []
        self._steps_seen = 0
        self._broken = False

    # -- attaching ---------------------------------------------------------------------------

    def attach(self, monitor: Monitor) -> Sink:
        """Send this monitor's events (and only those) to this sink.

        Args:
            monitor: The monitor (``watch.monitor``, ``callback.monitor``).

        Returns:
            The sink itself, for chaining.
        """
        if not any(m is monitor for m in self.monitors):
            self.monitors.append(monitor)
        self._register(monitor.hooks.manager)
        return self

    def register(self, manager: pluggy.PluginManager | None = None) -> Sink:
        """Send every monitor's events to this sink (process-wide), unless it is attached.

        Args:
            manager: The plugin manager. Defaults to :func:`gradwatch.plugins.get_plugin_manager`.

        Returns:
            The sink itself.
        """
        from gradwatch.plugins import get_plugin_manager

        self._register(manager if manager is not None else get_plugin_manager())
        return self

    def _register(self, manager: pluggy.PluginManager) -> None:
        if not manager.is_registered(self):
            manager.register(self)
            self._managers.append(manager)

    def detach(self) -> None:
        """Unregister from every plugin manager and close. Safe to call twice."""
        for manager in self._managers:
            if manager.is_registered(self):
                manager.unregister(self)
        self._managers.clear()
        self.monitors.clear()
        self.close()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def accepts(self, monitor: Monitor | None) -> bool:
        """True when this sink takes events from ``monitor`` (any monitor when not attached)."""
        if self._broken:
            return False
        return not self.monitors or any(m is monitor for m in self.monitors)

    # -- what subclasses override ------------------------------------------------------------

    def write_step(self, stats: StepStats, decision: Decision, monitor: Monitor) -> None:
        """Write one measured step (called every ``every`` steps)."""

    def write_finding(self, finding: Finding, monitor: Monitor) -> None:
        """Write a new finding (once per episode)."""

    def write_action(self, action: Action, monitor: Monitor) -> None:
        """Write an action taken or advised."""

    def write_report(self, report: Report, monitor: Monitor | None) -> None:
        """Write the final report."""

    def close(self) -> None:
        """Flush and release resources. Safe to call twice."""

    # -- the hooks ---------------------------------------------------------------------------

    def _guard(self, write: Any, *args: Any) -> None:
        try:
            write(*args)
        except Exception as exc:
            if self.strict:
                raise
            self._broken = True
            warnings.warn(
                f"gradwatch sink {type(self).__name__} failed ({type(exc).__name__}: {exc}); it stops "
                "writing and training goes on. Pass strict=True to the sink to raise instead.",
                GradwatchWarning,
                stacklevel=2,
            )

    @hookimpl
    def gradwatch_on_step(self, stats: StepStats, decision: Decision, monitor: Monitor) -> None:
        if not self.accepts(monitor):
            return
        self._steps_seen += 1
        if (self._steps_seen - 1) % self.every == 0:
            self._guard(self.write_step, stats, decision, monitor)

    @hookimpl
    def gradwatch_on_finding(self, finding: Finding, monitor: Monitor) -> None:
        if self.accepts(monitor):
            self._guard(self.write_finding, finding, monitor)

    @hookimpl
    def gradwatch_on_action(self, action: Action, monitor: Monitor) -> None:
        if self.accepts(monitor):
            self._guard(self.write_action, action, monitor)

    @hookimpl
    def gradwatch_on_report(self, report: Report, monitor: Monitor | None) -> None:
        if self.accepts(monitor):
            self._guard(self.write_report, report, monitor)


# -- JSON Lines ------------------------------------------------------------------------------------


def _number(x: float | None) -> float | str | None:
    return _jsonable(float(x)) if x is not None else None


class JsonlSink(Sink):
    """One JSON object per line: ``step``, ``finding``, ``action`` and ``report`` events.

    Every line has ``"event"`` and ``"time"`` (Unix seconds). Step lines carry ``step``,
    ``global_norm``, ``grad_norm`` (``{group: norm}``), ``loss``, ``lr``, ``lr_factor``, ``skip``
    and ``clip_norm``; finding and action lines are ``Finding.to_dict()`` / ``Action.to_dict()``;
    the report line holds ``Report.to_dict()`` under ``"report"``. Non-finite numbers follow the
    report's JSON convention: NaN is ``null``, infinities are ``"inf"`` / ``"-inf"``.

    Args:
        path: A file path (opened for appending, so a resumed run continues the file; parent
            directories are created) or an open text stream (not closed by the sink).
        flush_every: Flush the file every this many step lines (findings, actions and reports
            flush at once). Defaults to 20.
        **kwargs: ``every``, ``max_groups``, ``strict`` (see :class:`Sink`).
    """

    def __init__(self, path: str | os.PathLike[str] | IO[str], *, flush_every: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flush_every = max(1, int(flush_every))
        self._owns_file = isinstance(path, (str, os.PathLike))
        self._file: IO[str] | None = None
        if isinstance(path, (str, os.PathLike)):
            self.path: str | None = os.fspath(path)
        else:
            self.path = getattr(path, "name", None)
            self._file = path
        self._pending = 0

    def _out(self) -> IO[str]:
        if self._file is None:
            assert self.path is not None
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        return self._file

    def _write(self, record: dict[str, Any], flush: bool) -> None:
        out = self._out()
        out.write(json.dumps(record, allow_nan=False) + "\n")
        self._pending += 1
        if flush or self._pending >= self.flush_every:
            out.flush()
            self._pending = 0

    def write_step(self, stats: StepStats, decision: Decision, monitor: Monitor) -> None:
        self._write({
            "event": "step",
            "time": time.time(),
            "step": stats.step,
            "global_norm": _number(stats.global_norm),
            "grad_norm": {g: _number(v) for g, v in grouped_grad_norms(stats, self.max_groups).items()},
            "loss": _number(stats.loss),
            "lr": _number(stats.lr),
            "lr_factor": _number(decision.lr_factor),
            "skip": bool(decision.skip),
            "clip_norm": _number(decision.clip_norm),
        }, flush=False)

    def write_finding(self, finding: Finding, monitor: Monitor) -> None:
        self._write({"event": "finding", "time": time.time(), **finding.to_dict()}, flush=True)

    def write_action(self, action: Action, monitor: Monitor) -> None:
        self._write({"event": "action", "time": time.time(), **action.to_dict()}, flush=True)

    def write_report(self, report: Report, monitor: Monitor | None) -> None:
        self._write({"event": "report", "time": time.time(), "report": report.to_dict()}, flush=True)

    def close(self) -> None:
        if self._file is not None:
            if self._owns_file:
                self._file.close()
                self._file = None
            else:
                self._file.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read back what a :class:`JsonlSink` wrote: one dict per line.

    Args:
        path: The file.

    Returns:
        The records, in order.
    """
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- logging ---------------------------------------------------------------------------------------

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class WarnOnceSink(Sink):
    """Findings of severity warning or error as one Python warning per finding kind (the first
    one of each kind), for the training callbacks that speak through warnings.

    Args:
        warn: How to warn (``lightning``'s ``rank_zero_warn`` for one warning on rank zero).
            Defaults to ``warnings.warn`` with ``UserWarning``.

    Attributes:
        enabled: False silences it (processes other than the main one).
    """

    def __init__(self, warn: Any = None) -> None:
        super().__init__()
        self.warned: set[str] = set()
        self.enabled = True
        self._warn = warn

    def write_finding(self, finding: Any, monitor: Monitor) -> None:
        if not self.enabled or severity_rank(finding.severity) < 1 or finding.kind in self.warned:
            return
        self.warned.add(finding.kind)
        if self._warn is not None:
            self._warn(f"gradwatch: {finding}")
        else:
            warnings.warn(f"gradwatch: {finding}", UserWarning, stacklevel=2)


class LoggingSink(Sink):
    """Findings, actions and the report through Python's :mod:`logging`.

    Findings log at their severity (``info`` / ``warning`` / ``error``), actions at INFO
    (``skip_step`` and ``rollback`` at WARNING; repeats of a ``clip``, which a standing clip level
    makes on every step it binds, at DEBUG), the final report at INFO when healthy and WARNING
    otherwise, and step lines (global norm, loss, LR factor) at DEBUG every ``every`` steps.

    Args:
        logger: A logger or a logger name. Defaults to ``"gradwatch"``.
        step_level: The level of step lines. Defaults to ``logging.DEBUG``.
        **kwargs: ``every``, ``max_groups``, ``strict`` (see :class:`Sink`).
    """

    def __init__(self, logger: logging.Logger | str = "gradwatch", *, step_level: int = logging.DEBUG, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.step_level = step_level
        self._clipped = False

    def write_step(self, stats: StepStats, decision: Decision, monitor: Monitor) -> None:
        if not self.logger.isEnabledFor(self.step_level):
            return
        groups = ", ".join(f"{g}={v:.3g}" for g, v in grouped_grad_norms(stats, self.max_groups).items())
        loss = "?" if stats.loss is None else f"{stats.loss:.4g}"
        self.logger.log(
            self.step_level, "gradwatch step %d: grad_norm %.4g, loss %s, lr x%g [%s]",
            stats.step, stats.global_norm, loss, decision.lr_factor, groups,
        )

    def write_finding(self, finding: Finding, monitor: Monitor) -> None:
        self.logger.log(_LEVELS.get(finding.severity, logging.WARNING), "gradwatch: %s", finding)

    def write_action(self, action: Action, monitor: Monitor) -> None:
        if action.kind in ("skip_step", "rollback"):
            level = logging.WARNING
        elif action.kind == "clip":
            level = logging.DEBUG if self._clipped else logging.INFO
            self._clipped = True
        else:
            level = logging.INFO
        self.logger.log(level, "gradwatch: %s", action)

    def write_report(self, report: Report, monitor: Monitor | None) -> None:
        self.logger.log(logging.INFO if report.healthy else logging.WARNING, "gradwatch report:\n%s", report.summary())


# -- resolving what users pass ---------------------------------------------------------------------


def resolve_sinks(sinks: Iterable[Sink | str | os.PathLike[str]] | Sink | str | os.PathLike[str] | None) -> list[Sink]:
    """Turn what a user passes as ``sinks=`` into sink objects.

    A :class:`Sink` (or any pluggy plugin object with ``attach``) is kept; a path (``str`` or
    ``os.PathLike``) becomes a :class:`JsonlSink` writing there.

    Args:
        sinks: One sink or path, a list of them, or None.

    Returns:
        The sinks.

    Raises:
        TypeError: for anything else.
    """
    if sinks is None:
        return []
    if isinstance(sinks, (Sink, str, os.PathLike)):
        sinks = [sinks]
    resolved: list[Sink] = []
    for s in sinks:
        if isinstance(s, (str, os.PathLike)):
            resolved.append(JsonlSink(s))
        elif isinstance(s, Sink) or callable(getattr(s, "attach", None)):
            resolved.append(s)
        else:
            raise TypeError(
                "Each sink must be a gradwatch.sinks.Sink (JsonlSink, LoggingSink, TensorBoardSink, "
                f"WandbSink, your own) or a file path for a JsonlSink. Received {type(s).__name__}: {s!r}."
            )
    return resolved
