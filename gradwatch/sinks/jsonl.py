"""JSON Lines: one JSON object per line for every step, finding, action and report."""

from __future__ import annotations

import json
import os
import time
from typing import IO, TYPE_CHECKING, Any

from gradwatch.jsonvalues import to_json
from gradwatch.sinks.base import Sink
from gradwatch.sinks.scalars import grouped_grad_norms

if TYPE_CHECKING:
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import StepStats

__all__ = ["JsonlSink", "read_jsonl"]


def _number(x: float | None) -> float | str | None:
    return to_json(float(x)) if x is not None else None


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
