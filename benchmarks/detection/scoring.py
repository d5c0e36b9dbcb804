"""Framework-neutral scoring of detection scenarios: detected, kind, latency, false alarms.

A scenario's *label* is ``"healthy"`` or the finding kind it is built to produce. Its *onset* is the
optimizer step where the pathology begins (0 for "from the start"); latency is the first step with
a finding of that kind (severity warning or error) minus the onset. A warning or error finding on a
healthy scenario, or one before the onset of a pathological scenario, is a false alarm. ``info``
findings are listed but never count as alarms (``Report.healthy`` ignores them too).

Each scenario also checks its own label with an independent measurement (plain autograd, the
unwatched loss, forward activations): :class:`LabelCheck`. A scenario whose label check fails is
reported as ``BAD LABEL`` and left out of the detection totals rather than silently counted.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gradwatch.findings import Finding, severity_rank


@dataclass
class LabelCheck:
    """The independent measurement behind a scenario's label.

    Attributes:
        ok: The measurement confirms the label.
        evidence: One line with the numbers.
        onset: The measured onset, for scenarios whose onset is not set by design (a ReLU layer
            that dies after an LR spike). None to keep the designed onset.
    """

    ok: bool
    evidence: str
    onset: int | None = None


@dataclass
class Outcome:
    """One scenario's result.

    Attributes:
        framework: ``"torch"`` or ``"keras/<backend>"``.
        name: Scenario name.
        label: ``"healthy"`` or the expected finding kind.
        about: What the scenario is (the trap it sets, or where the pathology is).
        onset: Step where the pathology begins (None for healthy).
        check: The label check.
        detected: A finding of the expected kind (warning or error) at or after the onset.
        first_kind: Kind of the first warning/error finding at or after the onset (any kind).
        latency: Steps from the onset to the first finding of the expected kind.
        false_alarms: ``"kind@step"`` for each warning/error finding on a healthy scenario or
            before the onset.
        other_kinds: Other warning/error kinds found after the onset (not alarms: the run is sick).
        info: ``"kind@step"`` of info findings (never alarms).
        identical: The watched run (policy ``observe``) ended bit-for-bit equal to the unwatched
            one; None when not compared.
        seconds: Wall time of the scenario (both runs).
        error: The exception that stopped the scenario, if one did (a bug in the benchmark or in
            gradwatch under ``strict=True``).
    """

    framework: str
    name: str
    label: str
    about: str
    onset: int | None
    check: LabelCheck
    detected: bool = False
    first_kind: str | None = None
    latency: int | None = None
    false_alarms: list[str] = field(default_factory=list)
    other_kinds: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    identical: bool | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.label == "healthy"

    @property
    def verdict(self) -> str:
        """``ok``, ``MISS``, ``FALSE ALARM``, ``LATE`` (found, > 10 steps), ``BAD LABEL`` or ``ERROR``."""
        if self.error is not None:
            return "ERROR"
        if not self.check.ok:
            return "BAD LABEL"
        if self.false_alarms:
            return "FALSE ALARM"
        if self.healthy:
            return "ok"
        if not self.detected:
            return "MISS"
        return "ok" if self.latency is not None and self.latency <= 10 else "LATE"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def score(
    *,
    framework: str,
    name: str,
    label: str,
    about: str,
    onset: int | None,
    check: LabelCheck,
    findings: Iterable[Finding],
    identical: bool | None,
    seconds: float,
) -> Outcome:
    """Score one scenario from the findings of its watched run(s).

    Args:
        framework: The framework label.
        name: The scenario's name.
        label: ``"healthy"`` or the expected kind.
        about: Description.
        onset: Designed onset (None for healthy); replaced by ``check.onset`` when that is set.
        check: The label check.
        findings: Every finding of the watched run(s) (merged repeats: their first step counts).
        identical: Whether the observed run equals the unwatched one.
        seconds: Wall time.

    Returns:
        The outcome.
    """
    if check.onset is not None:
        onset = check.onset
    out = Outcome(framework, name, label, about, onset, check, identical=identical, seconds=seconds)
    ordered = sorted(findings, key=lambda f: f.step)
    start = 0 if onset is None else onset
    for f in ordered:
        tag = f"{f.kind}@{f.step}"
        if severity_rank(f.severity) < 1:
            out.info.append(tag)
            continue
        if label == "healthy" or f.step < start:
            out.false_alarms.append(tag)
            continue
        if out.first_kind is None:
            out.first_kind = f.kind
        if f.kind == label:
            if not out.detected:
                out.detected = True
                out.latency = f.step - start
        elif f.kind not in out.other_kinds:
            out.other_kinds.append(f.kind)
    return out


def failed(framework: str, name: str, label: str, about: str, exc: BaseException, seconds: float) -> Outcome:
    """The outcome of a scenario that raised: counted as an error, never as a pass."""
    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return Outcome(framework, name, label, about, None, LabelCheck(False, "not run"), error=message, seconds=seconds)


def summarise(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Totals over the scenarios whose label check passed.

    Returns:
        ``scenarios``, ``healthy``, ``pathological``, ``bad_labels``, ``false_alarm_scenarios``,
        ``detected`` (of pathological), ``missed`` (names), ``median_latency``, ``max_latency``,
        ``late`` (names with latency > 10).
    """
    valid = [o for o in outcomes if o.check.ok]
    healthy = [o for o in valid if o.healthy]
    sick = [o for o in valid if not o.healthy]
    latencies = [o.latency for o in sick if o.detected and o.latency is not None]
    return {
        "scenarios": len(outcomes),
        "healthy": len(healthy),
        "pathological": len(sick),
        "bad_labels": [o.name for o in outcomes if not o.check.ok and o.error is None],
        "errors": [f"{o.name}: {o.error}" for o in outcomes if o.error is not None],
        "false_alarm_scenarios": [o.name for o in valid if o.false_alarms],
        "detected": sum(o.detected for o in sick),
        "missed": [o.name for o in sick if not o.detected],
        "median_latency": statistics.median(latencies) if latencies else None,
        "max_latency": max(latencies) if latencies else None,
        "late": [o.name for o in sick if o.detected and o.latency is not None and o.latency > 10],
        "identical_to_unwatched": sum(o.identical is True for o in outcomes),
        "compared": sum(o.identical is not None for o in outcomes),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value[:4]) + (" ..." if len(value) > 4 else "") if value else "-"
    return str(value).replace("|", "/")


def markdown_table(outcomes: Sequence[Outcome]) -> str:
    """One row per scenario: label, label check, detected, kind, latency, false alarms."""
    lines = [
        "| framework | scenario | label | onset | label check (independent) | detected | first kind | latency | false alarms | also found | verdict |",
        "| --- | --- | --- | ---: | --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for o in outcomes:
        detected = "-" if o.healthy else ("yes" if o.detected else "**no**")
        lines.append(
            f"| {o.framework} | **{o.name}**: {_cell(o.about)} | {o.label} | {_cell(o.onset)} | "
            f"{'ok' if o.check.ok else '**FAILED**'}: {_cell(o.error or o.check.evidence)} | {detected} | "
            f"{_cell(o.first_kind)} | {_cell(o.latency)} | {_cell(o.false_alarms)} | "
            f"{_cell(o.other_kinds)} | {o.verdict} |"
        )
    return "\n".join(lines)


def markdown_summary(outcomes: Sequence[Outcome], framework: str) -> str:
    """A one-paragraph total for one framework."""
    s = summarise(outcomes)
    median = "-" if s["median_latency"] is None else f"{s['median_latency']:g}"
    parts = [
        f"**{framework}**: {s['scenarios']} scenarios ({s['healthy']} healthy, {s['pathological']} "
        f"pathological with a confirmed label",
        f"{len(s['bad_labels'])} whose label check failed: {_cell(s['bad_labels'])})" if s["bad_labels"] else ")",
        f"; pathologies detected {s['detected']}/{s['pathological']}",
        f" (missed: {_cell(s['missed'])})" if s["missed"] else "",
        f"; median latency {median} steps (max {_cell(s['max_latency'])}",
        f"; over 10: {_cell(s['late'])})" if s["late"] else ")",
        f"; scenarios with a false alarm: {len(s['false_alarm_scenarios'])}",
        f" ({_cell(s['false_alarm_scenarios'])})" if s["false_alarm_scenarios"] else "",
        f"; observed runs bit-for-bit equal to unwatched: {s['identical_to_unwatched']}/{s['compared']}",
        f"; scenarios that raised: {_cell(s['errors'])}." if s["errors"] else ".",
    ]
    return "".join(parts)


__all__ = ["LabelCheck", "Outcome", "failed", "markdown_summary", "markdown_table", "score", "summarise"]
