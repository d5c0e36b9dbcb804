"""The :class:`Sink` base class and :func:`resolve_sinks`.

A sink is a plugin that implements the ``gradwatch_on_*`` hooks of :mod:`gradwatch.hookspecs`.
:class:`Sink` is the convenient base: subclasses override the plain methods :meth:`Sink.write_step`,
:meth:`Sink.write_finding`, :meth:`Sink.write_action`, :meth:`Sink.write_report` and
:meth:`Sink.close`, and the base class does the plumbing (attaching to one monitor or all,
writing a step record every ``every`` steps, turning a sink's own error into one warning).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

from gradwatch.errors import GradwatchWarning
from gradwatch.hookspecs import hookimpl

if TYPE_CHECKING:
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import StepStats

__all__ = ["Sink", "resolve_sinks"]


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
    from gradwatch.sinks.jsonl import JsonlSink

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
