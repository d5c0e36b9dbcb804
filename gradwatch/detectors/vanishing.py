"""``vanishing``: early layers' gradients collapse relative to later layers'.

Per layer, the relative gradient ``r = ||grad W|| / ||W||`` over its weight tensors (biases,
normalisation scales and embeddings are left out: their norms say nothing about depth). The
reference is the largest ``log10 r`` of the later half of the layers, the output layer excluded (a
zero-initialised head has a tiny ``||W||`` and would make every other layer look small): the
best-conditioned later layer. A median would itself be vanished when the collapse spans more than
half the depth (a deep stack at a tiny init with zero biases, Keras's default: the forward signal
shrinks with the backward one, so every kernel's gradient but the last few sits at one floor). A layer in
the first half whose ``r`` is below ``ratio_threshold`` times the reference on at least
``min_fraction`` of the last ``window`` steps is vanishing.

Because the measure is relative across depth, a problem that converges, where every layer's
gradient shrinks together, does not fire; nor does a model with fewer than ``min_layers`` weight
layers (a logistic regression).

References:
    Hochreiter. Untersuchungen zu dynamischen neuronalen Netzen. Diploma thesis, TU Munich, 1991.
    Glorot, Bengio. Understanding the difficulty of training deep feedforward neural networks.
    AISTATS 2010 (per-layer gradient statistics across depth).
    Ioffe, Szegedy. Batch Normalization. ICML 2015 (the remedy recommended).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from gradwatch.detectors.base import Detector, check_positive, push
from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats


class VanishingState(NamedTuple):
    layers: tuple
    """Weight layers judged, forward order."""
    deficits: np.ndarray
    """Ring buffer (window x layers) of log10(r / reference); NaN where not measured."""
    cursor: int
    filled: int


def weight_layers(layout: Layout) -> tuple[str, ...]:
    """Layers that own at least one weight tensor, forward order."""
    names = layout.layer_names()
    return tuple(names[i] for i in layout.layers_with(("weight",)))


def vanishing(
    *,
    ratio_threshold: float = 1e-3,
    window: int = 10,
    min_fraction: float = 0.8,
    min_layers: int = 3,
) -> Detector:
    """Detect gradients that vanish towards the input.

    Args:
        ratio_threshold: How much smaller than the later layers' relative gradient an early
            layer's must be. Defaults to 1e-3.
        window: Steps over which it must persist. Defaults to 10.
        min_fraction: Share of the window's measured steps on which it must hold. Defaults to 0.8.
        min_layers: Fewest weight layers for the rule to apply. Defaults to 3.

    Returns:
        The detector.

    Raises:
        ValueError: for an out-of-range argument.

    Example:
        >>> from gradwatch.testing import vanishing_stream
        >>> det = vanishing()
        >>> stream = list(vanishing_stream(steps=20))
        >>> state = det.init(stream[0].layout)
        >>> hits = []
        >>> for s in stream:
        ...     found, state = det.update(s, state)
        ...     hits += [s.step for f in found]
        >>> hits[0] <= 10
        True
    """
    check_positive("ratio_threshold", ratio_threshold, below=1.0)
    check_positive("min_fraction", min_fraction, below=1.0 + 1e-12)
    if window < 1 or min_layers < 2:
        raise ValueError(f"vanishing needs window >= 1 and min_layers >= 2. Received window={window}, min_layers={min_layers}.")
    log_threshold = math.log10(ratio_threshold)

    def init(layout: Layout) -> VanishingState:
        layers = weight_layers(layout)
        return VanishingState(layers=layers, deficits=np.full((window, len(layers)), np.nan), cursor=0, filled=0)

    def update(stats: StepStats, state: VanishingState) -> tuple[list[Finding], VanishingState]:
        n = len(state.layers)
        if n < min_layers or not stats.finite:
            return [], state
        layout = stats.layout
        single = layout.single_tensor_of(("weight",))
        if single is not None:  # one weight tensor per layer: the layer's norms are the tensor's
            grads = np.where(stats.has_grad[single], stats.grad_norm[single], np.nan)
            params = np.where(stats.has_grad[single], stats.param_norm[single], np.nan)
        else:
            ids = layout.layers_with(("weight",))
            mask = stats.has_grad & layout.role_mask(("weight",))
            grads, params = layout.per_layer_rss(np.stack((stats.grad_norm, stats.param_norm)), mask)[:, ids]
        valid = (params > 0) & np.isfinite(params) & ~np.isnan(grads)
        with np.errstate(divide="ignore"):  # a zero gradient is log10(0) = -inf: it vanished
            log_r = np.where(valid, np.log10(np.where(valid, grads, 1.0) / np.where(valid, params, 1.0)), np.nan)
        half = n // 2
        # The output layer is left out of the reference: a zero-initialised head skews it.
        reference_slice = log_r[half:n - 1] if n - 1 > half else log_r[half:]
        reference_slice = reference_slice[np.isfinite(reference_slice)]
        if reference_slice.size == 0:
            row = np.full(n, np.nan)
        else:
            reference = float(reference_slice.max())
            row = log_r - reference
        deficits, cursor = push(state.deficits, state.cursor, row)
        filled = min(state.filled + 1, window)
        new_state = VanishingState(state.layers, deficits, cursor, filled)
        if filled < window:
            return [], new_state
        history = deficits  # full ring: sums over it do not depend on the order
        with np.errstate(invalid="ignore"):
            below = history < log_threshold
        measured = ~np.isnan(history)
        share = below.sum(0) / np.maximum(measured.sum(0), 1)
        early = np.arange(n) < max(half, 1)
        hit = early & (share >= min_fraction) & (measured.sum(0) >= min_fraction * window)
        if not hit.any():
            return [], new_state
        layers = tuple(state.layers[i] for i in np.flatnonzero(hit))
        latest = row
        worst = float(np.nanmin(np.where(hit, latest, np.nan))) if np.isfinite(latest[hit]).any() else -np.inf
        insert_after = _insert_points(state.layers, hit)
        factor = "0" if not math.isfinite(worst) else f"{10 ** worst:.1e}"
        finding = Finding(
            kind="vanishing",
            severity="warning",
            step=stats.step,
            layers=layers,
            message=(
                f"Gradients vanish towards the input: relative gradients in {', '.join(layers[:4])}"
                f"{' ...' if len(layers) > 4 else ''} are ~{factor} of the later layers' for "
                f"{window} steps. Insert BatchNorm/LayerNorm after {', '.join(insert_after[:4])}"
                f"{' ...' if len(insert_after) > 4 else ''} (before the activation), or use a "
                "non-saturating activation (ReLU/GELU) with He initialisation."
            ),
            evidence={
                "log10_deficit": {state.layers[i]: float(latest[i]) for i in range(n) if math.isfinite(latest[i])},
                "ratio_threshold": ratio_threshold,
                "window": window,
                "insert_after": list(insert_after),
            },
        )
        return [finding], new_state

    return Detector("vanishing", init, update)


def _insert_points(layers: tuple, hit: np.ndarray) -> tuple[str, ...]:
    """Every weight layer from the first to the last vanishing one: normalising only some of a
    saturating stack leaves the others to shrink the signal."""
    idx = np.flatnonzero(hit)
    return tuple(layers[i] for i in range(int(idx[0]), int(idx[-1]) + 1))
