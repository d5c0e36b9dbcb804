"""What a probe saw in an unwatched run: plain numbers per step, framework-free.

Filled by the PyTorch probe (:mod:`.torch_harness`) and the Keras probe (:mod:`.keras_harness`);
read by the label checks (:mod:`.checks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GroupTrace:
    """Plain measurements of one model (and its optimizers), one row per optimizer step."""

    names: list[str]
    loss: list[float] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)
    has_grad: list[list[bool]] = field(default_factory=list)
    param_norm: list[list[float]] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def grads(self) -> np.ndarray:
        """(steps, tensors) gradient norms; NaN where a tensor had no gradient."""
        return np.array(self.grad_norm, dtype=float)

    def present(self) -> np.ndarray:
        """(steps, tensors): the tensor had a gradient (not None) at that step."""
        return np.array(self.has_grad, dtype=bool)

    def params(self) -> np.ndarray:
        return np.array(self.param_norm, dtype=float)

    def column(self, name: str) -> int:
        """Index of tensor ``name``; a Keras path matches by its end (``h0/kernel`` matches
        ``sequential_3/h0/kernel``).

        Raises:
            ValueError: when no tensor has that name.
        """
        for i, n in enumerate(self.names):
            if n == name or n.endswith("/" + name):
                return i
        raise ValueError(f"No tensor named {name!r}; the trace has {self.names}.")


@dataclass
class Trace:
    """What the probe saw in the unwatched run."""

    groups: list[GroupTrace]
    dead: dict[str, list[float]] = field(default_factory=dict)
    """Per probed module, per step: share of its units exactly zero on the whole batch."""
    eval_before: float = math.nan
    eval_after: float = math.nan

    @property
    def main(self) -> GroupTrace:
        return self.groups[0]
