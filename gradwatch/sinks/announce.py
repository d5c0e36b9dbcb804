"""Say what gradwatch changes in a run while it changes it: :class:`Announcer`.

Every :class:`~gradwatch.Monitor` has one unless it is built with ``announce=False``. When
gradwatch acts on the run — skips a step, clips, lowers the learning rate, rolls back — one line
goes to the ``gradwatch`` logger at WARNING (shown on stderr when logging is not configured): the
first action of each kind, then again when that kind has happened 10, 100, 1000... times, so a
long run is told without being flooded. Advice that changes nothing (``recommend_batchnorm``) is
told once. When training ends, one line sums up what was found and done (nothing at all for a
healthy run). Through the plugin hooks, so on a distributed run only rank 0 speaks.

A :class:`~gradwatch.sinks.LoggingSink` attached to the same monitor already logs every action:
the announcer then keeps quiet, so nothing is said twice.

Example:
    >>> import logging, gradwatch
    >>> from gradwatch.testing import nan_at
    >>> lines = []
    >>> class Keep(logging.Handler):
    ...     def emit(self, record): lines.append(record.getMessage())
    >>> logging.getLogger("gradwatch").addHandler(handler := Keep())
    >>> monitor = gradwatch.Monitor()
    >>> decisions = [monitor.observe(s) for s in nan_at(step=5, steps=8)]
    >>> _ = monitor.finish()
    >>> logging.getLogger("gradwatch").removeHandler(handler)
    >>> print(lines[0])
    gradwatch skipped step 5 (nonfinite): skipped the step: parameters and optimizer state unchanged
    >>> lines[-1].startswith("gradwatch: run done")
    True
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gradwatch.findings import severity_rank
from gradwatch.sinks.base import Sink

if TYPE_CHECKING:
    from gradwatch.findings import Action
    from gradwatch.monitor import Monitor
    from gradwatch.report import Report

__all__ = ["Announcer"]

_VERBS = {
    "skip_step": "skipped step",
    "clip": "clipped the gradient norm at step",
    "lr_decay": "lowered the learning rate at step",
    "rollback": "rolled back at step",
    "recommend_batchnorm": "recommends, at step",
}


class Announcer(Sink):
    """Log each kind of action as it happens (rate-limited) and one summary line at the end.

    Args:
        logger: A logger or its name. Defaults to ``"gradwatch"``.
        level: The level of the lines. Defaults to ``logging.WARNING`` (shown without any
            logging configuration).
    """

    def __init__(self, logger: logging.Logger | str = "gradwatch", *, level: int = logging.WARNING) -> None:
        super().__init__()
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level
        self.counts: dict[str, int] = {}

    def _quiet(self, monitor: Monitor | None) -> bool:
        """Another sink of this monitor already logs every action."""
        from gradwatch.sinks.logs import LoggingSink

        if monitor is None:
            return False
        return any(isinstance(p, LoggingSink) and p.accepts(monitor) for p in monitor.hooks.manager.get_plugins())

    def write_action(self, action: Action, monitor: Monitor) -> None:
        n = self.counts[action.kind] = self.counts.get(action.kind, 0) + 1
        once = action.kind == "recommend_batchnorm"
        if (once and n > 1) or (not once and n not in (1, 10, 100, 1000, 10000, 100000)) or self._quiet(monitor):
            return
        verb = _VERBS.get(action.kind, f"{action.kind} at step")
        if n == 1:
            self.logger.log(self.level, "gradwatch %s %d (%s): %s", verb, action.step, action.reason, action.message)
        else:
            self.logger.log(self.level, "gradwatch: %d %s actions so far (the latest at step %d: %s)",
                            n, action.kind, action.step, action.message)

    def write_report(self, report: Report, monitor: Monitor | None) -> None:
        alarms = sorted({f.kind for f in report.findings if severity_rank(f.severity) >= 1})
        if not report.action_counts and not alarms or self._quiet(monitor):
            return
        done = ", ".join(f"{kind} x{n}" for kind, n in sorted(report.action_counts.items())) or "no action"
        self.logger.log(
            self.level, "gradwatch: run done, %s: found %s; did %s. %s",
            report.verdict(), ", ".join(alarms) or "nothing serious", done,
            "Call report() (or read the JSON/HTML report) for the details." if alarms else "",
        )

    def state(self) -> dict[str, Any]:
        """How many of each action kind were announced (for tests and resumed runs)."""
        return dict(self.counts)
