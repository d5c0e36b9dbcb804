"""``exploding``: the global gradient norm leaves the run's own recent range.

Three rules, each judged against the run's own history rather than a fixed number:

1. **Spike** (severity ``warning``): the log of the global norm is more than ``z_threshold``
   standard deviations *and* ``min_ratio`` times above its exponential moving average. The EMA is
   updated with the clipped value on a spike, as in ZClip, so a lasting change of regime is
   absorbed slowly instead of being flagged forever. Judged only after ``warmup`` finite steps.
2. **Sustained growth** (severity ``error``): over the last ``window`` steps the norm rose by more
   than ``growth_factor`` (or by ``growth_factor ** 1.25`` over ``2 * window`` steps: a slower
   divergence), most step-to-step changes were increases, and the newest value is the largest. Needs no warm-up, so a run that diverges from step 0 is caught too: judged from the
   third finite step on, over the steps seen so far, so that a run which grows ``growth_factor``
   in fewer than ``window`` steps and then turns non-finite is still called an explosion.
3. **Update-to-weight ratio** (severity ``warning``): when the adapter measures the update, any
   weight tensor whose update is larger than ``max_update_ratio`` times its norm.

Learning-rate warm-up moves the norm by small factors over many steps; it passes rule 1 because
the EMA follows it, and rule 2 because it grows by far less than ``growth_factor`` per window.

Each finding carries ``clip_threshold`` in its evidence: ``exp(mean + clip_z * std)`` of the log
norm over healthy steps, the level the policy clips to.

References:
    Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural networks. ICML 2013.
    Kumar et al. ZClip: Adaptive spike mitigation for LLM pre-training. arXiv:2504.02507, 2025.
    Seetharaman et al. AutoClip: Adaptive gradient clipping for source separation networks. 2020.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from gradwatch.detectors.base import Detector, check_positive, ema, ordered, push
from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats


class ExplodingState(NamedTuple):
    seen: int
    """Finite steps seen."""
    log_mean: float
    log_var: float
    recent: np.ndarray
    """Ring buffer of the last ``window`` log global norms."""
    cursor: int
    tensor_log_mean: np.ndarray
    """Per-tensor EMA of the log grad norm (to name the layers that explode)."""


def exploding(
    *,
    warmup: int = 20,
    alpha: float = 0.05,
    z_threshold: float = 6.0,
    min_ratio: float = 4.0,
    window: int = 10,
    growth_factor: float = 100.0,
    max_update_ratio: float = 1.0,
    clip_z: float = 2.0,
) -> Detector:
    """Detect gradient explosions against the run's own norm history.

    Args:
        warmup: Finite steps to observe before spikes are judged. Defaults to 20.
        alpha: EMA weight of a new step. Defaults to 0.05 (about 20 steps of memory).
        z_threshold: Standard deviations (of the log norm) above the EMA for a spike. Defaults to 6.0.
        min_ratio: A spike must also be this many times the EMA norm. Defaults to 4.0.
        window: Steps over which sustained growth is judged. Defaults to 10.
        growth_factor: Growth over ``window`` steps that counts as an explosion. Defaults to 100.0.
        max_update_ratio: Largest update-to-weight ratio tolerated, when measured. Defaults to 1.0.
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
    check_positive("z_threshold", z_threshold)
    check_positive("growth_factor", growth_factor)
    check_positive("max_update_ratio", max_update_ratio)
    if min_ratio < 1.0:
        raise ValueError(f"min_ratio must be >= 1.0. Received min_ratio={min_ratio!r}.")
    if warmup < 2 or window < 3:
        raise ValueError(f"exploding needs warmup >= 2 and window >= 3. Received warmup={warmup}, window={window}.")

    def init(layout: Layout) -> ExplodingState:
        return ExplodingState(
            seen=0,
            log_mean=0.0,
            log_var=0.0,
            recent=np.zeros(2 * window),
            cursor=0,
            tensor_log_mean=np.full(len(layout), np.nan),
        )

    def update(stats: StepStats, state: ExplodingState) -> tuple[list[Finding], ExplodingState]:
        norm = stats.global_norm
        if not stats.finite or not math.isfinite(norm) or norm <= 0.0:
            return [], state
        log_norm = math.log(norm)
        findings: list[Finding] = []
        std = math.sqrt(max(state.log_var, 0.0))
        warm = state.seen >= warmup
        threshold = max(z_threshold * std, math.log(min_ratio))
        spike = warm and log_norm - state.log_mean > threshold
        clip_level = math.exp(state.log_mean + clip_z * std) if state.seen else norm

        measured = stats.has_grad & (stats.grad_norm > 0)
        tensor_log = np.where(measured, np.log(np.where(measured, stats.grad_norm, 1.0)), np.nan)
        recent, cursor = push(state.recent, state.cursor, log_norm)
        filled = min(state.seen + 1, 2 * window)
        history = ordered(recent, cursor, filled)

        if spike:
            ratio = norm / math.exp(state.log_mean)
            layers = _exploding_layers(stats, tensor_log, state.tensor_log_mean, min_ratio)
            findings.append(Finding(
                kind="exploding",
                severity="warning",
                step=stats.step,
                layers=layers,
                message=(
                    f"Global gradient norm {norm:.3g} is {ratio:.0f}x its recent level "
                    f"({math.exp(state.log_mean):.3g}, z={(log_norm - state.log_mean) / max(std, 1e-12):.1f} "
                    f"in log space); largest jumps in {', '.join(layers[:3]) or 'all layers'}. "
                    f"Clip the global norm at ~{clip_level:.3g}."
                ),
                evidence={
                    "rule": "spike",
                    "global_norm": norm,
                    "ema_norm": math.exp(state.log_mean),
                    "ratio": ratio,
                    "z": (log_norm - state.log_mean) / max(std, 1e-12),
                    "clip_threshold": clip_level,
                },
            ))
        growth_span = _sustained_growth(history, window, math.log(growth_factor))
        if growth_span:
            span = history[-growth_span:]
            layers = _exploding_layers(stats, tensor_log, state.tensor_log_mean, 1.0)
            growth = math.exp(span[-1] - span.min())
            findings.append(Finding(
                kind="exploding",
                severity="error",
                step=stats.step,
                layers=layers,
                message=(
                    f"Global gradient norm grew {growth:.0f}x over the last {growth_span} steps and is "
                    f"still rising (now {norm:.3g}): the run is diverging. Lower the learning "
                    "rate or clip the gradient norm."
                ),
                evidence={
                    "rule": "growth",
                    "global_norm": norm,
                    "growth": growth,
                    "window": growth_span,
                    "clip_threshold": min(clip_level, math.exp(span.min()) * min_ratio)
                    if warm else math.exp(span.min()) * min_ratio,
                },
            ))
        if stats.layout.roles and np.isfinite(stats.update_norm).any():
            ratio_u = _update_ratios(stats)
            big = [stats.layout.layers[i] for i in np.flatnonzero(ratio_u > max_update_ratio)]
            if big:
                findings.append(Finding(
                    kind="exploding",
                    severity="warning",
                    step=stats.step,
                    layers=tuple(dict.fromkeys(big)),
                    message=(
                        f"Updates larger than {max_update_ratio:g}x the weights in "
                        f"{', '.join(dict.fromkeys(big))}: the learning rate is too high for them."
                    ),
                    evidence={"rule": "update_ratio", "max_update_ratio": float(np.nanmax(ratio_u)),
                              "clip_threshold": clip_level},
                ))

        # EMA update; on a spike feed the clipped value (ZClip) so a new regime is absorbed slowly.
        rate = max(alpha, 1.0 / (state.seen + 1))
        observed = min(log_norm, state.log_mean + threshold) if spike else log_norm
        log_mean, log_var = ema(state.log_mean, state.log_var, observed, rate) if state.seen else (observed, 0.0)
        tensor_mean = np.where(
            np.isnan(state.tensor_log_mean), tensor_log,
            np.where(np.isnan(tensor_log), state.tensor_log_mean,
                     state.tensor_log_mean + rate * (np.minimum(tensor_log, state.tensor_log_mean + threshold)
                                                     - state.tensor_log_mean)),
        )
        return findings, ExplodingState(
            seen=state.seen + 1,
            log_mean=float(log_mean),
            log_var=float(log_var),
            recent=recent,
            cursor=cursor,
            tensor_log_mean=tensor_mean,
        )

    return Detector("exploding", init, update)


def _sustained_growth(history: np.ndarray, window: int, log_factor: float) -> int:
    """The span (in steps) over which the log norms in ``history`` (oldest first) show sustained
    growth, or 0: ``factor`` over the last ``window`` steps (judged from the third step on), or
    ``factor ** 1.25`` over ``2 * window`` steps (a slower divergence, e.g. 1.4x per step), each
    with most step-to-step changes up and the newest value the largest."""
    for span, needed in ((window, log_factor), (2 * window, 1.25 * log_factor)):
        part = history[-span:]
        if len(part) < 3 or (span > window and len(part) < span):
            continue
        rise = part[-1] - part.min()
        ups = np.count_nonzero(np.diff(part) > 0) / (len(part) - 1)
        if rise > needed and ups >= 0.6 and part[-1] >= part.max():
            return len(part)
    return 0


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


def _update_ratios(stats: StepStats) -> np.ndarray:
    weight = np.array([r == "weight" for r in stats.layout.roles])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = stats.update_norm / stats.param_norm
    return np.where(weight & stats.has_grad & np.isfinite(ratio), ratio, 0.0)
