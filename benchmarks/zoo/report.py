"""The zoo's markdown report: the totals, then every failure and every dropped run, listed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .evaluate import TRAINING_ACTIONS, ZooOutcome


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _cell(text: Any, limit: int = 220) -> str:
    s = str(text).replace("|", "/").replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _detection_rows(table: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| | runs | detected | rate | median latency | p90 latency | max | other kind only | + nonfinite (of non-finite unwatched) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, d in table.items():
        rows.append(f"| {name} | {d['runs']} | {d['detected']} | {_pct(d['rate'])} | {_num(d['median_latency'])} | "
                    f"{_num(d['p90_latency'])} | {_num(d['max_latency'])} | {d['found_other_kind_only']} | "
                    f"{d['nonfinite_also']} ({d['probe_nonfinite']}) |")
    return rows


def summary_markdown(s: dict[str, Any], title: str = "", level: int = 2) -> str:
    """The totals as markdown (``level``: the heading level of the title; sections one below)."""
    fa, det, res, auto = s["false_alarms"], s["detection"], s["rescue"], s["auto_on_healthy"]
    obs = s["observe_identical"]
    lines = [f"{'#' * level} {title or 'Zoo'}: {s['framework']}", ""]
    lines.append(
        f"{s['seeds']} seeds: **{s['healthy']} healthy** and **{s['pathological']} pathological** runs kept, "
        f"{s['dropped']} dropped (label not confirmed: {_cell(s['dropped_by'] or '-')}), {s['errors']} errors."
        + (f" Wall time {s['seconds']:.0f} s ({s['seconds_per_seed']:.2f} s per seed, summed over workers)."
           if s.get("seconds") else ""))
    lines += ["", "| measure | result |", "| --- | --- |",
              f"| healthy runs with a false alarm | {fa['runs']} / {s['healthy']} = {_pct(fa['rate'])} "
              f"(95 % upper bound {_pct(fa['upper95'])}) |",
              f"| false alarms by kind (runs) | {_cell(fa['by_kind'] or '-')} |",
              f"| pathological runs with an alarm before the onset | {s['pre_onset_alarms']['runs']} "
              f"{_cell(s['pre_onset_alarms']['by_kind'] or '')} |",
              f"| pathologies detected (expected kind, warning/error, at or after the onset) | "
              f"{det['all']['detected']} / {det['all']['runs']} = {_pct(det['all']['rate'])}, median latency "
              f"{_num(det['all']['median_latency'])}, p90 {_num(det['all']['p90_latency'])} |",
              f"| diverging runs rescued by `auto` | {res['rescued']} / {res['runs']} = {_pct(res['rate'])} |",
              f"| diverging runs that survived unwatched, made to fail by `auto` | {res['harmed_by_auto']} / "
              f"{res['survived_unwatched']} |",
              f"| broken from the start but not diverging (loss falls unwatched; not in the rescue rate): "
              f"meet the rescue criterion under `auto` | {res.get('broken_meets_criterion_under_auto', 0)} / "
              f"{res.get('broken_not_diverging', 0)} |",
              f"| healthy runs changed by `auto` (training action or parameters not bit-equal) | {auto['changed']} / "
              f"{auto['runs']} = {_pct(auto['share'])}; runs with each action: {_cell(auto['runs_with_action'] or '-')} |",
              f"| healthy `auto` runs not bit-equal without any training action | {auto['not_identical_without_action']} |",
              f"| `observe` runs bit-for-bit equal to unwatched | {obs['equal']} / {obs['compared']} |"]
    lines += ["", "### Detection per expected kind", "", *_detection_rows(det["by_kind"]),
              "", "### Detection per pathology", "", *_detection_rows(det["by_pathology"])]
    if res["by_pathology"]:
        lines += ["", "### Rescue per pathology (runs the unwatched run does not survive)", "",
                  "| pathology | runs | rescued |", "| --- | ---: | ---: |"]
        lines += [f"| {p} | {d['runs']} | {d['rescued']} |" for p, d in res["by_pathology"].items()]
    if s.get("missed_as"):
        lines += ["", "### Misses grouped (what was found instead, first warning/error after the onset)", "",
                  "| pathology | found instead (runs) |", "| --- | --- |"]
        lines += [f"| {p} | {_cell(d)} |" for p, d in s["missed_as"].items()]
    if s.get("failed_rescue_actions"):
        lines += ["", "### Failed rescues grouped (the training actions auto took)", "",
                  "| pathology | actions (runs) |", "| --- | --- |"]
        lines += [f"| {p} | {_cell(d)} |" for p, d in s["failed_rescue_actions"].items()]
    if fa["by_tag"] or fa["by_family"]:
        lines += ["", "### False alarms grouped (which rule fails on which kind of run)", "",
                  "| kind: context at the alarm's step | alarms |", "| --- | ---: |"]
        lines += [f"| {k} | {n} |" for k, n in fa["by_tag"].items()]
        lines += ["", "| kind: family | runs |", "| --- | ---: |"]
        lines += [f"| {k} | {n} |" for k, n in fa["by_family"].items()]
    sub = "#" * (level + 1) + " "
    return "\n".join(sub + line[4:] if i and line.startswith("### ") else line for i, line in enumerate(lines))


def failures_markdown(outcomes: Sequence[ZooOutcome]) -> str:
    """Every failure, one row each: false alarms, misses, failed rescues, harm, changes, errors, drops."""
    kept = [o for o in outcomes if o.kept]
    sections: list[tuple[str, list[str], list[list[Any]]]] = []
    rows = [[o.seed, o.line, f"{f['kind']}@{f['step']} {f['severity']}", f["message"],
             ", ".join(f["context"]["tags"]) or "-", f["context"]["note"]]
            for o in kept for f in o.false_alarms if o.healthy]
    sections.append(("False alarms on healthy runs", ["seed", "spec", "finding", "message", "context", "unwatched run there"], rows))
    rows = [[o.seed, o.line, f"{f['kind']}@{f['step']} {f['severity']}", f["message"], f["context"]["note"]]
            for o in kept for f in o.false_alarms if not o.healthy]
    sections.append(("Alarms before the onset (pathological runs)", ["seed", "spec", "finding", "message", "unwatched run there"], rows))
    rows = [[o.seed, o.line, o.label, o.first_kind or "nothing", ", ".join(o.other_kinds) or "-", o.info and ", ".join(o.info[:4]) or "-", o.check]
            for o in kept if not o.healthy and not o.detected]
    sections.append(("Missed", ["seed", "spec", "expected", "first finding after the onset", "other kinds", "info", "label check"], rows))
    rows = [[o.seed, o.line, o.latency, o.check] for o in kept if o.detected and o.latency is not None and o.latency > 10]
    sections.append(("Detected late (more than 10 steps after the onset)", ["seed", "spec", "latency", "label check"], rows))
    rows = [[o.seed, o.line, _numbers(o.unwatched), o.rescue_note, _actions(o), ", ".join(o.auto.get("kinds", [])) or "-"]
            for o in kept if o.needs_rescue and not o.rescued]
    sections.append(("Failed rescues", ["seed", "spec", "unwatched", "auto", "actions (first)", "auto's findings"], rows))
    rows = [[o.seed, o.line, _numbers(o.unwatched), o.rescue_note, _actions(o)]
            for o in kept if o.needs_rescue is False and o.rescued is False
            and o.rescue_note_unwatched.startswith("ok")]
    sections.append(("Diverging runs that survived unwatched but not under auto", ["seed", "spec", "unwatched", "auto", "actions"], rows))
    rows = [[o.seed, o.line, _actions(o), "yes" if o.auto.get("identical") else "no", _numbers(o.unwatched), _numbers(o.auto)]
            for o in kept if o.healthy and o.changed]
    sections.append(("Healthy runs changed by auto", ["seed", "spec", "actions (first)", "bit-equal", "unwatched", "auto"], rows))
    rows = [[o.seed, o.line, "observe" if o.observe_identical is False else "auto (no training action)"]
            for o in kept if o.observe_identical is False
            or (o.healthy and o.auto.get("identical") is False and not any(o.auto["actions"].get(k, 0) for k in TRAINING_ACTIONS))]
    sections.append(("Bit-for-bit failures (a run that must not change training did)", ["seed", "spec", "run"], rows))
    rows = [[o.seed, o.line, " / ".join(o.auto.get("warnings", []))] for o in kept if o.auto.get("warnings")]
    sections.append(("gradwatch warnings under auto", ["seed", "spec", "warnings"], rows))
    rows = [[o.seed, o.line, o.reason] for o in outcomes if o.status == "error"]
    sections.append(("Errors", ["seed", "spec", "error"], rows))
    rows = [[o.seed, o.line, o.reason] for o in outcomes if o.status == "dropped"]
    sections.append(("Dropped (label not confirmed by the unwatched run)", ["seed", "spec", "why"], rows))
    out: list[str] = []
    for title, header, body in sections:
        out += ["", f"### {title} ({len(body)})", ""]
        if not body:
            out.append("None.")
            continue
        out += ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return "\n".join(out)


def _numbers(d: dict[str, Any]) -> str:
    if not d:
        return "-"
    acc = d.get("test_accuracy")
    text = f"train loss {d['train_loss_before']:.3g} -> {d['train_loss_after']:.3g}"
    if acc is not None and acc == acc:
        text += f", test acc {acc:.3f}"
    else:
        text += f", test loss {d['test_loss']:.3g}"
    return text


def _actions(o: ZooOutcome) -> str:
    counts = o.auto.get("actions") or {}
    if not counts:
        return "none"
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) + "; first: " + ", ".join(o.auto.get("first_actions", [])[:3])


__all__ = ["failures_markdown", "summary_markdown"]
