"""``loss_spike``: one step's loss far outside what the run's recent losses make ordinary.

Judged only when the adapter supplies the loss. A batch's loss is a sample: its spread depends on
the batch size (a batch of one sample swings as far as single samples do), on label smoothing, on
how far training has gone. So the rule is robust and relative to the run's own recent losses, not
to a fixed number, and asks three things of a spike, after ``warmup`` losses:

1. it is far above the recent median: by more than ``z_threshold`` robust standard deviations
   (the median absolute deviation of the last ``window`` losses, scaled) and by more than
   ``min_relative`` of the median itself;
2. it is beyond anything recent: more than ``max_ratio`` times the largest of the last ``window``
   losses. Small batches produce large losses now and then; the largest of the recent ones says how
   large is ordinary for *this* run;
3. it matters on the run's own scale: the jump is at least ``min_share`` of the loss the run
   started from (a converged run at 1e-7 that goes to 1e-5 has not spiked).

Severity follows harm. The loss alone cannot tell a batch that holds one confidently wrong sample
from a broken batch: with batches of a sample or two, a run near its floor scores far above
its recent losses every few dozen steps (a fitted classifier at 0.003 meets a sample it gets
wrong at 5), and a single misfit sample lifts a batch of 64 at 0.001 to 0.06. So a spike is a
``warning`` at once only when it is ``warn_ratio`` times both the largest recent loss and the
largest of the run's first ``warmup`` losses (worse, by that much, than the untrained model did
on any batch: corrupt data, targets on the wrong scale); otherwise it is ``info``. A run that does
not shrug a spike off shows it in the gradients and in a loss that stays up (``exploding``), which
is where the remedies come from. (Two misfit samples in a row at a batch of one, or an LR warm-up
that overshoots for a step, are common in healthy runs.) Spikes are kept out of the window, so one
outlier does not hide the next.
Non-finite losses are the ``nonfinite`` detector's business.

References:
    Lightning ``fabric/utilities/spike.py`` (SpikeDetection): running-mean spike detection.
    Hampel. The influence curve and its role in robust estimation. JASA 1974 (median and MAD).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from gradwatch.detectors.base import Detector, check_positive, median, push
from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats

MAD_TO_STD = 1.4826
"""The median absolute deviation of a normal distribution times this is its standard deviation."""


class LossSpikeState(NamedTuple):
    seen: int
    """Finite losses seen."""
    recent: np.ndarray
    """Ring buffer of the last ``window`` ordinary (non-spike) losses."""
    cursor: int
    start: float
    """The median of the first ``warmup`` losses: the scale the run started from."""
    first_max: float = math.nan
    """The largest of the first ``warmup`` losses."""


def loss_spike(
    *,
    warmup: int = 20,
    window: int = 50,
    z_threshold: float = 6.0,
    min_relative: float = 1.0,
    max_ratio: float = 2.0,
    min_share: float = 0.01,
    warn_ratio: float = 10.0,
) -> Detector:
    """Detect loss spikes against the loss's own recent history.

    Args:
        warmup: Losses seen before spikes are judged. Defaults to 20.
        window: Recent losses the rule compares with. Defaults to 50.
        z_threshold: Robust standard deviations above the recent median. Defaults to 6.0.
        min_relative: The loss must also exceed the median by this share of it (1.0: twice the
            median). Defaults to 1.0.
        max_ratio: ... and be this many times the largest recent loss. Defaults to 2.0.
        min_share: ... and jump by at least this share of the run's starting loss.
            Defaults to 0.01.
        warn_ratio: A spike this many times the largest recent loss and the largest of the run's
            first ``warmup`` losses is a ``warning``; other spikes are ``info``. Defaults to 10.0.

    Returns:
        The detector.

    Raises:
        ValueError: for an out-of-range argument.

    Example:
        >>> from gradwatch.testing import healthy
        >>> det = loss_spike()
        >>> stream = list(healthy(steps=40, loss_spike_at=30))
        >>> state = det.init(stream[0].layout)
        >>> hits = []
        >>> for s in stream:
        ...     found, state = det.update(s, state)
        ...     hits += [s.step for f in found]
        >>> hits
        [30]
    """
    check_positive("z_threshold", z_threshold)
    if min_relative < 0 or min_share < 0 or max_ratio < 1.0:
        raise ValueError(
            "loss_spike needs min_relative >= 0, min_share >= 0 and max_ratio >= 1. Received "
            f"min_relative={min_relative!r}, min_share={min_share!r}, max_ratio={max_ratio!r}."
        )
    if warmup < 3 or window < warmup:
        raise ValueError(f"loss_spike needs 3 <= warmup <= window. Received warmup={warmup}, window={window}.")

    def init(layout: Layout) -> LossSpikeState:
        return LossSpikeState(0, np.full(window, np.nan), 0, math.nan)

    def update(stats: StepStats, state: LossSpikeState) -> tuple[list[Finding], LossSpikeState]:
        loss = stats.loss
        if loss is None or not math.isfinite(loss):
            return [], state
        findings: list[Finding] = []
        spike = False
        if state.seen >= warmup:
            recent = state.recent[np.isfinite(state.recent)]
            center = median(recent)
            spread = MAD_TO_STD * median(np.abs(recent - center))
            largest = float(recent.max())
            jump = loss - center
            spike = (
                jump > z_threshold * spread
                and jump > min_relative * abs(center)
                and loss > max_ratio * largest
                and jump > min_share * abs(state.start)
            )
            evidence = {"loss": loss, "median_loss": center, "max_recent_loss": largest,
                        "robust_std": spread, "start_loss": state.start, "first_max_loss": state.first_max}
            if spike:
                severe = loss >= warn_ratio * largest and loss >= warn_ratio * state.first_max
                findings.append(Finding(
                    kind="loss_spike",
                    severity="warning" if severe else "info",
                    step=stats.step,
                    layers=(),
                    message=(
                        (f"Loss {loss:.4g} is {loss / largest:.3g}x the largest of the last {len(recent)} "
                         f"losses (median {center:.4g})." if largest > 0 else
                         f"Loss {loss:.4g} after {len(recent)} losses of exactly 0.")
                        + (" Look at this step's batch (bad labels or outliers) and at the gradient findings "
                           "around it." if severe else
                           f" Below {warn_ratio:g}x the largest of the run's first losses ({state.first_max:.4g}): "
                           "one sample the model gets wrong lifts a small batch this far; what it does to "
                           "training shows in the gradients.")
                    ),
                    evidence=evidence,
                ))
        if spike:
            return findings, state._replace(seen=state.seen + 1)
        recent_ring, cursor = push(state.recent, state.cursor, loss)
        start, first_max = state.start, state.first_max
        if state.seen < warmup:  # the scale the run starts from: the median of its first losses
            start = median(recent_ring[np.isfinite(recent_ring)])
            first_max = loss if math.isnan(first_max) else max(first_max, loss)
        return findings, LossSpikeState(state.seen + 1, recent_ring, cursor, float(start), float(first_max))

    return Detector("loss_spike", init, update)
