"""Every pluggy hook gradwatch calls, in one place.

A plugin is any object or module with functions named like these specs and decorated with
:data:`hookimpl`. Plugins are found through the ``gradwatch`` entry-point group (set
``GRADWATCH_DISABLE_PLUGIN_AUTOLOAD=1`` to turn that off) or registered by hand with
``gradwatch.plugins.get_plugin_manager().register(obj)``.

Example (a sink that prints every finding)::

    import gradwatch

    class PrintSink:
        @gradwatch.hookimpl
        def gradwatch_on_finding(self, finding, monitor):
            print(finding)

    gradwatch.plugins.get_plugin_manager().register(PrintSink())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gradwatch.detectors.base import Detector
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import StepStats

PROJECT = "gradwatch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gradwatch_add_detectors(config: dict[str, Any]) -> list[Detector] | None:
    """Contribute extra detectors to every new :class:`~gradwatch.Monitor`.

    Called once when a monitor is built (built-in detectors come from the built-in plugin through
    this same hook, so they are listed first).

    Args:
        config: The monitor's keyword configuration (``{"policy": "auto", ...}``), read-only.

    Returns:
        A list of :class:`~gradwatch.detectors.Detector` tuples, or None to add nothing. Kinds may
        be new (a plugin's own finding kind) or repeat a built-in kind.
    """


@hookspec(firstresult=True)
def gradwatch_select_actions(
    findings: list[Finding], stats: StepStats, decision: Decision, monitor: Monitor
) -> Decision | None:
    """Replace the policy's decision for one step (remedy selection).

    Called after the policy decided, before the decision reaches the adapter. The first plugin
    that returns a decision wins, and the :class:`~gradwatch.Monitor` makes it final: its
    ``skip``, ``clip_norm`` and ``rollback`` are carried out on this step by adapters that can still
    act on it (PyTorch), and its ``lr_factor`` and ``controls`` become the standing orders
    (``monitor.controls``) that every adapter applies from then on, on measured and unmeasured
    steps alike, compiled Keras steps included. A changed ``lr_factor`` wins over
    ``controls.lr_factor``.

    Args:
        findings: This step's findings.
        stats: This step's statistics.
        decision: What the policy decided.
        monitor: The monitor (read ``monitor.controls`` and ``monitor.policy``; do not mutate).

    Returns:
        A :class:`~gradwatch.policy.Decision` to use instead, or None to keep the policy's.
    """


@hookspec
def gradwatch_on_step(stats: StepStats, decision: Decision, monitor: Monitor) -> None:
    """A measured step was judged (sinks: log the norms).

    Called once per measured step, after the decision, on the training thread: keep it cheap.

    Args:
        stats: The step's statistics (numpy; safe to keep).
        decision: The decision for the step.
        monitor: The monitor.
    """


@hookspec
def gradwatch_on_finding(finding: Finding, monitor: Monitor) -> None:
    """A new finding was made.

    Called once per episode: a condition that persists over consecutive steps is merged into one
    finding whose ``count`` and ``last_step`` grow, and this hook sees its first step only.

    Args:
        finding: The finding.
        monitor: The monitor.
    """


@hookspec
def gradwatch_on_action(action: Action, monitor: Monitor) -> None:
    """An action was taken (or, for ``recommend_batchnorm``, advised).

    Args:
        action: The action.
        monitor: The monitor.
    """


@hookspec
def gradwatch_on_report(report: Report, monitor: Monitor | None) -> None:
    """A final report was produced (``Monitor.finish()``, end of ``fit``, end of a check).

    Args:
        report: The report.
        monitor: The monitor that produced it, or None when the report does not come from one
            monitor (a report rebuilt from JSON, a ``gradwatch check`` summary). Implementations
            may leave this argument out.
    """
