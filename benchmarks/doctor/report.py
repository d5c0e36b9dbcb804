"""Markdown for the doctor benchmark, and the ``## Doctor`` section of ``docs/benchmarks.md``.

Only that section of the page is written: everything before its heading and from the next
``## `` heading on is kept as it is.
"""

from __future__ import annotations

import math
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.doctor.evaluate import TARGET_SHARE

HEADING = "## Doctor"

AUTOTRAINER = (
    "**Published comparison: AUTOTRAINER** (Zhang, Zhai, Ma, Shen, \"AUTOTRAINER: An Automatic DNN "
    "Training Problem Detection and Repair System\", ICSE 2021). The authors report, on 495 training "
    "scripts (Keras models on six datasets, from MNIST and CIFAR-10 to sklearn's Circle and Blob), "
    "262 buggy models detected with 316 training problems and **255 repaired: 97.33 %**, an average "
    "accuracy improvement of 47.08 %, and **1.19 times the training time on average** for buggy "
    "trainings, over 99 % of it spent retraining. Source: the paper's artifact README "
    "(github.com/shiningrain/AUTOTRAINER, sections *Effectiveness* and *Efficiency*), which restates "
    "the paper's numbers. Not the same benchmark: AUTOTRAINER counts a model repaired when a retrained "
    "candidate no longer shows the problem and its accuracy improves, and retrains whole models per "
    "candidate; here a case counts only when the top-ranked repair's full run is healthy *and* reaches "
    f"{TARGET_SHARE:.0%} of a known-good configuration's accuracy, and the doctor must take no longer "
    "than one full training run of the baseline."
)


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


MODES = (("", "strict budget (one measured full run)"), ("estimate_", "budget estimated by the doctor (`full_steps`)"))


def why(row: dict[str, Any], mode: str = "") -> str:
    """Why a case failed under a budget mode, in a few words."""
    if "error" in row:
        return f"error: {row['error']}"
    if row["pathology"] == "healthy":
        return f"false alarm: {', '.join(row['causes']) or ', '.join(row['symptoms'])}"
    if row.get(f"{mode}repair") is None:
        if row.get("nothing_to_repair"):
            return "no repair: nothing to repair seen in the baseline trial"
        notes = [t["note"] for t in row.get(f"{mode}trials", []) if t["note"].startswith("time budget")]
        return "no repair: " + ("the time budget ran out before a trial" if notes else "none beat the baseline")
    parts = []
    if not row.get(f"{mode}repaired_healthy"):
        parts.append(f"repaired run unhealthy ({', '.join(row.get(f'{mode}repaired_findings', [])) or 'non-finite loss'})")
    if row.get(f"{mode}repaired_accuracy", 0.0) < TARGET_SHARE * row["good_accuracy"]:
        parts.append(f"accuracy {row.get(f'{mode}repaired_accuracy', 0.0):.3f} < {TARGET_SHARE:.0%} of {row['good_accuracy']:.3f}")
    return "; ".join(parts)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """One paragraph per framework, split and budget mode."""
    lines = []
    for framework in sorted({r["framework"] for r in rows}):
        for split in ("tune", "report"):
            part = [r for r in rows if r["framework"] == framework and r["split"] == split]
            if not part:
                continue
            sick = [r for r in part if r["pathology"] != "healthy"]
            confirmed = [r for r in sick if r.get("confirmed")]
            controls = [r for r in part if r["pathology"] == "healthy"]
            steps = [r["steady_step_ms"] for r in part if "steady_step_ms" in r]
            lines.append(f"**{framework}, {split} split**: {len(sick)} pathological cases ({len(confirmed)} with the "
                         f"pathology confirmed), {len(controls)} healthy controls"
                         + (f"; a full run's step took {statistics.median(steps):.2f} ms (median)." if steps else "."))
            for mode, label in MODES:
                won = [r for r in confirmed if r.get(f"{mode}success")]
                quiet = [r for r in controls if r.get(f"{mode}success")]
                ratios = [r[f"{mode}time_ratio"] for r in part if f"{mode}time_ratio" in r]
                in_time = [r for r in part if r.get(f"{mode}time_ok")]
                rate = f"{len(won)}/{len(confirmed)} ({len(won) / len(confirmed):.0%})" if confirmed else "0/0"
                lines.append(
                    f"- {label}: the top-ranked repair made the run healthy and reached {TARGET_SHARE:.0%} of the known-good "
                    f"accuracy in **{rate}** of the confirmed cases; nothing to repair in {len(quiet)}/{len(controls)} "
                    f"controls; doctor time within one full baseline run in {len(in_time)}/{len(part)} cases"
                    + (f" (doctor / full run: median x{statistics.median(ratios):.2f}, max x{max(ratios):.2f})" if ratios else "")
                    + ".")
            lines.append("")
    return lines


def _healthy(row: dict[str, Any], mode: str) -> str:
    return "-" if row.get(f"{mode}repair") is None else ("yes" if row.get(f"{mode}repaired_healthy") else "no")


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| case | split | baseline acc | known-good acc | causes | repair (strict) | acc | healthy | doctor s | "
           "repair (estimate) | acc | doctor s | full run s | verdict (strict; estimate) |",
           "| --- | --- | ---: | ---: | --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['id']} | {r['split']} |" + " - |" * 11 + f" error: {r['error'][:80]} |")
            continue
        verdicts = []
        for mode, _ in MODES:
            if r["pathology"] == "healthy":
                verdict = "ok (nothing to repair)" if r.get(f"{mode}success") else f"**{why(r, mode)}**"
            elif not r.get("confirmed"):
                verdict = "not confirmed" + ("" if r.get(f"{mode}success") else f" ({why(r, mode)})")
            else:
                verdict = "ok" if r.get(f"{mode}success") else f"**{why(r, mode)}**"
            if not r.get(f"{mode}time_ok"):
                verdict += f", **over time x{r[f'{mode}time_ratio']:.2f}**"
            verdicts.append(verdict)
        causes = ", ".join(r.get("causes", [])) or "-"

        out.append(
            f"| {r['id']} | {r['split']} | {_f(r['baseline_accuracy'])} | {_f(r['good_accuracy'])} | {causes} | "
            f"{r.get('repair') or '-'} | {_f(r.get('repaired_accuracy'))} | {_healthy(r, '')} | {_f(r.get('doctor_seconds'), '.1f')} | "
            f"{r.get('estimate_repair') or '-'} | {_f(r.get('estimate_repaired_accuracy'))} | "
            f"{_f(r.get('estimate_doctor_seconds'), '.1f')} | {_f(r.get('baseline_seconds'), '.1f')} | {'; '.join(verdicts)} |"
        )
    return out


def failures(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for mode, label in MODES:
        failed = [r for r in rows if not r.get(f"{mode}success") or not r.get(f"{mode}time_ok")]
        out.append(f"With the {label}: " + ("no failure." if not failed else f"{len(failed)} case(s)."))
        out.append("")
        for r in failed:
            reasons = []
            if not r.get(f"{mode}success"):
                reasons.append(why(r, mode))
            if not r.get(f"{mode}time_ok") and f"{mode}time_ratio" in r:
                reasons.append(f"doctor took x{r[f'{mode}time_ratio']:.2f} of the full run")
            note = "" if r.get("confirmed", True) or r["pathology"] == "healthy" else " (pathology not confirmed: not counted)"
            out.append(f"- `{r['id']}` ({r['split']}){note}: {'; '.join(reasons)}")
        out.append("")
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    return "\n".join([*summary(rows), "", *table(rows), "", "Failures:", "", *failures(rows)])


def section(rows: list[dict[str, Any]], machine: str, note: str = "") -> str:
    """The whole ``## Doctor`` section (``note``: markdown placed after the summary)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        HEADING,
        "",
        "`python -m benchmarks.doctor` (see `benchmarks/doctor/README.md`): pathological training setups on "
        "scikit-learn's offline datasets, in PyTorch and Keras. For every case the baseline is trained for a full run "
        "(its time is the doctor's budget), a known-good configuration of the same architecture likewise (ReLU, He "
        "init, zero biases, Adam 1e-3; orthogonal recurrent matrices), the doctor runs with 60-step trials twice, "
        "with a strict budget (`budget_s` = the baseline's measured full-run seconds) and with its own estimate "
        "(`full_steps` = the full run's steps, timed at its watched baseline trial's pace, as `gradwatch doctor "
        "--full-steps` does), and the top-ranked repair is applied to a fresh copy and trained for the same full "
        f"run, watched. A case succeeds when that run is healthy and reaches {TARGET_SHARE:.0%} of the "
        "known-good accuracy. The doctor's rules were tuned on the *tune* split (digits, moons, digits-seq) and the "
        "*report* split (wine, circles, classification, breast_cancer, classification-seq) was run once they were "
        "fixed; the targets are judged on the report split.",
        "",
        f"Last run: {when}.",
        "",
        *summary(rows),
        *([note.strip(), ""] if note.strip() else []),
        AUTOTRAINER,
        "",
        "### Machine",
        "",
        machine,
        "",
        "### Cases",
        "",
        *table(rows),
        "",
        "### Failures",
        "",
        *failures(rows),
        "",
    ])


def write_docs_section(page: Path, rows: list[dict[str, Any]], note: str = "") -> None:
    """Write (or replace) the ``## Doctor`` section of ``page``, leaving the rest as it is."""
    from benchmarks.docs_page import machine

    text = page.read_text() if page.exists() else "# Benchmarks\n"
    new = section(rows, machine(), note)
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == HEADING), None)
    if start is None:
        page.write_text(text.rstrip("\n") + "\n\n" + new)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    page.write_text("".join(lines[:start]) + new + ("\n" + "".join(lines[end:]) if end < len(lines) else ""))
