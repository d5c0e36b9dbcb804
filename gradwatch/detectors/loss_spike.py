"""``loss_spike``: the training loss jumps far above its running statistics.

Judged only when the adapter supplies the loss. A step's loss is a spike when it exceeds the EMA
of the loss by more than ``z_threshold`` standard deviations *and* by ``min_relative`` of the
EMA's magnitude (the second condition keeps a run that has converged, whose variance is tiny,
from flagging ordinary noise). Spikes are fed to the EMA clipped, so one outlier does not blind
the detector to the next. Non-finite losses are the ``nonfinite`` detector's business.

References:
    Lightning ``fabric/utilities/spike.py`` (SpikeDetection): running-mean spike detection.
    Kumar et al. ZClip. arXiv:2504.02507, 2025 (clipped EMA updates).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from gradwatch.detectors.base import Detector, check_positive, ema
from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats


class LossSpikeState(NamedTuple):
    seen: int
    mean: float
    var: float


def loss_spike(
    *, warmup: int = 20, alpha: float = 0.05, z_threshold: float = 6.0, min_relative: float = 1.0
) -> Detector:
    """Detect loss spikes against the loss's own recent history.

    Args:
        warmup: Steps with a loss before spikes are judged. Defaults to 20.
        alpha: EMA weight of a new step. Defaults to 0.05.
        z_threshold: Standard deviations above the EMA. Defaults to 6.0.
        min_relative: The loss must also exceed the EMA by this share of ``|EMA|`` (1.0: twice
            the mean). Defaults to 1.0.

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
    check_positive("alpha", alpha, below=1.0)
    check_positive("z_threshold", z_threshold)
    if min_relative < 0:
        raise ValueError(f"min_relative must be >= 0. Received min_relative={min_relative!r}.")

    def init(layout: Layout) -> LossSpikeState:
        return LossSpikeState(0, 0.0, 0.0)

    def update(stats: StepStats, state: LossSpikeState) -> tuple[list[Finding], LossSpikeState]:
        loss = stats.loss
        if loss is None or not math.isfinite(loss):
            return [], state
        std = math.sqrt(max(state.var, 0.0))
        margin = max(z_threshold * std, min_relative * abs(state.mean))
        spike = state.seen >= warmup and loss - state.mean > margin
        findings = []
        if spike:
            findings.append(Finding(
                kind="loss_spike",
                severity="warning",
                step=stats.step,
                layers=(),
                message=(
                    f"Loss {loss:.4g} jumped far above its running mean {state.mean:.4g} "
                    f"(+{(loss - state.mean) / max(std, 1e-12):.1f} std). Look at this step's batch "
                    "(bad labels or outliers) and at the gradient findings around it."
                ),
                evidence={"loss": loss, "ema_loss": state.mean, "ema_std": std},
            ))
        rate = max(alpha, 1.0 / (state.seen + 1))
        observed = min(loss, state.mean + margin) if spike else loss
        if state.seen == 0:
            mean, var = observed, 0.0
        else:
            mean, var = ema(state.mean, state.var, observed, rate)
        return findings, LossSpikeState(state.seen + 1, float(mean), float(var))

    return Detector("loss_spike", init, update)
