"""The micro-batch losses of each optimizer step, and how many of them were NaN or Inf.

Trainers log a running loss that can hide a non-finite micro-batch (the Hugging Face Trainer's
``logging_nan_inf_filter=True`` replaces it by the average so far). :class:`MicroBatchLosses`
keeps each micro-batch's loss on the device, gives the step's mean to the measurement, and counts
the non-finite ones without a host sync on the steps that are not measured (read once at the end)
and with one extra transfer on the rare measured step whose mean is non-finite.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

__all__ = ["MicroBatchLosses", "output_loss"]


def output_loss(output: Any) -> torch.Tensor | None:
    """The ``loss`` of a model output (a ``ModelOutput``, a dict, or what ``return_dict=False``
    gives), when it is a one-element tensor."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class MicroBatchLosses:
    """The losses of the coming optimizer step, micro-batch by micro-batch.

    Attributes:
        micro_batches: Micro-batches whose loss was seen.
        nonfinite: Of those, the ones whose loss was NaN or Inf (the unmeasured steps' are added by
            :meth:`close`).
    """

    def __init__(self) -> None:
        self.micro_batches = 0
        self.nonfinite = 0
        self.warned = False
        self._pending: list[torch.Tensor] = []
        self._unmeasured_bad: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        """Keep one micro-batch's loss (a one-element tensor), on the device."""
        self._pending.append(loss.detach().float().reshape(()))

    def clear(self) -> None:
        """Drop the pending losses (monitoring stopped)."""
        self._pending = []

    def take(self, measured: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The step's mean loss (None when no loss was seen or the step is not measured) and its
        micro-batch losses; counts them."""
        losses, self._pending = self._pending, []
        self.micro_batches += len(losses)
        if not losses:
            return None, losses
        if measured:
            return torch.stack(losses).mean(), losses
        bad = (~torch.isfinite(torch.stack(losses))).sum()  # counted on the device: no sync here
        self._unmeasured_bad = bad if self._unmeasured_bad is None else self._unmeasured_bad + bad
        return None, losses

    def count(self, losses: list[torch.Tensor], mean: float | None, step: int, *, note: str, warn: bool) -> None:
        """After a measured step: when its mean loss is non-finite, count the non-finite
        micro-batches (one extra host transfer) and warn the first time.

        Args:
            losses: The step's micro-batch losses.
            mean: The step's mean loss as measured (None: unknown).
            step: The optimizer step.
            note: What to add to the warning (where the count is, what hides it).
            warn: Warn (the main process only).
        """
        if not losses or mean is None or math.isfinite(mean):
            return
        bad = int((~torch.isfinite(torch.stack(losses))).sum().cpu())
        self.nonfinite += bad
        if bad and warn and not self.warned:
            self.warned = True
            warnings.warn(f"gradwatch: {bad} micro-batch loss(es) NaN/Inf at optimizer step {step}.{note}",
                          UserWarning, stacklevel=5)

    def close(self, *, warn: bool, note: str = "") -> None:
        """The end of training: add the unmeasured steps' non-finite count (one transfer) and say
        how many there were in all.

        Args:
            warn: Warn when there were any (the main process only).
            note: What to add to the warning (what hid them).
        """
        if self._unmeasured_bad is not None:
            self.nonfinite += int(self._unmeasured_bad.cpu())
            self._unmeasured_bad = None
        if self.nonfinite and warn:
            warnings.warn(f"gradwatch: {self.nonfinite} of {self.micro_batches} micro-batch losses were NaN/Inf{note}. "
                          "See the nonfinite findings in the report.", UserWarning, stacklevel=3)
