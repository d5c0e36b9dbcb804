"""Weights & Biases sink: gradwatch's scalars, findings and report in a W&B run.

::

    import wandb, gradwatch
    from gradwatch.sinks import WandbSink

    run = wandb.init(project="my-project")
    watch = gradwatch.watch(model, optimizer)
    WandbSink(run).attach(watch.monitor)

Per measured step (every ``every`` steps) it logs the same scalars as every gradwatch sink
(:func:`gradwatch.sinks.step_scalars`: ``grad_norm/total``, a few ``grad_norm/<group>``,
``gradwatch/lr_factor``, ``gradwatch/clipped``, ``gradwatch/skipped``, ``gradwatch/loss``) against
its own x-axis ``gradwatch/step`` (declared with ``run.define_metric``), so it never fights over
W&B's ``step`` with your own ``run.log`` calls or Lightning's ``WandbLogger``. Findings and actions
are printed to the run's console as they happen and logged as two tables (``gradwatch/findings``,
``gradwatch/actions``) with the final report, whose headline numbers go to the run summary
(``gradwatch/healthy``, ``gradwatch/findings/<kind>``, ``gradwatch/actions/<kind>``,
``gradwatch/skipped_steps``).

This costs a few scalars per step. For comparison, ``wandb.watch(model, log="gradients")`` logs a
histogram per tensor and makes a step several times slower (docs/benchmarks.md).

Raises:
    gradwatch.MissingExtraError: on import, when ``wandb`` is not installed
    (``pip install 'gradwatch[wandb]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch.errors import require
from gradwatch.sinks.base import Sink
from gradwatch.sinks.scalars import step_scalars

wandb = require("wandb", "wandb")

if TYPE_CHECKING:
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import StepStats

__all__ = ["WandbSink"]

_FINDING_COLUMNS = ["step", "last_step", "count", "kind", "severity", "layers", "message"]
_ACTION_COLUMNS = ["step", "kind", "reason", "message"]


class WandbSink(Sink):
    """Log gradwatch's per-step scalars, findings, actions and report to a W&B run.

    Args:
        run: The W&B run. Defaults to the active run (``wandb.run``) at the first write.
        console: Print findings and actions to the run's console (``wandb.termwarn``) as they
            happen. Defaults to True.
        **kwargs: ``every``, ``max_groups``, ``strict`` (see :class:`gradwatch.sinks.Sink`).

    Raises:
        RuntimeError: at the first write, if no run was given and none is active.
    """

    def __init__(self, run: Any = None, *, console: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._run = run
        self.console = console
        self._defined: Any = None
        self._findings: list[list[Any]] = []
        self._actions: list[list[Any]] = []

    @property
    def run(self) -> Any:
        """The W&B run written to."""
        run = self._run if self._run is not None else wandb.run
        if run is None:
            raise RuntimeError(
                "WandbSink has no W&B run to log to: pass WandbSink(run) or call wandb.init() before "
                "training starts. Received run=None and wandb.run is None."
            )
        if self._defined is not run:
            run.define_metric("gradwatch/step")
            for pattern in ("grad_norm/*", "gradwatch/*"):
                run.define_metric(pattern, step_metric="gradwatch/step")
            self._defined = run
        return run

    def write_step(self, stats: StepStats, decision: Decision, monitor: Monitor) -> None:
        scalars: dict[str, Any] = {"gradwatch/step": stats.step}
        scalars.update(step_scalars(stats, decision, self.max_groups))
        self.run.log(scalars)

    def write_finding(self, finding: Finding, monitor: Monitor) -> None:
        self._findings.append([finding.step, finding.last_step, finding.count, finding.kind, finding.severity,
                               ", ".join(finding.layers), finding.message])
        if self.console and finding.severity != "info":
            wandb.termwarn(f"gradwatch: {finding}")

    def write_action(self, action: Action, monitor: Monitor) -> None:
        self._actions.append([action.step, action.kind, action.reason, action.message])
        if self.console:
            wandb.termlog(f"gradwatch: {action}")

    def write_report(self, report: Report, monitor: Monitor | None) -> None:
        run = self.run
        # The report's findings carry the final counts of merged episodes.
        findings = [[f.step, f.last_step, f.count, f.kind, f.severity, ", ".join(f.layers), f.message]
                    for f in report.findings] or self._findings
        run.log({
            "gradwatch/findings": wandb.Table(columns=_FINDING_COLUMNS, data=findings),
            "gradwatch/actions": wandb.Table(columns=_ACTION_COLUMNS, data=self._actions),
        })
        summary = {
            "gradwatch/healthy": report.healthy,
            "gradwatch/steps_measured": report.steps_measured,
            "gradwatch/skipped_steps": report.skipped_steps,
        }
        for kind, counts in report.finding_counts.items():
            summary[f"gradwatch/findings/{kind}"] = int(sum(counts.values()))
        for kind, n in report.action_counts.items():
            summary[f"gradwatch/actions/{kind}"] = int(n)
        run.summary.update(summary)
