"""The doctor's result: causes, ranked trials, the best repair, as text, JSON and HTML.

>>> from gradwatch.doctor.model import ModelDescription
>>> from gradwatch.doctor.trials import TrialResult
>>> baseline = TrialResult("baseline", None, steps=10, losses=[1.0] * 10)
>>> result = DoctorResult("demo", "torch", ModelDescription("torch", "Net", [], "SGD"), (), [], [baseline], 10)
>>> result.nothing_to_repair, result.best is None
(True, True)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from gradwatch.doctor.causes import Cause, loss_drop
from gradwatch.doctor.model import ModelDescription
from gradwatch.doctor.trials import TrialResult
from gradwatch.findings import severity_rank
from gradwatch.jsonvalues import to_json
from gradwatch.report.base import check_fail_on

__all__ = ["SCHEMA_VERSION", "DoctorResult"]

SCHEMA_VERSION = 1
SNIPPET_LINES = 15
"""Lines of the change the text summary shows (the JSON and HTML have all of it)."""


def _num(value: float, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


@dataclass(eq=False)
class DoctorResult:
    """What the doctor found and what worked.

    Attributes:
        name: What was diagnosed (the target, or "the factory").
        framework: ``"torch"`` or ``"keras/<backend>"``.
        description: The model as the doctor saw it.
        symptoms: The baseline's symptoms (finding kinds, ``stalled``, ``diverged``).
        causes: The causes found.
        trials: Every trial, ranked best first, the baseline among them; trials not run last.
        steps: Steps of each trial.
        seed: The seed of every trial.
        budget_s: The time budget, if there was one.
        seconds: Wall time of the whole doctor run.
    """

    name: str
    framework: str
    description: ModelDescription
    symptoms: tuple[str, ...]
    causes: list[Cause]
    trials: list[TrialResult]
    steps: int
    seed: int | None = 0
    budget_s: float | None = None
    seconds: float = 0.0

    @property
    def baseline(self) -> TrialResult:
        return next(t for t in self.trials if t.is_baseline)

    @property
    def nothing_to_repair(self) -> bool:
        """No cause was found: no trial was run."""
        return not self.causes

    @property
    def best(self) -> TrialResult | None:
        """The top-ranked trial when it is a repair (ranked above the baseline), else None."""
        top = self.trials[0] if self.trials else None
        return top if top is not None and not top.is_baseline and top.tier <= 1 else None

    @property
    def repaired_model(self) -> Any:
        """The best repair's trained model object, or None."""
        best = self.best
        return best.model if best is not None else None

    def fails(self, fail_on: str = "warning") -> bool:
        """True when the baseline has findings, or the doctor causes, at or above ``fail_on``
        (what ``gradwatch doctor`` exits 1 on).

        Raises:
            ValueError: for a value that is not a severity or ``"never"``.
        """
        if check_fail_on(fail_on) == "never":
            return False
        report = self.baseline.report
        if report is not None and report.fails(fail_on):
            return True
        return any(severity_rank(c.severity) >= severity_rank(fail_on) for c in self.causes)

    # -- text ------------------------------------------------------------------------------------

    def baseline_line(self) -> str:
        """One line on the baseline run: verdict, loss, setup, findings."""
        base = self.baseline
        kinds = base.finding_kinds
        verdict = "HEALTHY" if not kinds and "diverged" not in self.symptoms else "UNHEALTHY"
        losses = [v for v in base.losses]
        span = f"loss {_num(losses[0])} -> {_num(losses[-1])} over {len(losses)} steps" if losses else "no steps"
        model = self.description
        lr = f" lr={model.lr:.3g}" if math.isfinite(model.lr) else ""
        findings = f"; findings: {', '.join(kinds)}" if kinds else ""
        return f"Baseline: {verdict} ({span}; {self.framework}, {model.model_type}, {model.optimizer}{lr}{findings})"

    def table(self) -> str:
        """The ranked trials as a fixed-width table."""
        base = self.baseline
        width = max([len("repair")] + [len(t.name) for t in self.trials])
        width = min(width, 44)
        header = f"{'rank':>4}  {'repair':<{width}}  {'loss reached':>12}  {'vs baseline':>11}  {'healthy':>7}  {'steps':>5}  {'seconds':>7}  note"
        rows = [header, "-" * len(header)]
        for i, trial in enumerate(self.trials, start=1):
            name = trial.name if len(trial.name) <= width else trial.name[: width - 1] + "…"
            if trial.not_tried:
                rows.append(f"{'-':>4}  {name:<{width}}  {'':>12}  {'':>11}  {'':>7}  {'':>5}  {'':>7}  not tried: {trial.not_tried}")
                continue
            loss = trial.final_loss
            versus = "-"
            if not trial.is_baseline and math.isfinite(loss) and math.isfinite(base.final_loss) and base.final_loss > 0:
                versus = f"{(loss - base.final_loss) / base.final_loss:+.0%}"
            note = trial.error or trial.stopped or (", ".join(trial.finding_kinds) if trial.finding_kinds else "")
            rows.append(
                f"{i:>4}  {name:<{width}}  {_num(loss):>12}  {versus:>11}  {('yes' if trial.healthy else 'no'):>7}  "
                f"{len(trial.losses):>5}  {trial.seconds:>7.2f}  {note}"
            )
        return "\n".join(rows)

    def summary(self) -> str:
        """The text report: baseline, causes, ranked trials, the recommended change."""
        lines = [f"gradwatch doctor: {self.name}", self.baseline_line()]
        if self.symptoms:
            lines.append(f"Symptoms: {', '.join(self.symptoms)}")
        if self.nothing_to_repair:
            if self.symptoms:
                lines.append("No cause the doctor knows explains these symptoms; no repair was tried. "
                             "See the findings' messages for what to look at.")
            else:
                drop = loss_drop(self.baseline.losses)
                fell = f" (the loss fell {drop:.0%})" if math.isfinite(drop) else ""
                lines.append(f"Nothing to repair: no finding at warning or above and no cause{fell}; no trial was run "
                             f"({self.seconds:.1f} s).")
            return "\n".join(lines)
        lines += ["", "Causes:"]
        lines += [f"  {i}. {cause.kind}" + (f" [{', '.join(cause.layers[:6])}{', ...' if len(cause.layers) > 6 else ''}]" if cause.layers else "")
                  + f": {cause.message}" for i, cause in enumerate(self.causes, start=1)]
        tried = sum(1 for t in self.trials if not t.is_baseline and not t.not_tried)
        budget = f", budget {self.budget_s:.1f} s" if self.budget_s is not None else ""
        lines += ["", f"Trials: {self.steps} steps each, the same batches and seed; {tried} repair(s) tried in "
                      f"{self.seconds:.1f} s{budget}.", self.table(), ""]
        best = self.best
        if best is None:
            lines.append("No repair did better than the baseline in its trial.")
        else:
            assert best.candidate is not None
            health = "healthy" if best.healthy else f"still with {', '.join(best.finding_kinds)}"
            lines.append(f"Recommended: {best.name} ({best.candidate.describe()}): loss {_num(best.final_loss)} "
                         f"against the baseline's {_num(self.baseline.final_loss)}, {health}.")
            if best.snippet:
                snippet = best.snippet.splitlines()
                if len(snippet) > SNIPPET_LINES:
                    snippet = snippet[:SNIPPET_LINES] + [f"  ... {len(snippet) - SNIPPET_LINES} more lines of the same change "
                                                         "(all of it in the JSON and HTML reports: --json, --html)"]
                lines += ["", *snippet]
        manual = [t for t in self.trials if t.code_change]
        for trial in manual:
            lines += ["", f"{trial.name}: {trial.not_tried}. The change to make by hand:", trial.code_change]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    # -- data ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: schema version, causes, description, every trial (with its report)."""
        best = self.best
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "framework": self.framework,
            "nothing_to_repair": self.nothing_to_repair,
            "symptoms": list(self.symptoms),
            "causes": [cause.to_dict() for cause in self.causes],
            "best": best.name if best is not None else None,
            "steps": self.steps,
            "seed": self.seed,
            "budget_s": to_json(self.budget_s),
            "seconds": round(self.seconds, 3),
            "description": self.description.to_dict(),
            "trials": [trial.to_dict() for trial in self.trials],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self, *, title: str = "") -> str:
        """One self-contained HTML page (needs ``gradwatch[report]``); see
        :func:`gradwatch.doctor.html.to_html`."""
        from gradwatch.doctor.html import to_html

        return to_html(self, title=title)
