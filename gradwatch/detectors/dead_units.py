"""``dead_units``: a large share of a layer's units get exactly-zero gradient, step after step.

A unit (an output row of a dense kernel, an output channel of a convolution) whose gradient is
exactly zero on a whole batch received no signal: a ReLU that is never active (a "dead" ReLU), a
saturated hard activation, a masked path. One such batch means little; the same layer showing at
least ``threshold`` of its units dead on every one of the last ``window`` measured steps does.

Left out on purpose: embedding tables (rows not looked up get zero gradient by design), tensors
with no gradient at all (frozen or unused: None in PyTorch, missing in Keras), and normalisation
parameters. Adapters report the per-step zero fraction in ``StepStats.zero_fraction``; NaN means not
measured.

References:
    Lu, Shin, Su, Karniadakis. Dying ReLU and initialization: theory and numerical examples. 2019.
    Douglas, Yu. Why RELU units sometimes die. arXiv:1812.05981, 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradwatch.detectors.base import Detector, check_positive, push
from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats

JUDGED_ROLES = ("weight", "bias")


class DeadUnitsState(NamedTuple):
    layers: tuple
    fractions: np.ndarray
    """Ring buffer (window x layers) of the layer's dead fraction; NaN where not measured."""
    cursor: int
    filled: int


def dead_units(*, threshold: float = 0.5, window: int = 10, error_threshold: float = 0.95) -> Detector:
    """Detect layers whose units have stopped receiving gradient.

    Args:
        threshold: Share of a layer's units that must be dead on every step of the window.
            Defaults to 0.5.
        window: Consecutive measured steps. Defaults to 10.
        error_threshold: At or above this share the finding is an ``error`` (the layer passes
            almost nothing). Defaults to 0.95.

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
        layers = tuple(names[i] for i in layout.layers_with(JUDGED_ROLES))
        return DeadUnitsState(layers, np.full((window, len(layers)), np.nan), 0, 0)

    def update(stats: StepStats, state: DeadUnitsState) -> tuple[list[Finding], DeadUnitsState]:
        if not state.layers:
            return [], state
        layout = stats.layout
        judged = stats.has_grad & layout.role_mask(JUDGED_ROLES) & np.isfinite(stats.zero_fraction)
        values = np.where(judged, stats.zero_fraction, -1.0)
        per_layer = np.where(layout.membership, values[None, :], -1.0).max(1)
        row = per_layer[layout.layers_with(JUDGED_ROLES)]
        row = np.where(row < 0, np.nan, row)
        fractions, cursor = push(state.fractions, state.cursor, row)
        filled = min(state.filled + 1, window)
        new_state = DeadUnitsState(state.layers, fractions, cursor, filled)
        if filled < window:
            return [], new_state
        history = fractions  # full ring: its minimum does not depend on the order
        lowest = history.min(0)  # NaN where any step of the window was not measured
        hit = lowest >= threshold
        if not hit.any():
            return [], new_state
        idx = np.flatnonzero(hit)
        layers = tuple(state.layers[i] for i in idx)
        worst = float(lowest[idx].max())
        detail = ", ".join(f"{state.layers[i]} {lowest[i]:.0%}" for i in idx[:4])
        finding = Finding(
            kind="dead_units",
            severity="error" if worst >= error_threshold else "warning",
            step=stats.step,
            layers=layers,
            message=(
                f"Dead units: exactly-zero gradient for {window} steps in a row in {detail}"
                f"{' ...' if len(idx) > 4 else ''}. Dying ReLUs? Lower the learning rate, use "
                "LeakyReLU/GELU, or initialise biases >= 0 with He initialisation."
            ),
            evidence={
                "dead_fraction": {state.layers[i]: float(lowest[i]) for i in idx},
                "threshold": threshold,
                "window": window,
            },
        )
        return [finding], new_state

    return Detector("dead_units", init, update)
