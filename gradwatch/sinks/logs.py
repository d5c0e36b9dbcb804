"""Sinks that speak through Python's own channels: :mod:`logging` and :mod:`warnings`."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

from gradwatch.findings import severity_rank
from gradwatch.sinks.base import Sink
from gradwatch.sinks.scalars import grouped_grad_norms

if TYPE_CHECKING:
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import StepStats

__all__ = ["LoggingSink", "WarnOnceSink"]

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
