"""One case of the doctor benchmark, end to end.

1. **Baseline**: the pathological setup trained for a full run, unwatched: its time is the budget
   the doctor must stay within, its accuracy shows the pathology.
2. **Known-good**: the same architecture in its known-good configuration, a full run: the
   accuracy to reach 90 % of.
3. **Doctor**, twice: with ``budget_s`` set to the baseline full run's measured seconds (the strict
   budget: it starts no trial that would end past it), and with ``full_steps`` set to the full
   run's steps (the doctor's own estimate of a full run, at its watched baseline trial's pace, as
   ``gradwatch doctor --full-steps`` does). Each is timed from the factory call to the ranked result.
4. **Repaired**: the top-ranked repair applied to a fresh copy (the adapter's ``build``), trained
   for the same full run, watched under ``policy="observe"``: healthy (no finding at ``warning``,
   a finite loss) and its test accuracy.

A case **succeeds** when the doctor recommends a repair, the repaired full run is healthy, and its
accuracy is at least 90 % of the known-good one. The **pathology is confirmed** when the
baseline full run is unhealthy or its accuracy is below 90 % of the known-good one; a case whose
pathology is not confirmed is reported and left out of the success rate. A healthy control
succeeds when the doctor finds nothing to repair.
"""

from __future__ import annotations

import math
import time
import traceback
from typing import Any

from benchmarks.doctor.cases import Case, known_good
from benchmarks.doctor.data import load

TARGET_SHARE = 0.9
TRIAL_STEPS = 60


def _side(framework: str) -> Any:
    if framework == "torch":
        from benchmarks.doctor import torch_side

        return torch_side
    from benchmarks.doctor import keras_side

    return keras_side


def _full(side: Any, framework: str, model: Any, optimizer: Any, data: Any, case: Case, *, clip: float | None = None,
          watch: bool = False) -> dict[str, Any]:
    if framework == "torch":
        return side.train(model, optimizer, data, epochs=case.epochs, batch_size=case.batch_size, clip=clip, watch=watch)
    return side.train(model, data, epochs=case.epochs, batch_size=case.batch_size, watch=watch)


def _healthy(run: dict[str, Any]) -> bool:
    report = run.get("report")
    return report is not None and not report.fails("warning") and math.isfinite(run["loss"])


def run_case(case: Case, *, steps: int = TRIAL_STEPS) -> dict[str, Any]:
    """Run one case; returns a JSON-friendly row."""
    from gradwatch.check import as_spec
    from gradwatch.doctor import run_doctor
    from gradwatch.doctor.run import adapter_for

    side = _side(case.framework)
    data = load(case.dataset)
    row: dict[str, Any] = {"id": case.id, "framework": case.framework, "pathology": case.pathology,
                           "dataset": case.dataset, "split": case.split, "description": case.description,
                           "epochs": case.epochs, "batch_size": case.batch_size}
    try:
        full_steps = case.epochs * side.steps_per_epoch(data, case.batch_size)
        row["full_steps"] = full_steps

        def setup() -> Any:
            return side.factory(case.setup, data, case.batch_size)

        if case.framework == "torch":
            model, optimizer = side.build(case.setup, data)
            good_model, good_opt = side.build(known_good(case.setup), data)
        else:
            model, optimizer = side.build(case.setup, data), None
            good_model, good_opt = side.build(known_good(case.setup), data), None
        baseline = _full(side, case.framework, model, optimizer, data, case)
        good_setup = known_good(case.setup)
        good = _full(side, case.framework, good_model, good_opt, data, case, clip=good_setup.clip or None)
        row.update(baseline_seconds=baseline["seconds"], baseline_accuracy=baseline["accuracy"],
                   good_accuracy=good["accuracy"])
        repaired_runs: dict[str, dict[str, Any]] = {}

        def repaired(candidate: Any) -> dict[str, Any]:
            """The full run of a repair, watched (trained once per repair, shared by both modes)."""
            if candidate.name not in repaired_runs:
                adapter = adapter_for(as_spec(setup()), seed=0, device=None, steps=steps, origin=case.id)
                adapter.describe()
                if case.framework == "torch":
                    rep_model, rep_opt, clip = adapter.build(candidate)  # type: ignore[attr-defined]
                    run = _full(side, case.framework, rep_model, rep_opt, data, case, clip=clip, watch=True)
                else:
                    run = _full(side, case.framework, adapter.build(candidate), None, data, case, watch=True)  # type: ignore[attr-defined]
                repaired_runs[candidate.name] = run
            return repaired_runs[candidate.name]

        for mode, budget in (("", {"budget_s": baseline["seconds"]}), ("estimate_", {"full_steps": full_steps})):
            start = time.perf_counter()
            result = run_doctor(setup, steps=steps, seed=0, name=case.id, **budget)
            seconds = time.perf_counter() - start
            best = result.best
            row[f"{mode}doctor_seconds"] = seconds
            row[f"{mode}time_ratio"] = seconds / baseline["seconds"]
            row[f"{mode}repair"] = best.name if best is not None else None
            row[f"{mode}trials"] = [{"name": t.name, "tier": t.tier, "loss": t.final_loss if math.isfinite(t.final_loss) else None,
                                     "seconds": round(t.seconds, 2), "note": t.stopped or t.error or t.not_tried}
                                    for t in result.trials]
            if not mode:
                row["symptoms"] = list(result.symptoms)
                row["causes"] = [c.kind for c in result.causes]
                row["nothing_to_repair"] = result.nothing_to_repair
                row["baseline_findings"] = result.baseline.finding_kinds
            if best is not None and best.candidate is not None:
                run = repaired(best.candidate)
                row.update({f"{mode}repaired_accuracy": run["accuracy"], f"{mode}repaired_healthy": _healthy(run),
                            f"{mode}repaired_findings": run["report"].kinds("warning") if run["report"] is not None else []})
        # The baseline's health, from a watched full run of its own (observe changes nothing), when its
        # accuracy alone does not confirm the pathology (a healthy control is always watched).
        if case.healthy_control or baseline["accuracy"] >= TARGET_SHARE * good["accuracy"]:
            if case.framework == "torch":
                model, optimizer = side.build(case.setup, data)
            else:
                model, optimizer = side.build(case.setup, data), None
            watched = _full(side, case.framework, model, optimizer, data, case, watch=True)
            row["baseline_healthy"] = _healthy(watched)
            row["baseline_full_findings"] = watched["report"].kinds("warning") if watched["report"] is not None else []
        else:
            row["baseline_healthy"] = None  # not run: the accuracy confirms the pathology
        row["steady_step_ms"] = 1e3 * baseline["seconds"] / full_steps
        row.update(score(row, case))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()[-2000:]
        row.update(confirmed=False, success=False, time_ok=False, estimate_success=False, estimate_time_ok=False)
    return row


def score(row: dict[str, Any], case: Case) -> dict[str, Any]:
    """Confirmed, success and time verdicts of a finished row, for both budgets (``estimate_``: the
    doctor's own estimate of a full run from ``full_steps``)."""
    good = row["good_accuracy"]
    out: dict[str, Any] = {}
    if case.healthy_control:
        out["confirmed"] = True
    else:
        out["confirmed"] = row["baseline_accuracy"] < TARGET_SHARE * good or row["baseline_healthy"] is False
    for mode in ("", "estimate_"):
        out[f"{mode}time_ok"] = row[f"{mode}doctor_seconds"] <= row["baseline_seconds"]
        if case.healthy_control:
            out[f"{mode}success"] = row[f"{mode}repair"] is None and bool(row["nothing_to_repair"])
        else:
            out[f"{mode}success"] = (row.get(f"{mode}repair") is not None and bool(row.get(f"{mode}repaired_healthy"))
                                     and row.get(f"{mode}repaired_accuracy", 0.0) >= TARGET_SHARE * good)
    return out
