"""Label checks: what a run's label means, measured without gradwatch.

Framework-free: each check reads a probed, unwatched run (:class:`~benchmarks.zoo.evaluate.RunResult`
with its :class:`~benchmarks.detection.trace.Trace`: the loss, every gradient's and parameter's
norm, the dead share of a probed layer, per step) and, where the label is relative to the same run
done right, its healthy twin. A run whose check fails is *dropped* from the scores, never guessed.

* **healthy**: finite throughout (every loss and gradient), it learns (the full training set's loss
  after training below :data:`LEARN_RATIO` x before), and a classifier's test accuracy is well
  above chance (at least ``chance + ABOVE_CHANCE * (1 - chance)``, chance = the most frequent
  test class).
* **exploding** from step 0 (``lr_high``, ``huge_init``, ``exploding_rnn``): some loss or gradient
  non-finite, or the loss peaks at :data:`LOSS_FACTOR` x the twin's peak, or the global gradient
  norm at :data:`NORM_FACTOR` x the twin's, or a classifier ends at chance (below
  ``chance + NEAR_CHANCE * (1 - chance)``) while the twin learns.
* **exploding** mid-run (``lr_jump``): finite before the onset; after it non-finite, or the loss
  :data:`LOSS_FACTOR` x its median over the 20 steps before and above the run's first loss, or
  the norm :data:`NORM_FACTOR` x its median before, or the classifier ends at chance.
* **exploding** at one step (``poisoned_batch``): finite before; at the onset the norm is
  :data:`NORM_FACTOR` x its median over the 20 steps before, or non-finite.
* **nonfinite**: every gradient finite before the onset, some non-finite at it
  (:func:`benchmarks.detection.checks.nonfinite_at`).
* **vanishing**: median over the run of the first weight's ``||g||`` and ``||g||/||W||`` below
  1e-3 of the last weight's (:func:`benchmarks.detection.checks.vanishing`).
* **dead_units**: at least half of the layer's units output exactly zero on the whole batch on
  every step (:func:`benchmarks.detection.checks.dead`).

The twin of a diverging or non-finite run must itself pass the healthy check (it is the yardstick
of the rescue criterion), else the run is dropped.

The rescue criterion (:func:`rescued`): the run ends with a finite training loss below its loss
before training, and a classifier's test accuracy is at least :data:`RESCUE_ACCURACY` x the twin's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.detection import checks
from benchmarks.detection.scoring import LabelCheck
from benchmarks.detection.trace import GroupTrace

from .pathologies import DEAD_UNITS, DIVERGING, NONFINITE, PATHOLOGIES, VANISHING

if TYPE_CHECKING:
    from .evaluate import RunResult
    from .spec import RunSpec

LEARN_RATIO = 0.7
ABOVE_CHANCE = 0.4
NEAR_CHANCE = 0.15
LOSS_FACTOR = 10.0
NORM_FACTOR = 100.0
RESCUE_ACCURACY = 0.8
WINDOW = 20


def global_norm(gt: GroupTrace) -> np.ndarray:
    """Per step: the global norm of the gradients that exist (NaN/Inf when one of them is)."""
    g = np.where(gt.present(), gt.grads(), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sqrt(np.sum(g * g, axis=1))


def nonfinite_steps(run: RunResult) -> np.ndarray:
    """Per step: the loss or some existing gradient is NaN/Inf."""
    gt = run.trace.main
    bad_grad = np.any(gt.present() & ~np.isfinite(gt.grads()), axis=1)
    return bad_grad | ~np.isfinite(np.asarray(gt.loss, float))


def first_nonfinite(run: RunResult) -> int | None:
    """The first step with a non-finite loss or gradient, or None."""
    rows = nonfinite_steps(run)
    return int(np.argmax(rows)) if rows.any() else None


def _accuracy_note(run: RunResult) -> str:
    return "" if math.isnan(run.test_accuracy) else f", test acc {run.test_accuracy:.3f} (chance {run.chance:.2f})"


def above_chance(run: RunResult) -> bool:
    return run.test_accuracy >= run.chance + ABOVE_CHANCE * (1 - run.chance)


def at_chance(run: RunResult) -> bool:
    """A classifier whose test accuracy is near chance (or NaN parameters: no prediction)."""
    acc = run.test_accuracy
    return not math.isfinite(acc) or acc <= run.chance + NEAR_CHANCE * (1 - run.chance)


def healthy(run: RunResult) -> LabelCheck:
    """Finite throughout, learns, and (classifiers) well above chance on the test split."""
    bad = first_nonfinite(run)
    before, after = run.train_loss_before, run.train_loss_after
    finite = bad is None and math.isfinite(after) and math.isfinite(before)
    learns = finite and after < LEARN_RATIO * before
    ok = finite and learns and (run.classifier is False or above_chance(run))
    note = f"train loss {before:.3g} -> {after:.3g}" + _accuracy_note(run)
    if bad is not None:
        note += f"; NON-FINITE from step {bad}"
    elif not learns:
        note += f"; does not learn (needs < {LEARN_RATIO:g}x)"
    elif not ok:
        note += "; accuracy not well above chance"
    return LabelCheck(ok, note)


def _peak(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def exploding_from_start(run: RunResult, twin: RunResult) -> LabelCheck:
    """Non-finite, or a loss / norm far above the twin's, or stuck at chance while the twin learns."""
    bad = first_nonfinite(run)
    loss_x = _ratio(_peak(np.asarray(run.trace.main.loss, float)), _peak(np.asarray(twin.trace.main.loss, float)))
    norm_x = _ratio(_peak(global_norm(run.trace.main)), _peak(global_norm(twin.trace.main)))
    stuck = run.classifier and at_chance(run) and above_chance(twin)
    ok = bad is not None or loss_x >= LOSS_FACTOR or norm_x >= NORM_FACTOR or stuck
    return LabelCheck(ok, (
        f"peak loss x{loss_x:.3g} and peak grad norm x{norm_x:.3g} the twin's"
        + (f"; non-finite from step {bad}" if bad is not None else "")
        + _accuracy_note(run)
        + ("" if math.isnan(twin.test_accuracy) else f" vs twin {twin.test_accuracy:.3f}")
    ))


def exploding_after(run: RunResult, twin: RunResult, onset: int) -> LabelCheck:
    """Finite before ``onset``; after it non-finite, loss or norm far above the level before, or
    the classifier ends at chance."""
    rows = nonfinite_steps(run)
    loss = np.asarray(run.trace.main.loss, float)
    norms = global_norm(run.trace.main)
    lo = max(0, onset - WINDOW)
    base_loss, base_norm = float(np.median(loss[lo:onset])), float(np.median(norms[lo:onset]))
    clean = not bool(rows[:onset].any())
    bad = int(np.argmax(rows[onset:])) + onset if rows[onset:].any() else None
    loss_x = _ratio(_peak(loss[onset:]), base_loss)
    norm_x = _ratio(_peak(norms[onset:]), base_norm)
    loss_blows = loss_x >= LOSS_FACTOR and _peak(loss[onset:]) > loss[0]
    stuck = run.classifier and at_chance(run) and above_chance(twin)
    ok = clean and (bad is not None or loss_blows or norm_x >= NORM_FACTOR or stuck)
    return LabelCheck(ok, (
        f"after step {onset}: peak loss x{loss_x:.3g} (first loss {loss[0]:.3g}), peak grad norm x{norm_x:.3g} "
        f"the 20 steps before" + (f"; non-finite from step {bad}" if bad is not None else "")
        + _accuracy_note(run) + ("" if clean else "; NOT CLEAN BEFORE THE ONSET")
    ))


def spike_at(run: RunResult, onset: int) -> LabelCheck:
    """Finite before ``onset``; the global norm at it 100x its median over the 20 steps before."""
    rows = nonfinite_steps(run)
    norms = global_norm(run.trace.main)
    base = float(np.median(norms[max(0, onset - WINDOW):onset]))
    at = float(norms[onset])
    clean = not bool(rows[:onset].any())
    ok = clean and (bool(rows[onset]) or _ratio(at, base) >= NORM_FACTOR)
    return LabelCheck(ok, f"grad norm {at:.3g} at step {onset} vs median {base:.3g} before (x{_ratio(at, base):.3g})"
                      + ("" if clean else "; NOT CLEAN BEFORE THE ONSET"))


def confirm(spec: RunSpec, run: RunResult, twin: RunResult | None) -> LabelCheck:
    """The label check for ``spec`` on its probed unwatched ``run`` (and its probed ``twin``).

    Args:
        spec: The run.
        run: Its unwatched run, with a probe trace.
        twin: The healthy twin's unwatched run with a probe trace (required for the diverging and
            non-finite pathologies; else ignored).

    Returns:
        The check; ``ok=False`` drops the run.
    """
    if spec.pathology is None:
        return healthy(run)
    p = spec.pathology
    kind = PATHOLOGIES[p.name]
    if p.name in DIVERGING:
        if twin is None:
            raise ValueError(f"{p.name} needs its healthy twin's run to be checked; received twin=None.")
        twin_check = healthy(twin)
        if not twin_check.ok:
            return LabelCheck(False, f"the healthy twin is not healthy: {twin_check.evidence}")
    if kind.expected == NONFINITE:
        return checks.nonfinite_at(p.onset)(run.trace)
    if kind.expected == VANISHING:
        return checks.vanishing(run.first_weight, run.last_weight)(run.trace)
    if kind.expected == DEAD_UNITS:
        return checks.dead(run.dead_module, min_fraction=0.5, onset=0)(run.trace)
    assert twin is not None
    if p.name == "poisoned_batch":
        return spike_at(run, p.onset)
    if kind.from_start:
        return exploding_from_start(run, twin)
    return exploding_after(run, twin, p.onset)


DIVERGE_RISE = 3.0
"""A run diverges when its loss (median of 5 steps) climbs this far above where it was at the onset."""


def diverged(run: RunResult, onset: int) -> bool:
    """The unwatched run really diverges from the onset on: a non-finite loss or gradient, or the
    loss (median of 5 steps) climbing :data:`DIVERGE_RISE` times above its level at the onset, or a
    final training loss not below the first. A run broken from its start whose loss still falls
    (a huge init under Adam, an exploding recurrence that training tames) is broken but does not
    diverge: it counts for detection, not in the rescue rate (reported apart)."""
    rows = nonfinite_steps(run)
    if rows[onset:].any():
        return True
    loss = np.asarray(run.trace.main.loss, float)
    start = float(np.median(loss[max(0, onset - 5): onset + 1] if onset else loss[:5]))
    after = loss[onset:]
    level = np.array([np.median(after[i:i + 5]) for i in range(max(1, len(after) - 4))])
    if start > 0 and np.nanmax(level) > DIVERGE_RISE * start:
        return True
    return not run.train_loss_after < run.train_loss_before


def rescued(run: RunResult, twin: RunResult) -> tuple[bool, str]:
    """The rescue criterion: finite, final training loss below the first, and (classifiers) test
    accuracy at least :data:`RESCUE_ACCURACY` x the twin's. Returns the verdict and the numbers."""
    before, after = run.train_loss_before, run.train_loss_after
    ok = math.isfinite(after) and after < before
    note = f"train loss {before:.3g} -> {after:.3g}"
    if run.classifier:
        need = RESCUE_ACCURACY * twin.test_accuracy
        ok = ok and run.test_accuracy >= need
        note += f", test acc {run.test_accuracy:.3f} (needs >= {need:.3f}: 0.8 x twin {twin.test_accuracy:.3f})"
    return ok, note


__all__ = ["ABOVE_CHANCE", "DIVERGE_RISE", "LEARN_RATIO", "LOSS_FACTOR", "NEAR_CHANCE", "NORM_FACTOR",
           "RESCUE_ACCURACY", "above_chance", "at_chance", "confirm", "diverged", "first_nonfinite", "global_norm",
           "healthy", "nonfinite_steps", "rescued"]
