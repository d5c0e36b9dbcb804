"""The loss of a model whose outputs are all zero, for a mean squared error: the mean squared
target, pooled over the run's first batches (``StepStats.null_loss``).

A regression loss has no chance level, but its targets give it a scale: a model at a standard
init outputs values near zero and scores about the mean squared target, and one whose weights
are far too large scores many times that from step 0. The targets are read from the loss's
autograd node (``MseLossBackward0`` saves them) while the graph is alive, i.e. when the loss is
recorded before ``backward()`` (Lightning, the Hugging Face Trainer). After ``backward()`` the
saved tensors are freed, so :class:`NullLevel` also keeps the model's output of the step and the
gradient that reaches it: for ``mse_loss(output, target)`` with the mean reduction that gradient
is ``2 (output - target) / n``, so ``target = output - n / 2 * gradient``. Every step checks that
the recovered error gives back the recorded loss (a loss on a transformed output, a scaled or
summed loss, a broadcast between shapes all fail that check, and then no level is published).

The work is done on the device, a few element-wise operations on the first steps only; the one
host read happens once, when the level is published.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwatch.detectors.exploding import NULL_ROWS, NULL_STEPS

NULL_TOLERANCE = 0.05
"""Largest relative difference between the recorded loss and the loss of the recovered error
(bfloat16 outputs and gradients are good to about 1 %)."""
_MEAN = 1  # torch's Reduction::Mean


class NullLevel:
    """Learns the mean squared target of the first batches of a mean-squared-error run.

    Call :meth:`see_output` with the model's output of each forward pass (while
    :attr:`learning`), :meth:`see_loss` with each recorded loss tensor and :meth:`end_step` after
    each optimizer step; :attr:`value` is the level once published (None: unknown, or not a mean
    squared error). The level is published with the loss of the step that brings the rows to
    ``NULL_ROWS`` or of step ``NULL_STEPS``, whichever comes first; a run whose losses are never
    tensors (``record_loss(loss.item())``) stops learning after ``NULL_STEPS`` steps.
    """

    def __init__(self) -> None:
        self.value: float | None = None
        self.learning = True
        self._output: list[Any] | None = None
        self._sum: torch.Tensor | None = None
        self._worst: torch.Tensor | None = None
        self._count = 0
        self._rows = 0
        self._steps = 0
        """Optimizer steps ended."""

    def see_output(self, output: Any) -> None:
        """Keep this forward pass's output and, through a tensor hook, the gradient that reaches it."""
        if not self.learning:
            return
        if not (isinstance(output, torch.Tensor) and output.requires_grad and output.is_floating_point()):
            self._output = None
            return
        entry: list[Any] = [output.detach(), None]
        self._output = entry

        def keep(grad: torch.Tensor) -> None:
            entry[1] = grad.detach()

        output.register_hook(keep)

    def see_loss(self, loss: torch.Tensor) -> None:
        """Pool this step's targets (a no-op once the level is published or known not to exist)."""
        if not self.learning:
            return
        node = loss.grad_fn
        if type(node).__name__ != "MseLossBackward0" or getattr(node, "_saved_reduction", None) != _MEAN:
            self.give_up()
            return
        target = self._target(node, loss)
        if target is not None:
            target = target.detach().float()
            square = target.square().sum()
            self._sum = square if self._sum is None else self._sum + square
            self._count += target.numel()
            self._rows += target.shape[0] if target.dim() else 1
        self._output = None
        if self._rows >= NULL_ROWS or self._steps + 1 >= NULL_STEPS:
            self._publish()

    def end_step(self) -> None:
        """An optimizer step ended: after ``NULL_STEPS`` of them, publish what was pooled."""
        if self.learning:
            self._steps += 1
            if self._steps >= NULL_STEPS:
                self._publish()

    def _target(self, node: Any, loss: torch.Tensor) -> torch.Tensor | None:
        try:
            return node._saved_target  # the graph is alive: recorded before backward()
        except RuntimeError:
            pass
        entry = self._output
        if entry is None or entry[1] is None:
            return None
        output, grad = entry
        if grad.shape != output.shape:
            return None
        error = grad.float() * (output.numel() / 2.0)
        recorded = loss.detach().float().reshape(())
        mismatch = (error.square().mean() - recorded).abs() / recorded.abs().clamp_min(1e-30)
        self._worst = mismatch if self._worst is None else torch.maximum(self._worst, mismatch)
        return output.float() - error

    def _publish(self) -> None:
        self.learning = False
        if self._sum is None or self._count == 0:
            return
        worst = self._worst if self._worst is not None else torch.zeros((), device=self._sum.device)
        total, mismatch = torch.stack([self._sum, worst.to(self._sum.device)]).tolist()
        level = total / self._count
        if math.isfinite(level) and level > 0 and math.isfinite(mismatch) and mismatch <= NULL_TOLERANCE:
            self.value = level
        self._sum = self._worst = None

    def give_up(self) -> None:
        """Stop learning, with no level (the loss is not a mean squared error, or cannot be read)."""
        self.learning = False
        self._output = self._sum = self._worst = None
