"""``dead_units``: a large share of a layer's units get exactly-zero gradient, step after step.

A unit (an output row of a dense kernel, an output channel of a convolution) whose gradient is
exactly zero on a whole batch received no signal: a ReLU that is never active (a "dead" ReLU), a
saturated hard activation, a masked path. One such batch means little; the same layer showing at
least ``threshold`` of its units dead on every one of the last ``window`` measured steps does.

Left out on purpose: embedding tables (rows not looked up get zero gradient by design), tensors
with no gradient at all (frozen or unused: None in PyTorch, missing in Keras), normalisation
parameters, and the output layer (its rows are outputs: an exactly-zero row is an output the batch
already fits, not a dead unit). A step whose whole gradient is exactly zero is not judged either: a
run that fits its batch to zero loss has converged, it has not died.

Adapters that follow units one by one (PyTorch, Keras) report ``StepStats.dead_fraction``: the share of
units whose gradient was zero on each of the last :data:`~gradwatch.stats.UNIT_STREAK` measured
steps, the same units every time. Where it is known the rule reads it (on the last
``window - UNIT_STREAK + 1`` steps); elsewhere it falls back on the per-step share of zero units
(``StepStats.zero_fraction``) on every step of the window, which cannot tell dead units from
units that are merely off for this batch: with a batch of a sample or two, half of a healthy ReLU
layer is off on any one batch. NaN means not measured.

Severity follows harm: ``error`` when a layer passes almost nothing (``error_threshold``);
``warning`` when most of it is gone (``warn_threshold``), or when the loss is not clearly below
where the run started (or is not known); ``info`` when the run learns regardless (many inactive
ReLUs in a network that trains well are a fact, not a fault; with a batch of one sample, half of a
layer's ReLUs are off on any batch).

References:
    Lu, Shin, Su, Karniadakis. Dying ReLU and initialization: theory and numerical examples. 2019.
    Douglas, Yu. Why RELU units sometimes die. arXiv:1812.05981, 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradwatch.detectors.base import Detector, check_positive, ordered, push
from gradwatch.findings import Finding
from gradwatch.stats import UNIT_STREAK, Layout, StepStats

JUDGED_ROLES = ("weight", "bias")


class DeadUnitsState(NamedTuple):
    layers: tuple
    fractions: np.ndarray
    """Ring buffer (window x layers) of the layer's dead fraction; NaN where not measured."""
    cursor: int
    filled: int
    losses: np.ndarray = np.zeros(0)
    """Ring buffer (window) of the losses of the same steps; NaN where not known."""
    start_loss: float = np.nan
    """Median of the run's first ``window`` losses (NaN until known)."""
    seen: int = 0
    """Measured steps seen."""
    followed: np.ndarray = np.zeros(0, dtype=bool)
    """Per layer, True when the last step's value was a followed-units ``dead_fraction``."""


def dead_units(*, threshold: float = 0.5, window: int = 10, error_threshold: float = 0.95,
               warn_threshold: float = 0.7, min_progress: float = 0.1) -> Detector:
    """Detect layers whose units have stopped receiving gradient.

    Args:
        threshold: Share of a layer's units that must be dead on every step of the window.
            Defaults to 0.5.
        window: Consecutive measured steps. Defaults to 10.
        error_threshold: At or above this share the finding is an ``error`` (the layer passes
            almost nothing). Defaults to 0.95.
        warn_threshold: At or above this share the finding is at least a ``warning``.
            Defaults to 0.7.
        min_progress: Below ``warn_threshold``, a loss (median of the window) at least this share
            below the run's starting loss (median of its first ``window`` losses) makes the
            finding ``info``: the run learns regardless. Defaults to 0.1.

    Returns:
        The detector.

    Raises:
        ValueError: for an out-of-range argument.

    Example:
        >>> from gradwatch.testing import dying_units_stream
        >>> det = dead_units()
        >>> stream = list(dying_units_stream(onset=5, steps=30))
        >>> state = det.init(stream[0].layout)
        >>> steps = []
        >>> for s in stream:
        ...     found, state = det.update(s, state)
        ...     steps += [s.step for f in found]
        >>> steps[0]
        14
    """
    check_positive("threshold", threshold, below=1.0 + 1e-12)
    check_positive("error_threshold", error_threshold, below=1.0 + 1e-12)
    if window < 1:
        raise ValueError(f"dead_units needs window >= 1. Received window={window}.")

    def init(layout: Layout) -> DeadUnitsState:
        names = layout.layer_names()
        judged = layout.layers_with(JUDGED_ROLES)
        output = layout.layers_with(("weight",))[-1:] if len(layout.layers_with(("weight",))) > 1 else ()
        layers = tuple(names[i] for i in judged if i not in set(np.asarray(output).tolist()))
        return DeadUnitsState(layers, np.full((window, len(layers)), np.nan), 0, 0, np.full(window, np.nan),
                              followed=np.zeros(len(layers), dtype=bool))

    def update(stats: StepStats, state: DeadUnitsState) -> tuple[list[Finding], DeadUnitsState]:
        if not state.layers:
            return [], state
        followed = state.followed
        if stats.finite and stats.global_norm == 0.0:
            row = np.full(len(state.layers), np.nan)  # converged on this batch: nothing to judge
        else:
            row, dead = _per_layer(stats, state.layers)
            followed = np.isfinite(dead)
            row = np.where(followed, dead, row)
        fractions, cursor = push(state.fractions, state.cursor, row)
        loss = stats.loss if stats.loss is not None else np.nan
        losses, _ = push(state.losses, state.cursor, loss)
        filled = min(state.filled + 1, window)
        start = state.start_loss
        if np.isnan(start) and state.filled + 1 >= window and np.isfinite(losses).all():
            start = float(np.median(losses))
        new_state = DeadUnitsState(state.layers, fractions, cursor, filled, losses, start, state.seen + 1, followed)
        # Followed units carry their own streak of UNIT_STREAK steps: judged on the window's
        # remainder; the others on every step of the window.
        history = ordered(fractions, cursor, filled)
        short = max(1, window - UNIT_STREAK + 1)
        unmeasured = np.full(len(state.layers), np.nan)
        lowest = np.where(followed, history[-short:].min(0) if filled >= short else unmeasured,
                          history.min(0) if filled >= window else unmeasured)
        lowest = np.where(np.isnan(lowest), -1.0, lowest)  # NaN where a step of the span was not measured
        hit = lowest >= threshold
        if not hit.any():
            return [], new_state
        idx = np.flatnonzero(hit)
        layers = tuple(state.layers[i] for i in idx)
        worst = float(lowest[idx].max())
        progress = _progress(losses, start)
        if worst < warn_threshold and (state.seen + 1 < 3 * window or not np.isfinite(start)):
            return [], new_state  # harm not judged yet: give the run three windows to show progress
        if worst >= error_threshold:
            severity = "error"
        elif worst < warn_threshold and progress >= min_progress:
            severity = "info"  # the run learns regardless: a fact about the model, not a fault
        else:
            severity = "warning"
        detail = ", ".join(f"{state.layers[i]} {lowest[i]:.0%}" for i in idx[:4])
        finding = Finding(
            kind="dead_units",
            severity=severity,
            step=stats.step,
            layers=layers,
            message=(
                f"Dead units: exactly-zero gradient for {window} steps in a row in {detail}"
                f"{' ...' if len(idx) > 4 else ''}"
                + (" (the run learns regardless)." if severity == "info" else
                   ". Dying ReLUs? Lower the learning rate, use LeakyReLU/GELU, or initialise biases >= 0 "
                   "with He initialisation.")
            ),
            evidence={
                "dead_fraction": {state.layers[i]: float(lowest[i]) for i in idx},
                "threshold": threshold,
                "window": window,
                "loss_progress": progress,
            },
        )
        return [finding], new_state

    return Detector("dead_units", init, update)


def _judged_tensors(layout: Layout, layers: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The tensors of ``JUDGED_ROLES`` of each of ``layers``, grouped by layer in that order, and
    where each layer's group starts (cached on the layout: one lookup per step, whatever the
    number of layers)."""
    key = ("dead_units", layers)
    cached = layout._cache.get(key)
    if cached is None:
        position = {name: i for i, name in enumerate(layout.layer_names())}
        judged = layout.role_mask(JUDGED_ROLES)
        groups = [np.flatnonzero(judged & (layout.layer_ids == position[name])) for name in layers]
        starts = np.cumsum([0] + [len(g) for g in groups[:-1]], dtype=np.intp)
        cached = layout._cache[key] = (np.concatenate(groups).astype(np.intp), starts)
    return cached


def _per_layer(stats: StepStats, layers: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per layer of ``layers``, the largest per-step share of zero units and the largest share of
    dead (followed) units over its judged tensors that have a gradient; NaN where none is measured."""
    tensors, starts = _judged_tensors(stats.layout, layers)
    values = np.stack((stats.zero_fraction[tensors], stats.dead_fraction[tensors]))
    values = np.where(stats.has_grad[tensors] & np.isfinite(values), values, -1.0)
    per_layer = np.maximum.reduceat(values, starts, axis=1)
    per_layer = np.where(per_layer < 0, np.nan, per_layer)
    return per_layer[0], per_layer[1]


def _progress(losses: np.ndarray, start: float) -> float:
    """How far below the run's starting loss the window's median loss is, as a share of the
    start; 0 when either is not known (no progress can be claimed)."""
    if not np.isfinite(start) or start == 0 or not np.isfinite(losses).all():
        return 0.0
    return (start - float(np.median(losses))) / abs(start)
