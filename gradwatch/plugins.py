"""The plugin manager: built-in plugins first, then the ``gradwatch`` entry points.

:func:`get_plugin_manager` builds one :class:`pluggy.PluginManager` per process. Set the
environment variable ``GRADWATCH_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points (the built-ins
still load). :class:`Hooks` is the typed facade the rest of gradwatch calls through.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pluggy

from gradwatch import hookspecs
from gradwatch.hookspecs import PROJECT, hookimpl

if TYPE_CHECKING:
    from gradwatch.detectors.base import Detector
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import StepStats

AUTOLOAD_ENV = "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD"
_manager: pluggy.PluginManager | None = None


class BuiltinDetectors:
    """The built-in plugin: contributes the five default detectors."""

    @hookimpl
    def gradwatch_add_detectors(self, config: dict[str, Any]) -> list[Detector]:
        from gradwatch.detectors import default_detectors

        return default_detectors()


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def make_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager: hookspecs, built-ins, then entry points, then ``check_pending()``.

    Args:
        autoload: Load the ``gradwatch`` entry-point group. Defaults to True unless
            ``GRADWATCH_DISABLE_PLUGIN_AUTOLOAD`` is set.

    Returns:
        The manager.

    Raises:
        pluggy.PluginValidationError: when a plugin implements a hook that does not exist.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(BuiltinDetectors(), name="gradwatch.builtin_detectors")
    if autoload if autoload is not None else not _autoload_disabled():
        pm.load_setuptools_entrypoints(PROJECT)
    pm.check_pending()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    global _manager
    if _manager is None:
        _manager = make_plugin_manager()
    return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager so the next call rebuilds it (tests, new entry points)."""
    global _manager
    _manager = None


class Hooks:
    """Typed calls into the plugin hooks: call sites never pass loose keyword arguments.

    Args:
        manager: The plugin manager. Defaults to :func:`get_plugin_manager`.
    """

    def __init__(self, manager: pluggy.PluginManager | None = None) -> None:
        self.manager = manager if manager is not None else get_plugin_manager()
        self._hook = self.manager.hook

    @property
    def speaks(self) -> bool:
        """This process speaks for the run (False on distributed ranks other than 0)."""
        return True

    def detectors(self, config: dict[str, Any]) -> list[Detector]:
        found: list[Detector] = []
        # pluggy calls the most recently registered first; built-ins registered first go last.
        for contributed in reversed(self._hook.gradwatch_add_detectors(config=config)):
            found.extend(contributed or [])
        return found

    def select_actions(self, findings: list[Finding], stats: StepStats, decision: Decision, monitor: Monitor) -> Decision:
        chosen = self._hook.gradwatch_select_actions(findings=findings, stats=stats, decision=decision, monitor=monitor)
        return chosen if chosen is not None else decision

    def on_step(self, stats: StepStats, decision: Decision, monitor: Monitor) -> None:
        self._hook.gradwatch_on_step(stats=stats, decision=decision, monitor=monitor)

    def on_finding(self, finding: Finding, monitor: Monitor) -> None:
        self._hook.gradwatch_on_finding(finding=finding, monitor=monitor)

    def on_action(self, action: Action, monitor: Monitor) -> None:
        self._hook.gradwatch_on_action(action=action, monitor=monitor)

    def on_report(self, report: Report, monitor: Monitor | None = None) -> None:
        self._hook.gradwatch_on_report(report=report, monitor=monitor)
