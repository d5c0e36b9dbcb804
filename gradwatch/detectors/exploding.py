"""``exploding``: the step size is too large for the model — seen in the gradients, the weights and
the loss, against the run's own history and against absolute, scale-free limits from step 0.

Rules, each a finding of kind ``exploding`` whose evidence names the ``rule``:

1. **Spike** (``warning``): the log of the global norm is more than ``z_threshold`` standard
   deviations *and* ``min_ratio`` times above its exponential moving average, after ``warmup``
   finite steps, on two measured steps in a row — or on one, when the jump is ``big_ratio`` times
   or more. One moderate outlier is what a short last batch or a batch of two produces; an
   explosion does not come back down the next step. The EMA is fed the clipped value on a jump
   (ZClip), so a lasting change of regime is absorbed slowly. A norm that stays below
   ``floor_share`` of the level the run started at is not judged: a run that has converged to
   tiny gradients and jumps back up towards its early level is not exploding.
2. **Sustained growth** (``error``): over the last ``window`` steps (``2 * window`` for a slower
   divergence, at ``growth_factor ** 1.25``) the norm rose by ``growth_factor``, measured from the
   median of its first three steps to the smaller of the two newest (so one noisy step proves nothing),
   with most step-to-step changes up and the newest the largest; past the first ``window`` steps,
   the two newest the largest of the span (with batches of a sample or two, fitted samples give
   norms orders of magnitude below an unfitted one's, and a median of three of them is no level to
   grow from). Judged from the fourth finite
   step on: a run that diverges from step 0 is caught too.
3. **An explosion that ends in NaN** (``error``): the first non-finite step after finite norms
   that grew ``nan_growth`` times over the recent steps, or after a gradient larger than the
   weights themselves. The NaN is the symptom (``nonfinite`` reports it); this is the cause.
4. **The loss runs away** (``warning``, ``error`` past ``10 * loss_rise``): each of the last seven
   losses is ``loss_rise`` times the median of the first seven, and their median is above every
   one of the first seven (batches of a sample or two swing that far on their own, but not all seven
   in a row, since a batch the model fits scores near 0). Training lowers the loss: a
   run whose loss climbs far above where it started is broken whatever its gradients look like.
   Where the adapter knows what a model that knows nothing scores (``chance_loss``, or
   ``null_loss`` for a squared error), the rise is measured from that level when it is above the
   start: seven batches of one sample may all be ones the init happens to fit.
   With a chance level known, the same holds for a run that had learnt (the median of seven losses
   below ``SETTLED_LOW`` of chance) and then scores more than ``RECOVER`` times chance on every one
   of the last seven batches: worse than a model that knows nothing (an LR jumped mid-run; the rise
   from the start misses it, since the init's loss is itself near chance).
   And (``error``, advice only: no automatic remedy) when the adapter knows the loss function's
   chance level (``StepStats.chance_loss``, ``ln C`` for a C-class cross-entropy), a first loss
   ``chance_ratio`` times that level, and the median of the first three too (one unlucky batch of
   a sample or two is not the init; a first loss ``chance_ratio ** 2`` times it is, at once): the outputs are far too large (the weights ×30 at init, an
   exploding recurrence) — a run broken from step 0. Only the first loss is the init's alone:
   after one update of an adaptive optimizer at a high LR the loss may be far above chance for a
   few steps and recover. A standard init (Glorot, He, LeCun) gives logits of unit scale and a
   first loss near ``ln C``; four times ``ln C`` takes logits spread by about 3 (10 classes) to 5
   (two classes).
5. **Updates as large as the weights** (``warning``): between two steps whose parameter norms were
   measured, the norm of all weight tensors together changed by more than ``max_update`` of
   itself while the loss rose by half or more: the learning rate is too high (Adam at 1.0 kills
   the units this way at once: the loss goes up a thousandfold). One such update is not enough:
   Adagrad's and Adam's first update moves every weight by about the learning rate whatever its
   gradient (Adagrad at lr 0.6 changes a GRU's weights' norm by five times itself, and the loss
   may jump fifty-fold), their later steps shrink relative to the weights that update has grown,
   and the run recovers. A step size that is really too large makes the next update large too,
   or leaves the loss stuck: ``RECOVERY_STEPS`` steps on still ``RECOVER`` times its level before
   the update and not down by half from its peak since (Adam at lr 1.0; the tutorial MLP at SGD 5
   with a saturated softmax, whose gradients then go quiet), or, with a chance level known, leaves
   it at chance: ``SETTLE_STEPS`` steps on, every one of the last seven losses at least
   ``SETTLED_LOW`` of chance and their median at most ``RECOVER`` times it (Adam at a mistyped LR
   with batches of a few samples: one update tens of times the weights, the loss up a
   hundredfold and back down to ``ln C``, where it stays while the units are dead or the outputs
   collapsed; a run that took such an update has batches well below chance by then), if the
   update was ten times the weights or more, or the weights have grown ``SETTLE_GROWTH`` times
   since (a step size that is too large keeps moving them; after Adagrad's first step at a high
   but sane LR, two or three times the weights, they settle). A first
   large update that the loss takes well is how a small convex model starts under Adagrad or Adam.
   With an adapter that measures the update itself (``StepStats.update_norm``), any weight tensor
   whose update exceeds ``max_update`` times its norm.

Learning-rate warm-up moves the norm by small factors over many steps; the EMA follows it.

Each finding carries ``clip_threshold`` (``exp(mean + clip_z * std)`` of the log norm over healthy
steps, the level the policy clips to) and ``remedy``: ``"clip"`` where clipping the step holds it
(a spike: one bad batch), ``"lr"`` where the step size itself must come down (growth, a NaN after
growth, the loss running away, updates as large as the weights), ``"report"`` where no automatic
remedy fits (a loss far above chance from step 0: the init, which only the user can change).

References:
    Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural networks. ICML 2013.
    Kumar et al. ZClip: Adaptive spike mitigation for LLM pre-training. arXiv:2504.02507, 2025.
    Brock, De, Smith, Simonyan. High-performance large-scale image recognition without
    normalization. ICML 2021 (update and gradient sizes relative to the weights).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from gradwatch.detectors.base import (
    Detector,
    check_positive,
    ema,
    median,
    median_of_few,
    ordered,
    push,
)
from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats

LOSS_WINDOW = 7
"""Losses whose median makes a level (start and now): a few noisy batches (of one sample each,
say) do not move it."""
SANE_UPDATE = 0.01
"""A healthy step changes the weights by about this share of them (1e-3 to 1e-2 is the usual
range); an update ``change`` times the weights suggests an LR ``SANE_UPDATE / change`` times lower."""
RECOVER = 2.0
RECOVERY_STEPS = 3
"""After an update as large as the weights, a loss still ``RECOVER`` times its level before it
this many steps on (and not down by half from its peak since): the run did not take the update
(rule 5)."""
RECOVERY_LIMIT = 20
"""Steps after which an update as large as the weights that neither recovered nor stuck is no
longer followed (rule 5)."""
SETTLE_STEPS = 4 * LOSS_WINDOW
"""Steps after an update as large as the weights (that the loss rose from) at which the loss is
judged against the chance level (rule 5): by then a run that took the update has batches well
below chance, while one whose units died or whose outputs collapsed scores chance on every batch."""
SETTLE_CHANGE = 10.0
"""An update that changed the weights' norm by this many times itself or more is judged at chance
whatever the weights did since (rule 5; see ``SETTLE_GROWTH``)."""
SETTLE_GROWTH = 2.0
"""The update itself changed the weights' norm by ``SETTLE_CHANGE`` times itself or more (an LR
ten times the weights' scale: Adam at a mistyped LR moves every weight by about the LR, x20-x45
on a CNN at init), or by then the weights' norm is ``SETTLE_GROWTH`` times what it was right
after it (a step size that keeps moving the weights by a large share of themselves). A run whose
first update was Adagrad's at a high but sane LR (x2-x3) has settled, however long its loss stays
near chance (rule 5)."""
SETTLED_LOW = 0.75
"""Every one of the last ``LOSS_WINDOW`` losses at least this share of the chance level (and their
median at most ``RECOVER`` times it): the model scores what a model that knows nothing scores."""
EARLY_STEPS = 5
EARLY_LOSSES = 3
"""The losses whose median, with the first loss, judges the init against the chance level."""
NULL_ROWS = 32
"""Target rows an adapter pools before it publishes ``StepStats.null_loss``."""
NULL_STEPS = LOSS_WINDOW
"""Steps after which an adapter publishes ``StepStats.null_loss`` with the rows seen so far (the
init's losses are judged among the first ``LOSS_WINDOW``)."""
HUGE_RATIO = 10.0
"""In the first steps, a gradient norm this many times the weights' norm, right before a NaN,
is an explosion from step 0. (A gradient as large as the weights is ordinary in a small model at
init: a NaN after one is as likely to come from the batch.)"""
"""Finite steps during which a NaN after a gradient larger than the weights is an explosion."""


class ExplodingState(NamedTuple):
    seen: int
    """Finite steps seen."""
    log_mean: float
    log_var: float
    recent: np.ndarray
    """Ring buffer of the last ``2 * window`` log global norms."""
    cursor: int
    tensor_log_mean: np.ndarray
    """Per-tensor EMA of the log grad norm (to name the layers that explode)."""
    pending: bool = False
    """The previous measured step was a moderate jump: a second one in a row is an explosion."""
    early: float = math.nan
    """Median log norm of the first ``warmup`` finite steps: the level the run started at."""
    early_max: float = math.nan
    """Largest log norm of the first ``warmup`` finite steps."""
    nonfinite_before: bool = False
    """The previous measured step was non-finite (rule 3 judges the first of a run of them)."""
    losses: tuple = ()
    """The last ``LOSS_WINDOW`` finite losses (rule 4)."""
    loss_start: float = math.nan
    """Median of the first ``LOSS_WINDOW`` finite losses."""
    loss_first_max: float = math.nan
    """The largest of the first ``LOSS_WINDOW`` finite losses."""
    losses_seen: int = 0
    """Finite losses seen."""
    weight_norm: float = math.nan
    """Norm of all weight tensors together at the last step that measured it (rule 5)."""
    weight_step: int = -1
    """That step."""
    last_loss: float = math.nan
    """The loss of that step."""
    last_ratio: float = math.nan
    """The last finite step's global gradient norm over its weights' norm (rule 3, step 0)."""
    big_update: bool = False
    """The last update changed the weights' norm by more than ``max_update`` with the loss rising
    (rule 5: one must happen twice in a row, or the loss must blow up or stay up)."""
    big_step: int = -1
    """The step of a large update not judged yet (rule 5 waits for the loss to recover); -1: none."""
    big_loss: float = math.nan
    """The loss before that update."""
    big_change: float = math.nan
    """The change of the weights' norm it made, as a share of it."""
    big_peak: float = math.nan
    """The largest loss since that update."""
    big_weights: float = math.nan
    """The weights' norm before that update."""
    first_loss: float = math.nan
    """The run's first finite loss (rule 4: the init's alone)."""
    settle_step: int = -1
    """The step of a large update the loss rose from, followed until ``SETTLE_STEPS`` later to see
    whether the loss settled at the chance level (rule 5); -1: none."""
    settle_change: float = math.nan
    """The change of the weights' norm that update made, as a share of it."""
    settle_weights: float = math.nan
    """The weights' norm right after that update."""
    learnt: bool = False
    """The median of ``LOSS_WINDOW`` losses has been below ``SETTLED_LOW`` of the chance level: the
    model learnt something (rule 4: a loss that then climbs above chance on every batch diverges)."""
    init_judged: bool = False
    """The first losses have been judged against the chance (or null) level (rule 4, the init)."""


def exploding(
    *,
    warmup: int = 20,
    alpha: float = 0.05,
    z_threshold: float = 6.0,
    min_ratio: float = 4.0,
    big_ratio: float = 100.0,
    floor_share: float = 0.1,
    window: int = 10,
    growth_factor: float = 100.0,
    nan_growth: float = 10.0,
    start_factor: float = 10.0,
    loss_rise: float = 3.0,
    chance_ratio: float = 4.0,
    max_update: float = 1.0,
    clip_z: float = 2.0,
) -> Detector:
    """Detect steps too large for the model (see the module docstring for the rules).

    Args:
        warmup: Finite steps to observe before spikes are judged. Defaults to 20.
        alpha: EMA weight of a new step. Defaults to 0.05 (about 20 steps of memory).
        z_threshold: Standard deviations (of the log norm) above the EMA for a jump. Defaults to 6.0.
        min_ratio: A jump must also be this many times the EMA norm. Defaults to 4.0.
        big_ratio: A jump this many times the EMA is an explosion on its own. Defaults to 100.0.
        floor_share: Norms below this share of the run's early level are not judged for spikes.
            Defaults to 0.1.
        window: Steps over which sustained growth is judged. Defaults to 10.
        growth_factor: Growth over ``window`` steps that counts as an explosion. Defaults to 100.0.
        nan_growth: Growth before a NaN that makes the NaN an explosion's. Defaults to 10.0.
        start_factor: Sustained growth counts only where the norm is this many times the level
            the run started at (growth back from a converged run's tiny gradients does not).
            Defaults to 10.0.
        loss_rise: Rise of the loss over its starting level that counts as running away (the
            loss must also stand above every one of the run's first losses). Defaults to 3.0.
        chance_ratio: A first loss this many times its chance level: broken from step 0 (judged
            on the run's first losses only). Defaults to 10.0.
        max_update: Change of the weights' norm in one step, as a share of it. Defaults to 1.0.
        clip_z: Standard deviations above the EMA for the suggested clip level. Defaults to 2.0.

    Returns:
        The detector.

    Raises:
        ValueError: for a non-positive or out-of-range argument.

    Example:
        >>> from gradwatch.testing import exploding_stream
        >>> det = exploding()
        >>> stream = list(exploding_stream(onset=60, steps=80))
        >>> state = det.init(stream[0].layout)
        >>> first = None
        >>> for s in stream:
        ...     found, state = det.update(s, state)
        ...     first = first if first is not None or not found else s.step
        >>> 60 <= first <= 70
        True
    """
    check_positive("alpha", alpha, below=1.0)
    for name, value in (("z_threshold", z_threshold), ("growth_factor", growth_factor), ("max_update", max_update),
                        ("floor_share", floor_share), ("nan_growth", nan_growth), ("loss_rise", loss_rise),
                        ("chance_ratio", chance_ratio), ("start_factor", start_factor)):
        check_positive(name, value)
    if not 1.0 <= min_ratio <= big_ratio:
        raise ValueError(f"exploding needs 1 <= min_ratio <= big_ratio. Received min_ratio={min_ratio!r}, "
                         f"big_ratio={big_ratio!r}.")
    if warmup < 2 or window < 3:
        raise ValueError(f"exploding needs warmup >= 2 and window >= 3. Received warmup={warmup}, window={window}.")

    def init(layout: Layout) -> ExplodingState:
        return ExplodingState(
            seen=0, log_mean=0.0, log_var=0.0, recent=np.zeros(2 * window), cursor=0,
            tensor_log_mean=np.full(len(layout), np.nan),
        )

    def update(stats: StepStats, state: ExplodingState) -> tuple[list[Finding], ExplodingState]:
        findings: list[Finding] = []
        state = _judge_loss(stats, state, findings, loss_rise, chance_ratio)
        norm = stats.global_norm
        if not stats.finite or not math.isfinite(norm):
            if not state.nonfinite_before:
                _after_growth(stats, state, findings, window, nan_growth)
            return findings, state._replace(nonfinite_before=True, pending=False)
        weights = _weights_norm(stats)
        state = _judge_weights(stats, state, findings, max_update, weights)
        if norm <= 0.0:
            return findings, state
        log_norm = math.log(norm)
        std = math.sqrt(max(state.log_var, 0.0))
        warm = state.seen >= warmup
        threshold = max(z_threshold * std, math.log(min_ratio))
        above_floor = not math.isfinite(state.early) or log_norm >= state.early + math.log(floor_share)
        jump = warm and above_floor and log_norm - state.log_mean > threshold
        ratio = math.exp(log_norm - state.log_mean) if state.seen else 1.0
        spike = jump and (state.pending or ratio >= big_ratio)
        clip_level = math.exp(state.log_mean + clip_z * std) if state.seen else norm

        measured = stats.has_grad & (stats.grad_norm > 0)
        tensor_log = np.where(measured, np.log(np.where(measured, stats.grad_norm, 1.0)), np.nan)
        recent, cursor = push(state.recent, state.cursor, log_norm)
        filled = min(state.seen + 1, 2 * window)
        history = ordered(recent, cursor, filled)

        if spike:
            layers = _exploding_layers(stats, tensor_log, state.tensor_log_mean, min_ratio)
            z = (log_norm - state.log_mean) / max(std, 1e-12)
            again = " on two steps in a row" if ratio < big_ratio else ""
            findings.append(_finding(
                "warning", stats, layers,
                message=(
                    f"Global gradient norm {norm:.3g} is {ratio:.0f}x its recent level "
                    f"({math.exp(state.log_mean):.3g}, z={z:.1f} in log space){again}; largest jumps in "
                    f"{', '.join(layers[:3]) or 'all layers'}. Clip the global norm at ~{clip_level:.3g}."
                ),
                evidence={"rule": "spike", "global_norm": norm, "ema_norm": math.exp(state.log_mean),
                          "ratio": ratio, "z": z, "clip_threshold": clip_level, "remedy": "clip"},
            ))
        growth_span = _sustained_growth(history, window, math.log(growth_factor))
        # Growth back from a converged run's tiny gradients (or, with batches of one sample, from a
        # sample already fitted) is not a divergence: the norm must also stand well above the level
        # the run started at, and above the largest norm of its first steps.
        above_start = not math.isfinite(state.early) or (
            log_norm >= state.early + math.log(start_factor)
            and (not math.isfinite(state.early_max) or log_norm > state.early_max))
        if growth_span and above_start:
            span = history[-growth_span:]
            layers = _exploding_layers(stats, tensor_log, state.tensor_log_mean, 1.0)
            growth = math.exp(min(span[-2:]) - _start_level(span))
            findings.append(_finding(
                "error", stats, layers,
                message=(
                    f"Global gradient norm grew {growth:.0f}x over the last {growth_span} steps and is "
                    f"still rising (now {norm:.3g}): the run is diverging. Lower the learning "
                    "rate or clip the gradient norm."
                ),
                evidence={
                    "rule": "growth", "global_norm": norm, "growth": growth, "window": growth_span,
                    "clip_threshold": min(clip_level, math.exp(span.min()) * min_ratio)
                    if warm else math.exp(span.min()) * min_ratio,
                    # a divergence, not one bad batch: the step size must come down
                    "remedy": "lr",
                },
            ))
        if stats.layout.roles and np.isfinite(stats.update_norm).any():
            _update_ratio_rule(stats, findings, max_update, clip_level)

        # EMA update; on a jump feed the clipped value (ZClip) so a new regime is absorbed slowly.
        rate = max(alpha, 1.0 / (state.seen + 1))
        observed = min(log_norm, state.log_mean + threshold) if jump else log_norm
        log_mean, log_var = ema(state.log_mean, state.log_var, observed, rate) if state.seen else (observed, 0.0)
        tensor_mean = np.where(
            np.isnan(state.tensor_log_mean), tensor_log,
            np.where(np.isnan(tensor_log), state.tensor_log_mean,
                     state.tensor_log_mean + rate * (np.minimum(tensor_log, state.tensor_log_mean + threshold)
                                                     - state.tensor_log_mean)),
        )
        early, early_max = state.early, state.early_max
        if state.seen + 1 <= warmup:  # the level the run starts at: the median of its first steps
            early = median(history[-min(filled, warmup):])
            early_max = log_norm if not math.isfinite(early_max) else max(early_max, log_norm)
        ratio_to_weights = norm / weights if math.isfinite(weights) and weights > 0 else state.last_ratio
        return findings, state._replace(
            seen=state.seen + 1, log_mean=float(log_mean), log_var=float(log_var), recent=recent, cursor=cursor,
            tensor_log_mean=tensor_mean, pending=jump and not spike, early=float(early), early_max=float(early_max),
            nonfinite_before=False, last_ratio=float(ratio_to_weights),
        )

    def holds(state: ExplodingState) -> bool:
        # Following an update as large as the weights (rule 5): the snapshot a later rollback
        # restores must be from before it.
        return state.big_step >= 0 or state.settle_step >= 0

    return Detector("exploding", init, update, holds)


# -- rule 3: an explosion that ends in NaN -----------------------------------------------------------


def _after_growth(stats: StepStats, state: ExplodingState, findings: list[Finding], window: int,
                  nan_growth: float) -> None:
    if state.seen == 0:
        return
    history = ordered(state.recent, state.cursor, min(state.seen, 2 * window))[-window:]
    grew = history[-1] - history.min() if len(history) >= 2 else 0.0
    rising = len(history) >= 2 and history[-1] >= history.max()
    # In the first steps there is no history to grow from: a gradient an order of magnitude larger
    # than the weights it belongs to, right before the NaN, says the same (broken from step 0).
    huge = state.seen < EARLY_STEPS and math.isfinite(state.last_ratio) and state.last_ratio >= HUGE_RATIO
    grown = rising and grew >= math.log(nan_growth)
    if not (grown or huge):
        return
    why = (f"grew {math.exp(grew):.0f}x over the last {len(history)} steps" if grown
           else f"was {state.last_ratio:.3g}x the norm of the weights themselves")
    findings.append(_finding(
        "error", stats, (),
        message=(
            f"The gradient norm {why} and then turned non-finite: the run exploded (the NaN/Inf is "
            "its result). Lower the learning rate, or clip the gradient norm."
        ),
        evidence={"rule": "nonfinite_after_growth", "growth": math.exp(grew), "ratio_to_weights": state.last_ratio,
                  "clip_threshold": math.exp(history.min()) if len(history) else math.inf, "remedy": "lr",
                  # an update as large as the weights, still followed (rule 5), says by how much
                  **({"lr_factor_hint": SANE_UPDATE / state.big_change} if state.big_step >= 0 else {}),
                  # the weights before the NaN, for a clip level relative to them
                  **({"previous_weight_norm": state.big_weights if state.big_step >= 0 else state.weight_norm}
                     if math.isfinite(state.weight_norm) else {})},
    ))


# -- rule 4: the loss runs away ----------------------------------------------------------------------


def _judge_loss(stats: StepStats, state: ExplodingState, findings: list[Finding], loss_rise: float,
                chance_ratio: float) -> ExplodingState:
    loss = stats.loss
    if loss is None or not math.isfinite(loss):
        return state
    losses = (state.losses + (loss,))[-LOSS_WINDOW:]
    start, first_max = state.loss_start, state.loss_first_max
    if math.isnan(start) and len(losses) == LOSS_WINDOW:
        start, first_max = median_of_few(losses), max(losses)
    seen = state.losses_seen + 1
    first = loss if seen == 1 else state.first_loss
    state = state._replace(losses=losses, loss_start=float(start), loss_first_max=float(first_max), losses_seen=seen,
                           first_loss=float(first))
    level = median_of_few(losses)
    chance = stats.chance_loss or 0.0
    known = chance > 0
    learnt = state.learnt
    if known and len(losses) == LOSS_WINDOW and level < SETTLED_LOW * chance:
        state = state._replace(learnt=True)
    # The init is judged by the run's first loss (no update has touched it), confirmed by the
    # median of the first three: a loss that climbs far above chance after updates is the step
    # size's doing (rules 1, 2 and 5, and the rise below), not the init's.
    # A first loss chance_ratio**2 times chance is the init beyond doubt: said at once.
    # Without a chance level, a null level estimated from the targets (a squared error's mean
    # squared target, StepStats.null_loss) judges the same first losses once it is known, at the
    # square of the ratio: an estimate from a few rows is not ln C.
    null = stats.null_loss or 0.0
    reference, ratio = (chance, chance_ratio) if known else (null, chance_ratio ** 2)
    verdict = None
    if not state.init_judged and reference > 0:
        if known and seen == 1 and first > chance_ratio ** 2 * chance:
            verdict = first
        elif seen >= EARLY_LOSSES:
            # The first three are still the window's oldest while seen <= LOSS_WINDOW.
            early = median_of_few(losses[:EARLY_LOSSES]) if seen <= LOSS_WINDOW else math.nan
            if (first > ratio * reference and early > ratio * reference
                    and (not known or first <= chance_ratio ** 2 * chance)):
                verdict = early
        if verdict is not None or seen >= EARLY_LOSSES:
            state = state._replace(init_judged=True)
    if verdict is not None:
        what = "a model that knows nothing" if known else "a model that outputs zeros"
        findings.append(_finding(
            "error", stats, (),
            message=(
                f"The loss is {verdict:.4g}, {verdict / reference:.0f}x what {what} scores "
                f"({reference:.3g}): the outputs are far too large. Check the initialisation scale and "
                "lower the learning rate."
            ),
            evidence={"rule": "loss_over_chance", "loss": verdict,
                      ("chance_loss" if known else "null_loss"): reference,
                      "clip_threshold": math.inf, "remedy": "report"},
        ))
    elif (len(losses) == LOSS_WINDOW and math.isfinite(start) and start > 0
          and min(losses) > loss_rise * max(start, reference) and level > first_max):
        # Every one of the last losses above the rise, and their median above every one of the
        # first losses: the loss of a batch of one or two samples swings by orders of magnitude
        # (and down to nearly 0 on a batch it fits), so a median that wanders up is noise; a
        # divergence lifts every batch's loss. The rise is measured from the start or from what a
        # model that knows nothing scores, whichever is higher: seven batches of one sample each
        # may all be ones the init happens to fit (a start at 0.08 where the mean squared target
        # is 1.1), and a run that then scores about the null level has not diverged.
        base = max(start, reference)
        what = (f"where the run started ({start:.4g})" if base == start else
                f"what {'a model that knows nothing' if known else 'a model that outputs zeros'} scores "
                f"({base:.3g}; the run started at {start:.4g})")
        findings.append(_finding(
            "error" if level > 10 * loss_rise * base else "warning", stats, (),
            message=(
                f"The loss rose to {level:.4g}, {level / base:.3g}x {what}: "
                "the steps are too large and the run diverges. Lower the learning rate."
            ),
            evidence={"rule": "loss_rise", "loss": level, "start_loss": start,
                      **({"chance_loss" if known else "null_loss": reference} if reference > 0 else {}),
                      "clip_threshold": math.inf, "remedy": "lr"},
        ))
    elif (learnt and known and len(losses) == LOSS_WINDOW and min(losses) > RECOVER * chance
          and level > first_max):
        # Worse than a model that knows nothing, on every one of the last batches, after the run had
        # learnt: an LR jumped mid-run (the rise above is measured from the init's loss, itself
        # near chance, so a run that had learnt can lose it all without rising that far).
        findings.append(_finding(
            "error" if level > 10 * loss_rise * chance else "warning", stats, (),
            message=(
                f"The loss rose to {level:.4g}, {level / chance:.3g}x what a model that knows nothing scores "
                f"({chance:.3g}), on every recent batch, after the run had learnt: the steps are too large "
                "and the run diverges. Lower the learning rate."
            ),
            evidence={"rule": "loss_rise", "loss": level, "start_loss": start, "chance_loss": chance,
                      "clip_threshold": math.inf, "remedy": "lr"},
        ))
    return state


# -- rule 5: updates as large as the weights --------------------------------------------------------


def _weights_norm(stats: StepStats) -> float:
    if not stats.params_measured:
        return math.nan
    weight = stats.layout.role_mask(("weight",)) & stats.has_grad & np.isfinite(stats.param_norm)
    if not weight.any():
        return math.nan
    return float(np.sqrt(np.sum(stats.param_norm[weight] ** 2)))


def _judge_weights(stats: StepStats, state: ExplodingState, findings: list[Finding], max_update: float,
                   weights: float) -> ExplodingState:
    loss = stats.loss if stats.loss is not None and math.isfinite(stats.loss) else math.nan
    before = len(findings)
    state = _judge_settled(stats, state, findings, loss)
    if state.big_step >= 0 and math.isfinite(loss) and stats.step > state.big_step:
        peak = max(state.big_peak, loss) if math.isfinite(state.big_peak) else loss
        state = state._replace(big_peak=peak)
        since = stats.step - state.big_step
        if loss < RECOVER * state.big_loss or since > RECOVERY_LIMIT:
            state = state._replace(big_step=-1)  # the run took it: how Adagrad or Adam starts
        elif since >= RECOVERY_STEPS and loss >= 0.5 * peak:
            findings.append(_big_update_finding(
                stats, state.big_change, math.nan, math.nan,
                f", and {since} steps later the loss ({loss:.4g}) is still {loss / state.big_loss:.3g}x what "
                "it was before it"))
            state = state._replace(big_step=-1)
    if not math.isfinite(weights):
        return state
    previous, consecutive = state.weight_norm, state.weight_step == stats.step - 1
    if consecutive and math.isfinite(previous) and previous > 0:
        change = abs(weights - previous) / previous
        rose = (loss >= 1.5 * state.last_loss) if math.isfinite(loss) and math.isfinite(state.last_loss) else None
        big = change > max_update and (rose or (rose is None and change > 3 * max_update))
        if big and state.big_update:
            findings.append(_big_update_finding(stats, change, previous, weights, ", after a large update the step before"))
            state = state._replace(big_step=-1)
        elif big and state.big_step < 0 and math.isfinite(state.last_loss) and state.last_loss > 0:
            state = state._replace(big_step=stats.step, big_loss=state.last_loss, big_change=change,
                                   big_peak=loss if math.isfinite(loss) else math.nan, big_weights=previous)
        if big and state.settle_step < 0 and len(findings) == before:
            state = state._replace(settle_step=stats.step, settle_change=change, settle_weights=weights)
    else:
        big = False
    if len(findings) > before:  # said once: the update is not judged again at chance level
        state = state._replace(settle_step=-1)
    return state._replace(weight_norm=weights, weight_step=stats.step, last_loss=loss, big_update=bool(big))


def _judge_settled(stats: StepStats, state: ExplodingState, findings: list[Finding], loss: float) -> ExplodingState:
    """Rule 5, the loss at chance: ``SETTLE_STEPS`` after a large update the loss rose from, every
    one of the last ``LOSS_WINDOW`` losses is at least ``SETTLED_LOW`` of the chance level and their
    median at most ``RECOVER`` times it. Adam at a mistyped LR with batches of a few samples makes
    one update tens of times the weights, the loss leaps a hundredfold and comes back down, and
    then stays at ``ln C``: its units died or its outputs collapsed, which no rule on the loss
    before the update can tell from Adagrad's first step (the loss before was the init's, at
    chance too). Adagrad's first step at a high LR also leaves the loss near chance for a dozen
    steps, but a run that took it has batches well below chance by then, or, when it is still near
    chance (a CNN under Adagrad at 0.16: 35 steps), weights that have settled: unless the update
    was ``SETTLE_CHANGE`` times the weights or more, the rule also asks that they grew
    ``SETTLE_GROWTH`` times since."""
    if state.settle_step < 0 or not math.isfinite(loss) or stats.step - state.settle_step < SETTLE_STEPS:
        return state
    chance = stats.chance_loss
    window = state.losses
    level = median_of_few(window) if window else math.nan
    moving = (not (state.settle_change < SETTLE_CHANGE) or not math.isfinite(state.settle_weights)
              or state.weight_norm >= SETTLE_GROWTH * state.settle_weights)
    if (moving and chance is not None and chance > 0 and len(window) == LOSS_WINDOW
            and min(window) >= SETTLED_LOW * chance and level <= RECOVER * chance):
        findings.append(_big_update_finding(
            stats, state.settle_change, math.nan, math.nan,
            f", and {stats.step - state.settle_step} steps later the loss ({level:.4g}) sits at what a "
            f"model that knows nothing scores ({chance:.3g}) on every batch: the units died or the outputs "
            "collapsed"))
    return state._replace(settle_step=-1)


def _big_update_finding(stats: StepStats, change: float, previous: float, weights: float, why: str) -> Finding:
    norms = f" ({previous:.3g} -> {weights:.3g})" if math.isfinite(previous) else ""
    return _finding(
        "warning", stats, (),
        message=(
            f"One update changed the weights' norm by {change:.0%}{norms} and the loss rose{why}: "
            "the learning rate is far too high for this model."
        ),
        evidence={"rule": "update_ratio", "weight_norm": weights, "previous_weight_norm": previous,
                  "change": change, "clip_threshold": math.inf, "remedy": "lr",
                  # what brings the update back to ~1% of the weights (a healthy step)
                  "lr_factor_hint": SANE_UPDATE / change},
    )


def _update_ratio_rule(stats: StepStats, findings: list[Finding], max_update: float, clip_level: float) -> None:
    weight = np.array([r == "weight" for r in stats.layout.roles])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = stats.update_norm / stats.param_norm
    ratio_u = np.where(weight & stats.has_grad & np.isfinite(ratio), ratio, 0.0)
    big = [stats.layout.layers[i] for i in np.flatnonzero(ratio_u > max_update)]
    if big:
        findings.append(_finding(
            "warning", stats, tuple(dict.fromkeys(big)),
            message=(
                f"Updates larger than {max_update:g}x the weights in {', '.join(dict.fromkeys(big))}: the "
                "learning rate is too high for them."
            ),
            evidence={"rule": "update_ratio", "max_update_ratio": float(np.nanmax(ratio_u)),
                      "clip_threshold": clip_level, "remedy": "lr"},
        ))


# -- shared ------------------------------------------------------------------------------------------


def _finding(severity: str, stats: StepStats, layers: tuple[str, ...], message: str, evidence: dict) -> Finding:
    """An ``exploding`` finding on this step."""
    return Finding(kind="exploding", severity=severity, step=stats.step, layers=layers, message=message,
                   evidence=evidence)


def _sustained_growth(history: np.ndarray, window: int, log_factor: float) -> int:
    """The span (in steps) over which the log norms in ``history`` (oldest first) show sustained
    growth, or 0: ``factor`` over the last ``window`` steps (judged from the fourth step on), or
    ``factor ** 1.25`` over ``2 * window`` steps (a slower divergence, e.g. 1.4x per step), each
    measured from the median of its first three steps to the smaller of the two newest, with most
    step-to-step changes up and the newest value the largest (the two newest, once ``window`` steps
    are in ``history``)."""
    for span, needed in ((window, log_factor), (2 * window, 1.25 * log_factor)):
        part = history[-span:]
        if len(part) < 4 or (span > window and len(part) < span):
            continue
        # The rise first (plain floats): on a healthy step it fails, and nothing else is computed.
        rise = min(float(part[-1]), float(part[-2])) - _start_level(part)
        if not rise > needed:
            continue
        ups = np.count_nonzero(np.diff(part) > 0) / (len(part) - 1)
        # Still rising: once the run has a window of history, the two newest are the largest of
        # the span. Batches of a sample or two the model already fits give norms spread over
        # orders of magnitude, so that the median of any three is far below a norm an unfitted
        # sample gave a few steps before; a divergence has left its earlier norms behind. In the
        # first steps nothing is fitted yet, and a norm up a millionfold from step 0 that dips on
        # the way is still a divergence.
        left_behind = len(part) < window or part[-2] >= part[:-2].max()
        if ups >= 0.6 and part[-1] >= part.max() and left_behind:
            return len(part)
    return 0


def _start_level(part: np.ndarray) -> float:
    """Where a span of log norms starts: the median of its first (up to) three values, leaving out
    the two newest that are being judged."""
    return median_of_few(part[: max(1, min(3, len(part) - 2))].tolist())


def _exploding_layers(
    stats: StepStats, tensor_log: np.ndarray, tensor_log_mean: np.ndarray, min_ratio: float
) -> tuple[str, ...]:
    """Layers whose own norm jumped most against their own EMA, largest jump first."""
    with np.errstate(invalid="ignore"):
        jump = tensor_log - tensor_log_mean
    jump = np.where(np.isfinite(jump), jump, -np.inf)
    order = np.argsort(-jump)
    picked = [stats.layout.layers[i] for i in order if jump[i] > math.log(max(min_ratio, 1.0))]
    if not picked:
        share = np.where(stats.has_grad, np.nan_to_num(stats.grad_norm) ** 2, 0.0)
        picked = [stats.layout.layers[i] for i in np.argsort(-share)[:3] if share[i] > 0]
    return tuple(dict.fromkeys(picked))
