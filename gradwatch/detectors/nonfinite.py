"""``nonfinite``: a NaN or Inf in any gradient.

Non-finite values flow backwards from where they are produced: every layer between the loss and
the producing layer is finite, every layer before it is not. So the deepest non-finite layer (in
forward order) is where it started, and the finite layers after it are named too.

Checked before any clipping: clipping by a non-finite global norm turns every gradient into NaN
(docs/design.md, "Where to measure", point 3).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradwatch.detectors.base import Detector
from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats


class NonfiniteState(NamedTuple):
    steps: int
    """Measured steps with non-finite gradients so far."""


def _name_list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def nonfinite() -> Detector:
    """Report any NaN or Inf gradient, naming where it started.

    Severity ``error``. Evidence: ``nonfinite_layers`` and ``finite_layers`` (forward order),
    ``origin`` (the deepest non-finite layer), ``loss_finite``, ``params_nonfinite`` (layers whose
    parameters are already non-finite, which only a rollback can repair).

    Returns:
        The detector.

    Example:
        >>> from gradwatch.testing import nan_at
        >>> det = nonfinite()
        >>> stream = list(nan_at(step=3, steps=5))
        >>> state = det.init(stream[0].layout)
        >>> kinds = []
        >>> for s in stream:
        ...     found, state = det.update(s, state)
        ...     kinds += [(f.kind, f.step) for f in found]
        >>> kinds
        [('nonfinite', 3)]
    """

    def init(layout: Layout) -> NonfiniteState:
        return NonfiniteState(steps=0)

    def update(stats: StepStats, state: NonfiniteState) -> tuple[list[Finding], NonfiniteState]:
        layers = stats.layout.layers
        bad_tensor = stats.has_grad & ((stats.nonfinite > 0) | ~np.isfinite(stats.grad_norm))
        loss_bad = stats.loss is not None and not np.isfinite(stats.loss)
        if not bad_tensor.any() and not loss_bad:
            return [], state
        params_nonfinite = list(dict.fromkeys(
            layers[i] for i in np.flatnonzero(stats.params_nonfinite)
        ))
        if not bad_tensor.any():
            finding = Finding(
                kind="nonfinite",
                severity="error",
                step=stats.step,
                layers=(),
                message=f"The loss is {stats.loss} while every gradient is finite: check the loss "
                "function and the labels of this batch.",
                evidence={"loss": stats.loss, "loss_finite": False, "nonfinite_layers": [],
                          "params_nonfinite": params_nonfinite},
            )
            return [finding], NonfiniteState(steps=state.steps + 1)
            return [], state
        order = list(dict.fromkeys(layers))
        bad_layers = set(layers[i] for i in np.flatnonzero(bad_tensor))
        nonfinite_layers = [name for name in order if name in bad_layers]
        graded = set(layers[i] for i in np.flatnonzero(stats.has_grad))
        finite_layers = [name for name in order if name not in bad_layers and name in graded]
        origin = nonfinite_layers[-1]
        after = [name for name in finite_layers if order.index(name) > order.index(origin)]
        count = int(stats.nonfinite[bad_tensor].sum())
        if after:
            where = f"it starts at {origin!r}: the layers after it ({_name_list(after)}) are finite"
        else:
            where = ("every layer is non-finite, the output layer included, so it does not come from one "
                     "layer: look at this step's input batch, its labels and the loss")
        if stats.loss is None:
            loss_note = ""
        elif np.isfinite(stats.loss):
            loss_note = (" The loss is finite: look for sqrt/log/division at zero, or the norm of an "
                         "all-zero vector, in the forward pass of that layer.")
        else:
            loss_note = " The loss itself is non-finite."
        message = (
            f"NaN/Inf gradients in {len(nonfinite_layers)} of {len(graded)} layers; {where}.{loss_note}"
        )
        if params_nonfinite:
            message += f" Parameters of {_name_list(params_nonfinite)} are already non-finite."
        finding = Finding(
            kind="nonfinite",
            severity="error",
            step=stats.step,
            layers=tuple(nonfinite_layers),
            message=message,
            evidence={
                "nonfinite_layers": nonfinite_layers,
                "finite_layers": finite_layers,
                "origin": origin,
                "nonfinite_values": count,
                "loss": stats.loss,
                "loss_finite": None if stats.loss is None else bool(np.isfinite(stats.loss)),
                "params_nonfinite": params_nonfinite,
            },
        )
        return [finding], NonfiniteState(steps=state.steps + 1)

    return Detector("nonfinite", init, update)

