"""What a :class:`~gradwatch.Monitor` remembers of recent steps, for reports and plots.

Rings of the last ``size`` measured steps (the step number, the global norm, the loss, the LR
factor in force, and each tensor's gradient norm), plus the latest parameter norms, share of
exactly-zero units and per-layer count of non-finite steps. Memory is O(size x tensors), never
O(steps). Each field is declared once (:data:`STEP_FIELDS`); recording, ordering, saving and
loading all read that table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.stats import Layout, StepStats

__all__ = ["STEP_FIELDS", "History"]

STEP_FIELDS: dict[str, tuple[type, float]] = {
    "steps": (np.int64, -1),
    "global_norm": (np.float64, np.nan),
    "loss": (np.float64, np.nan),
    "lr_factor": (np.float64, np.nan),
}
"""One number per measured step: name -> (dtype, the value of an empty slot)."""


class History:
    """The recent steps of one run.

    Args:
        size: Steps kept.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.index = 0
        self.rings: dict[str, np.ndarray] = {name: np.full(size, empty, dtype=dtype) for name, (dtype, empty) in STEP_FIELDS.items()}
        # Per tensor and step: the gradient norm, NaN without a gradient, +inf when non-finite.
        # Aggregated per layer only when a report is asked for: the step path stays cheap.
        self.tensors = np.zeros((size, 0))
        self.last_param = np.zeros(0)
        self.last_zero = np.zeros(0)
        self.layer_nonfinite_steps = np.zeros(0, dtype=np.int64)

    def set_layout(self, layout: Layout) -> None:
        """New parameters: the per-tensor and per-layer parts start over (the rings of step
        numbers go on)."""
        n = len(layout)
        self.tensors = np.full((self.size, n), np.nan)
        self.last_param = np.full(n, np.nan)
        self.last_zero = np.full(n, np.nan)
        self.layer_nonfinite_steps = np.zeros(len(layout.layer_names()), dtype=np.int64)

    def record(self, stats: StepStats, lr_factor: float) -> None:
        """Keep one measured step."""
        i = self.index
        rings = self.rings
        rings["steps"][i] = stats.step
        rings["global_norm"][i] = stats.global_norm
        rings["loss"][i] = np.nan if stats.loss is None else stats.loss
        rings["lr_factor"][i] = lr_factor
        bad = stats.nonfinite > 0
        self.tensors[i] = np.where(stats.has_grad, np.where(bad, np.inf, stats.grad_norm), np.nan)
        if stats.params_measured:
            self.last_param = stats.param_norm
        self.last_zero = np.where(stats.has_grad, stats.zero_fraction, np.nan)
        if not stats.finite:  # rare: count the layers that were non-finite on this step
            layout = stats.layout
            layer_bad = np.bincount(layout.layer_ids, weights=bad.astype(float), minlength=len(self.layer_nonfinite_steps))
            self.layer_nonfinite_steps += (layer_bad > 0) | ~np.isfinite(layer_bad)
        self.index = (i + 1) % self.size

    def kept(self) -> np.ndarray:
        """The ring positions holding a step, oldest first."""
        steps = self.rings["steps"]
        order = np.argsort(np.where(steps >= 0, steps, np.iinfo(np.int64).max))
        return order[steps[order] >= 0]

    def step_fields(self, keep: np.ndarray) -> dict[str, list]:
        """Every per-step field at the kept positions, as lists."""
        return {name: ring[keep].tolist() for name, ring in self.rings.items()}

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values; :meth:`load_state_dict` restores them exactly."""
        return {
            **{name: ring.tolist() for name, ring in self.rings.items()},
            "tensors": self.tensors.tolist(),
            "index": self.index,
            "last_param": self.last_param.tolist(),
            "last_zero": self.last_zero.tolist(),
            "layer_nonfinite_steps": self.layer_nonfinite_steps.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any], tensors: int | None) -> None:
        """Restore :meth:`state_dict` output.

        Args:
            state: What :meth:`state_dict` returned.
            tensors: The number of tensors of the restored layout (None: no layout yet).
        """
        self.rings = {name: np.array(state[name], dtype=dtype) for name, (dtype, _) in STEP_FIELDS.items()}
        if tensors is not None:
            self.tensors = np.array(state["tensors"], dtype=float).reshape(self.size, tensors)
            self.last_param = np.array(state["last_param"], dtype=float)
            self.last_zero = np.array(state["last_zero"], dtype=float)
        self.index = state["index"]
        self.layer_nonfinite_steps = np.array(state["layer_nonfinite_steps"], dtype=np.int64)
