"""A :class:`~gradwatch.Report` as JUnit XML, the format every CI system reads.

One ``<testcase>`` per finding kind (the built-in kinds, plus any plugin kind the run produced):
it fails when the run has a finding of that kind at or above ``fail_on``, and its failure text
lists every such finding with its steps, layers and message, and what to do. So a CI page shows
``gradwatch.exploding`` failed, not only "the gradient check failed".

>>> from gradwatch import Monitor
>>> from gradwatch.testing import nan_at
>>> monitor = Monitor(policy="observe")
>>> for stats in nan_at(step=5, steps=10):
...     _ = monitor.observe(stats)
>>> xml = to_junit(monitor.report(), name="demo")
>>> '<testcase classname="gradwatch.demo" name="nonfinite"' in xml, 'failures="1"' in xml
(True, True)
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from gradwatch.advice import advice_for
from gradwatch.findings import FINDING_KINDS, Finding, severity_rank
from gradwatch.report.base import check_fail_on

if TYPE_CHECKING:
    from gradwatch.report.base import Report


_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: object) -> str:
    """Text that XML 1.0 can hold: control characters (legal in layer names, not in XML) become '?'."""
    return _XML_ILLEGAL.sub("?", str(text))


def kind_fails(report: Report, kind: str, fail_on: str) -> bool:
    """True when ``report`` has a finding of ``kind`` at or above ``fail_on`` (never for "never")."""
    if check_fail_on(fail_on) == "never":
        return False
    return kind in report.kinds(fail_on)


def _finding_line(f: Finding) -> str:
    span = f"step {f.step}" if f.count <= 1 else f"steps {f.step}-{f.last_step} (x{f.count})"
    layers = f" in {', '.join(f.layers)}" if f.layers else ""
    return f"[{f.severity}] {span}{layers}: {f.message}"


def to_junit(report: Report, *, name: str = "gradwatch", fail_on: str = "warning", time: float = 0.0) -> str:
    """Render a report as JUnit XML.

    Args:
        report: The report.
        name: What was checked (the ``gradwatch check`` target, a test id); it names the test
            suite and, with dots for other punctuation, the test cases' ``classname``. Defaults to
            ``"gradwatch"``.
        fail_on: Lowest severity that fails a test case; ``"never"`` reports without failing.
            Defaults to ``"warning"``.
        time: Seconds the check took, for the suite's ``time``. Defaults to 0.0.

    Returns:
        The XML document as a string (UTF-8 declared).

    Raises:
        ValueError: for an unknown ``fail_on``.
    """
    check_fail_on(fail_on)
    kinds = list(FINDING_KINDS) + sorted(set(report.kinds("info")) - set(FINDING_KINDS))
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "check"
    classname = "gradwatch" if slug == "gradwatch" else f"gradwatch.{slug}"
    failures = [kind for kind in kinds if kind_fails(report, kind, fail_on)]

    suites = ET.Element("testsuites", name="gradwatch", tests=str(len(kinds)), failures=str(len(failures)),
                        errors="0", skipped="0", time=f"{time:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=_clean(f"gradwatch {name}"), tests=str(len(kinds)),
                          failures=str(len(failures)), errors="0", skipped="0", time=f"{time:.3f}")
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("healthy", str(report.healthy).lower()),
        ("framework", report.framework),
        ("policy", report.policy),
        ("steps_measured", str(report.steps_measured)),
        ("skipped_steps", str(report.skipped_steps)),
        ("fail_on", fail_on),
    ):
        ET.SubElement(props, "property", name=f"gradwatch.{key}", value=_clean(value))

    for kind in kinds:
        case = ET.SubElement(suite, "testcase", classname=_clean(classname), name=_clean(kind), time="0")
        of_kind = [f for f in report.findings if f.kind == kind]
        counts = report.finding_counts.get(kind, {})
        if kind in failures:
            worst = max((f for f in of_kind), key=lambda f: severity_rank(f.severity), default=None)
            severity = worst.severity if worst else max((s for s, n in counts.items() if n), key=severity_rank)
            first = worst.message if worst else f"{kind} findings at severity {severity}"
            steps = sum(counts.values())
            body = [f"{kind}: {steps} measured step(s) with findings ({_counts_text(counts)})."]
            body += [_finding_line(f) for f in of_kind]
            body += ["", f"What to do: {advice_for(kind)}"]
            failure = ET.SubElement(case, "failure", message=_clean(first), type=_clean(severity))
            failure.text = _clean("\n".join(body))
        elif of_kind:
            out = ET.SubElement(case, "system-out")
            out.text = _clean("\n".join(
                [f"{kind}: findings below fail_on={fail_on} ({_counts_text(counts)})."]
                + [_finding_line(f) for f in of_kind]
            ))
    out = ET.SubElement(suite, "system-out")
    out.text = _clean(report.summary())
    ET.indent(suites, space="  ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{sev}: {n}" for sev, n in sorted(counts.items(), key=lambda kv: severity_rank(kv[0])) if n) or "none"
