"""Trials: one short training run per candidate, how a hopeless one is stopped early, and how
the runs are ranked.

Every trial trains a copy of the model for the same number of steps, on the same batches in the
same order, from the same seed, watched by gradwatch under ``policy="observe"``; the adapter
returns a :class:`TrialResult`. The ranking puts health first, then the loss reached:

====  ===================================================================================
tier  trial
====  ===================================================================================
0     ran every step, the loss stayed finite, and gradwatch found nothing at ``warning``
1     ran every step with a finite loss, but with findings
2     stopped early: hopeless against the baseline or the best trial so far
3     diverged (non-finite loss) or failed
4     not tried (the model cannot be rewritten that way, or the time budget ran out)
====  ===================================================================================

Within a tier the lower *loss reached* wins: the mean training loss over the last fifth of the
steps, the same batches for every trial.

>>> stop = EarlyStop(steps=20, baseline=[2.0] * 20)
>>> stop([2.1] * 9), stop([2.1] * 10), stop([1.0] * 10)
('', "hopeless: loss 2.1 at step 9, no lower than the baseline's (2 there, 2 at its end)", '')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.doctor.repairs import Candidate
from gradwatch.jsonvalues import to_json
from gradwatch.report import Report

__all__ = ["TIERS", "EarlyStop", "TrialResult", "loss_reached", "rank"]

TIERS = ("healthy", "finite, with findings", "stopped early", "diverged or failed", "not tried")
"""What each tier of the ranking means (index = tier)."""


def loss_reached(losses: Sequence[float], steps: int | None = None) -> float:
    """The mean of the last fifth of ``steps`` losses (at least two); NaN without losses,
    inf when one of them is non-finite.

    >>> loss_reached([3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    0.5
    """
    if not losses:
        return math.nan
    tail = list(losses[-max(2, (steps or len(losses)) // 5):])
    if not all(math.isfinite(v) for v in tail):
        return math.inf
    return float(np.mean(tail))


@dataclass(eq=False)
class TrialResult:
    """One trial: the baseline (``candidate`` None) or a candidate repair.

    Args:
        name: ``"baseline"`` or the candidate's name.
        candidate: The repair tried, None for the baseline.
        steps: The steps the trial was given.
        losses: The training loss at each step it ran.
        report: gradwatch's report of the trial (None if it did not run).
        seconds: Wall time of the trial, copying and rewriting the model included.
        first_step_seconds: Wall time of its first step (tracing, warm-up). Defaults to 0.0.
        stopped: Why it ended before ``steps`` ("" when it ran them all).
        error: Why it failed, when the rewritten model or its setup raised.
        not_tried: Why it was not run (the rewrite is not possible, or the time budget ran out).
        code_change: For a model that cannot be rewritten: the change to make in its code.
        snippet: The exact change, as a diff-like snippet of layer definitions.
        update_ratios: Each layer's median ``||W_after - W_before|| / ||W_before||`` over the
            first steps.
        model: The trained copy of the model with the repair applied (the repaired model object).
        optimizer: Its optimizer (PyTorch; Keras models carry their own).
    """

    name: str
    candidate: Candidate | None
    steps: int
    losses: list[float] = field(default_factory=list)
    report: Report | None = None
    seconds: float = 0.0
    first_step_seconds: float = 0.0
    stopped: str = ""
    error: str = ""
    not_tried: str = ""
    code_change: str = ""
    snippet: str = ""
    update_ratios: dict[str, float] = field(default_factory=dict)
    model: Any = None
    optimizer: Any = None

    @property
    def is_baseline(self) -> bool:
        return self.candidate is None

    @property
    def finite(self) -> bool:
        return bool(self.losses) and all(math.isfinite(v) for v in self.losses)

    @property
    def completed(self) -> bool:
        """Ran every step without error."""
        return not (self.not_tried or self.error or self.stopped) and len(self.losses) >= self.steps

    @property
    def final_loss(self) -> float:
        """The loss reached (:func:`loss_reached`)."""
        return loss_reached(self.losses, self.steps)

    @property
    def finding_kinds(self) -> list[str]:
        return self.report.kinds("warning") if self.report is not None else []

    @property
    def healthy(self) -> bool:
        """Ran every step, the loss stayed finite, and no finding at ``warning`` or above."""
        return self.completed and self.finite and not self.finding_kinds

    @property
    def tier(self) -> int:
        """The ranking tier (:data:`TIERS`)."""
        if self.not_tried:
            return 4
        if self.error or not self.finite:
            return 3
        if not self.completed:
            return 2
        return 0 if self.healthy else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "candidate": self.candidate.to_dict() if self.candidate is not None else None,
            "steps": self.steps,
            "steps_run": len(self.losses),
            "tier": self.tier,
            "healthy": self.healthy,
            "final_loss": to_json(self.final_loss),
            "findings": self.finding_kinds,
            "seconds": round(self.seconds, 3),
            "stopped": self.stopped,
            "error": self.error,
            "not_tried": self.not_tried,
            "code_change": self.code_change,
            "snippet": self.snippet,
            "update_ratios": to_json(self.update_ratios),
            "losses": to_json(self.losses),
            "report": self.report.to_dict() if self.report is not None else None,
        }


def rank(trials: Sequence[TrialResult]) -> list[TrialResult]:
    """The trials best first: by tier, then the loss reached, then the order they ran in."""
    def key(item: tuple[int, TrialResult]) -> tuple[int, float, int]:
        index, trial = item
        loss = trial.final_loss
        return trial.tier, loss if math.isfinite(loss) else math.inf, index

    return [trial for _, trial in sorted(enumerate(trials), key=key)]


def _window(losses: Sequence[float], step: int, width: int = 5) -> float:
    """Mean loss over the ``width`` steps before ``step``: inf when the run diverged by then, NaN
    when it ended earlier without diverging."""
    part = list(losses[max(0, step - width):step])
    if len(part) < min(width, step):
        return math.inf if any(not math.isfinite(v) for v in losses) else math.nan
    if not all(math.isfinite(v) for v in part):
        return math.inf
    return float(np.mean(part))


@dataclass
class EarlyStop:
    """Decides, after each step of a trial, whether it is hopeless.

    A trial is stopped when its loss turns non-finite (``diverged``), or, checked every fifth
    step once ``from_fraction`` of the steps have run, when its mean loss over the last five steps
    is no lower than the baseline's over the same steps nor than the loss the baseline reached at
    its end (so a baseline that explodes later does not stop a slower, stable trial), or has closed
    less than a third of the gap between the baseline and the best trial so far once
    ``best_from_fraction`` have run.

    Args:
        steps: The trial's steps.
        baseline: The baseline trial's losses.
        best: The best trial's losses so far. Defaults to () (none yet).
        from_fraction: Share of the steps before the baseline comparison. Defaults to 0.5.
        best_from_fraction: Share of the steps before the comparison with the best. Defaults to 0.6.
    """

    steps: int
    baseline: Sequence[float]
    best: Sequence[float] = ()
    from_fraction: float = 0.5
    best_from_fraction: float = 0.6

    def __call__(self, losses: Sequence[float]) -> str:
        """The reason to stop after these losses, or "" to go on."""
        if not losses:
            return ""
        step = len(losses)
        if not math.isfinite(losses[-1]):
            return f"diverged: loss {losses[-1]} at step {step - 1}"
        if step % 5 or step < max(5, int(self.from_fraction * self.steps)) or step >= self.steps:
            return ""
        mine = _window(losses, step)
        base = _window(self.baseline, step)
        reached = loss_reached(self.baseline, self.steps) if len(self.baseline) >= self.steps else math.inf
        if math.isfinite(base) and mine >= max(base, reached):
            return f"hopeless: loss {mine:.3g} at step {step - 1}, no lower than the baseline's ({base:.3g} there, {reached:.3g} at its end)"
        if self.best and step >= int(self.best_from_fraction * self.steps):
            best = _window(self.best, step)
            if math.isfinite(best) and math.isfinite(base) and base > best and mine > best + (base - best) * 2 / 3:
                return f"hopeless: loss {mine:.3g} at step {step - 1}, far behind the best so far ({best:.3g})"
        return ""
