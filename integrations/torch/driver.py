"""The one per-step sequence behind every PyTorch entry point: ``gradwatch.watch``, the Lightning
callback and the Hugging Face Trainer callback.

Each entry point learns about an optimizer step in its own way (an optimizer pre-hook,
``on_before_optimizer_step``, ``on_pre_optimizer_step``) and then calls :meth:`StepDriver.before_optimizer_step`,
which does the whole sequence in one place:

1. count the step and take the loss recorded for it;
2. a step the ``GradScaler`` is known to skip (a fused optimizer's ``found_inf``) is counted as
   skipped by the framework, not judged;
3. on a step that is not measured (``every``), only the standing clip level applies;
4. new parameters (a param group added) rebuild the layout and drop the rollback snapshot;
5. measure: one host transfer (one collective across ranks under DDP/FSDP);
6. a step where nothing has a gradient has nothing to judge; under a ``GradScaler`` that skips
   overflowing steps on its own, non-finite gradients with a finite loss are its routine skip;
7. the :class:`gradwatch.Monitor` judges the step and returns the final decision (plugins
   included);
8. carry it out: roll back or skip (gradients set to None), or clip through the adapter's own
   clipping;
9. take a rollback snapshot when one is due.

What differs between the entry points is passed in, and nothing else: how to clip (Lightning
through ``trainer.gradient_clip_val``, the Trainer callback at the smaller of the user's
``max_grad_norm`` and gradwatch's level), how it learns about a ``GradScaler`` skip, where the
loss comes from. The learning-rate factor is applied by the entry point around each
``optimizer.step()`` with :meth:`StepDriver.apply_lr` / :meth:`StepDriver.restore_lr`.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gradwatch.failsafe import FailSafe
from gradwatch.monitor import Monitor
from gradwatch.options import (
    ROLLBACK_BUDGET_BYTES,
    ROLLBACK_EVERY,
    check_every,
    check_param_norm_every,
    check_rollback_every,
    resolve_rollback_every,
)
from gradwatch.policy import Controls, Decision
from gradwatch.stats import StepStats

from . import distributed as torch_distributed
from .layout import LayerNames, TorchParams, build_layout, unwrap
from .measure import load_unit_streaks, measure, unit_streaks
from .null_level import NullLevel
from .remedies import LRScale, Rollbacks, apply_decision, clip_grads

Clip = Callable[[TorchParams, float, Any, bool], None]
"""``clip(params, level, grad_scale, unmeasured)``: clip this step's gradients to the global norm
``level`` (``inf``: gradwatch wants no clipping; an adapter that took over the user's own clipping
still applies that). ``unmeasured``: the step was not checked for non-finite values, so a
non-finite norm must leave the gradients alone."""

__all__ = ["EARLY_PARAM_STEPS", "ROLLBACK_BUDGET_BYTES", "ROLLBACK_EVERY", "Clip", "StepDriver", "chance_loss_of",
           "clip_directly"]

EARLY_PARAM_STEPS = 20
"""Parameter norms are measured on every one of the first measured steps, and for as many after
a rollback or an LR change: the absolute rules (updates as large as the weights) need them on
consecutive steps exactly when a run may be broken."""

_LOG = logging.getLogger("gradwatch")


def _buffers(model: torch.nn.Module | None) -> list[torch.Tensor]:
    """The model's floating-point buffers (BatchNorm's running statistics), kept in snapshots."""
    inner = unwrap(model)
    if inner is None:
        return []
    return [b for b in inner.buffers() if b.is_floating_point()]


def chance_loss_of(loss: torch.Tensor, classes: int | None = None) -> float | None:
    """The loss of a model that knows nothing, read off the loss tensor's autograd graph: ``ln C``
    for a C-class cross-entropy (``NllLossBackward0`` with log-probabilities of C classes), ``ln 2``
    for a binary cross-entropy; None for anything else (a regression loss, a custom one).

    Args:
        loss: The loss tensor, before ``detach``.
        classes: The number of classes when the graph's saved tensors are gone (``backward()``
            frees them): the width of the model's 2-D output. Defaults to None (unknown).

    Returns:
        The chance level, or None.
    """
    node = getattr(loss, "grad_fn", None)
    frontier, seen = [node], 0
    while frontier and seen < 12:  # the loss itself, through scalings, sums and means
        node = frontier.pop(0)
        seen += 1
        if node is None:
            continue
        name = type(node).__name__
        if name.startswith("NllLoss"):
            try:
                shape = tuple(node._saved_self.shape)
                classes = shape[1] if len(shape) >= 2 else (shape[0] if shape else 0)
            except RuntimeError:  # after backward(): the saved log-probabilities are freed
                pass
            return math.log(classes) if classes is not None and classes >= 2 else None
        if name.startswith(("BinaryCrossEntropyWithLogits", "BinaryCrossEntropy")):
            return math.log(2.0)
        if name.rstrip("0123456789").removesuffix("Backward") in ("Mul", "Div", "Add", "Mean", "Sum", "Neg", "Squeeze", "View"):
            frontier.extend(child for child, _ in node.next_functions)
    return None


def clip_directly(params: TorchParams, level: float, grad_scale: Any, unmeasured: bool) -> None:
    """The default :data:`Clip`: exactly ``torch.nn.utils.clip_grad_norm_`` at ``level``."""
    if math.isfinite(level):
        clip_grads(params.params, level, grad_scale=grad_scale, guard_nonfinite=unmeasured)


class StepDriver:
    """Measure, judge and steer every optimizer step of one watched model.

    Args:
        monitor: The monitor that judges the run.
        model: The model (names layers); may be None.
        optimizers: The optimizers that step together after one ``backward()``.
        failsafe: The adapter's fail-safe; the driver adds its distributed stop and its cleanup.
        every: Measure every N optimizer steps. Defaults to 1.
        names: How layers are named (see :func:`build_layout`). Defaults to None.
        rollback_every: Healthy steps in a row between rollback snapshots; None keeps none;
            ``"auto"``: :data:`ROLLBACK_EVERY` when the monitor's policy rolls back and the copy
            fits :data:`ROLLBACK_BUDGET_BYTES`, else none. Defaults to None.
        param_norm_every: Measure parameter norms every N measured steps (0: never).
            Defaults to 10.
        distributed: Measure across the ranks of ``torch.distributed`` (None: when it is
            initialised with more than one rank). Defaults to False.
        clip: How this adapter clips (:data:`Clip`). Defaults to :func:`clip_directly`.
        loss_reduction: How the losses recorded for one step combine: ``"mean"`` (one record
            per micro-batch) or ``"sum"`` (records already divided by the number of
            micro-batches, as Lightning hands them). Defaults to ``"mean"``.

    Attributes:
        step: Optimizer steps seen (including those the GradScaler skipped).
        params: The measured parameters and their layout.
    """

    def __init__(
        self,
        monitor: Monitor,
        *,
        model: torch.nn.Module | None,
        optimizers: Sequence[torch.optim.Optimizer],
        failsafe: FailSafe,
        every: int = 1,
        names: LayerNames = None,
        rollback_every: int | str | None = None,
        param_norm_every: int = 10,
        distributed: bool | None = False,
        clip: Clip | None = None,
        loss_reduction: str = "mean",
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum'. Received {loss_reduction!r}.")
        self.monitor = monitor
        self.model = model
        self.optimizers = list(optimizers)
        self.failsafe = failsafe
        self.every = check_every(every)
        self.names = names
        self.param_norm_every = check_param_norm_every(param_norm_every)
        self.clip = clip or clip_directly
        self.loss_reduction = loss_reduction
        self.params: TorchParams = build_layout(model, self.optimizers, names=names)
        self.rollbacks = Rollbacks(self._resolve_rollback_every(check_rollback_every(rollback_every)), _buffers(model))
        self.chance_loss: float | None = None
        """``ln C`` when the loss is known to be a C-class cross-entropy (set by the first loss)."""
        self.output_classes: int | None = None
        """The width of the model's 2-D output, when an adapter saw it (for ``chance_loss``)."""
        self._chance_checked = False
        self.null = NullLevel()
        """The mean squared target of the first batches, for a mean-squared-error loss
        (``StepStats.null_loss``); fed by :meth:`see_output` and the recorded losses."""
        self._param_boost_until = EARLY_PARAM_STEPS
        self._match_monitor_layout()
        self.step = 0
        self.measured = 0
        self.lr = LRScale()
        self._loss: Any = None
        self._loss_count = 0
        self._param_norm: np.ndarray | None = None
        self._dist = (
            torch_distributed.attach(monitor, model) if torch_distributed.active(distributed) else None
        )
        if self._dist is not None:
            failsafe._stop_together = self._stop_together
        failsafe.on_stop(self._forget_loss)

    # -- what the adapters call -----------------------------------------------------------------

    @property
    def controls(self) -> Controls:
        """The standing orders in force (the monitor's, plugins included)."""
        return self.monitor.controls

    def record_loss(self, loss: Any) -> None:
        """Record a loss for the coming optimizer step, kept on the device (no host sync); read in
        the step's single transfer. Several records before one step are combined by
        ``loss_reduction``.

        Args:
            loss: A tensor with one element, or a real number.

        Raises:
            TypeError: for anything else (a string, a tensor of several elements: pass
                ``loss.mean()``), at this call.
        """
        if isinstance(loss, torch.Tensor):
            self.learn_loss_function(loss)
            if loss.numel() != 1:
                raise TypeError(
                    "record_loss expects the step's scalar loss; received a tensor of shape "
                    f"{tuple(loss.shape)}. Pass the reduced loss (loss.mean()) instead."
                )
            if loss.is_complex():
                raise TypeError(f"record_loss expects a real loss; received a {loss.dtype} tensor.")
            value: Any = loss.detach().reshape(())
            if value.dtype != torch.float32:
                value = value.float()
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            value = float(loss)
        else:
            raise TypeError(
                "record_loss expects the step's loss as a scalar tensor or a real number; received "
                f"{type(loss).__name__} {loss!r}."
            )
        if not self.failsafe.active:
            return
        self._loss = value if self._loss is None else self._loss + value
        self._loss_count += 1

    def learn_loss_function(self, loss: torch.Tensor) -> None:
        """Read the loss function off the loss tensors seen (with their autograd graph): a
        cross-entropy gives the loss an absolute scale from step 0 (``StepStats.chance_loss``,
        from the first loss only), a mean squared error the mean squared target of the first
        batches (``StepStats.null_loss``, pooled over a few steps: :mod:`.null_level`). After that
        the call returns at once."""
        if self.null.learning:
            try:
                self.null.see_loss(loss)
            except Exception:  # a graph we cannot read: no null level, nothing else changes
                self.null.give_up()
        if self._chance_checked:
            return
        self._chance_checked = True
        try:
            self.chance_loss = chance_loss_of(loss, self.output_classes)
        except Exception:  # a graph we cannot read: no chance level, nothing else changes
            self.chance_loss = None

    def see_output(self, output: Any) -> None:
        """The model's output of a forward pass (an adapter's forward hook): its width for the
        chance level, and, for the first steps, the tensor and its gradient for the null level.
        :attr:`wants_outputs` says when the adapter may remove its hook."""
        if self.output_classes is None and isinstance(output, torch.Tensor) and output.dim() == 2:
            self.output_classes = int(output.shape[1])
        self.null.see_output(output)

    @property
    def wants_outputs(self) -> bool:
        """False once :meth:`see_output` has nothing more to learn."""
        return self.output_classes is None or self.null.learning

    def apply_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale ``optimizer``'s LR by the factor in force until :meth:`restore_lr` (call it
        right before ``optimizer.step()``)."""
        self.lr.apply(optimizer, self.controls.lr_factor)

    def restore_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the scheduled LR back (right after ``optimizer.step()``)."""
        if self.lr.active:
            self.lr.restore(optimizer)

    def before_optimizer_step(
        self,
        *,
        loss: Any = None,
        grad_scale: Any = None,
        scaler_skips: bool = False,
        skipped: bool = False,
    ) -> tuple[StepStats, Decision] | None:
        """One optimizer step, before the optimizer reads the gradients (see the module docstring).

        Args:
            loss: The step's loss (a scalar tensor or float); None takes what
                :meth:`record_loss` recorded. Defaults to None.
            grad_scale: The loss scale the gradients still carry (a fused optimizer under a
                GradScaler unscales inside its own ``step``). Defaults to None.
            scaler_skips: A GradScaler will skip this step on its own if its gradients overflow:
                non-finite gradients with a finite (or unknown) loss are counted as its skip, not
                judged. Defaults to False.
            skipped: The GradScaler is already known to skip this step. Defaults to False.

        Returns:
            The step's statistics and decision when it was measured and judged, else None.
        """
        step = self.step
        self.step += 1
        if self.null.learning:
            self.null.end_step()
        recorded, count = self._loss, self._loss_count
        self._loss, self._loss_count = None, 0
        if loss is None:
            loss = recorded if self.loss_reduction == "sum" or count <= 1 else recorded / count
        if skipped:
            self.monitor.note_skipped(step, "grad_scaler")
            return None
        measured = step % self.every == 0
        if self._dist is not None and measured:
            self._dist.owe()  # from here on this rank owes the step's collective, even if it fails
        self._refresh_layout()
        controls = self.controls
        if not measured:
            # A non-finite step here is not seen, so it cannot be skipped: docs/torch.md, "every".
            self.clip(self.params, controls.clip_norm, grad_scale, True)
            return None
        stats = self._measure(step, loss, grad_scale, controls)
        if stats is None:  # gradwatch failed on some rank: every rank stops at this same step
            self.failsafe.stop()
            return None
        if not bool(stats.has_grad.any()):
            return None  # nothing has a gradient (Lightning's training_step returned None)
        if scaler_skips and not stats.finite and (stats.loss is None or math.isfinite(stats.loss)):
            # The scaled gradients overflowed: the GradScaler skips this step on its own and lowers
            # its scale. Routine under fp16, not an explosion. (A NaN loss is judged as usual.)
            self.monitor.note_skipped(step, "grad_scaler")
            return None
        stats.chance_loss = self.chance_loss
        stats.null_loss = self.null.value
        factor_before = controls.lr_factor
        decision = self.monitor.observe(stats, immediate=True, can_rollback=self.rollbacks.can_rollback)
        if decision.rollback or decision.lr_factor != factor_before:
            self._param_boost_until = self.measured + EARLY_PARAM_STEPS  # judge the new regime closely
        if decision.rollback or decision.skip:
            apply_decision(decision, self.params.params, snapshot=self.rollbacks.snapshot)
            snapshot = self.rollbacks.snapshot
            if decision.skip and not decision.rollback and not stats.finite and snapshot is not None:
                # The step's forward pass already ran: a NaN in its batch went into BatchNorm's
                # running statistics, which skipping the update does not undo. Put them back.
                snapshot.restore_buffers(only_if_nonfinite=True)
        else:
            level = decision.clip_norm if decision.clip_norm is not None else math.inf
            self.clip(self.params, level, grad_scale, False)
        self.rollbacks.after(step, stats, decision, self.params.params, self.optimizers)
        return stats, decision

    def note_scaler_skip(self) -> None:
        """A GradScaler skipped a whole step without calling ``optimizer.step()`` (no hook ran)."""
        self.monitor.note_skipped(self.step, "grad_scaler")
        self.step += 1
        self._forget_loss()

    def close(self) -> None:
        """Drop the snapshot and the pending loss (the run ended)."""
        self.rollbacks.forget()
        self._forget_loss()

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and the driver's counters, plain Python (no snapshot)."""
        return {
            "monitor": self.monitor.state_dict(), "step": self.step, "every": self.every,
            "measured": self.measured, "healthy_since_snapshot": self.rollbacks.healthy_since,
            "param_norm": None if self._param_norm is None else [float(x) for x in self._param_norm],
            "unit_streaks": unit_streaks(self.params) if self._dist is None else {},
        }

    def load_state_dict(self, state: dict[str, Any], *, owner: str) -> None:
        """Continue from :meth:`state_dict` (also accepts the shorter states of earlier versions,
        with ``monitor`` and ``step`` only).

        Args:
            state: What :meth:`state_dict` returned.
            owner: The adapter's name, for the error message.

        Raises:
            ValueError: if ``state`` is not such a state.
        """
        if not isinstance(state, dict) or "monitor" not in state:
            raise ValueError(
                f"{owner}.load_state_dict expects what {owner}.state_dict() returned (a dict with "
                f"'monitor' and 'step'). Received {type(state).__name__}"
                + (f" with keys {sorted(state)}." if isinstance(state, dict) else ".")
            )
        self.monitor.load_state_dict(state["monitor"])
        self.load_counters(state)

    def load_counters(self, state: dict[str, Any]) -> None:
        """The driver's part of :meth:`load_state_dict` (the monitor already restored)."""
        self.step = int(state.get("step", 0))
        self.measured = int(state.get("measured", 0))
        self.rollbacks.healthy_since = int(state.get("healthy_since_snapshot", 0))
        saved = state.get("param_norm")
        self._param_norm = None if saved is None else np.array(saved, dtype=np.float64)
        streaks = state.get("unit_streaks")
        if isinstance(streaks, dict) and self._dist is None:
            load_unit_streaks(self.params, streaks)
        self._match_monitor_layout()

    # -- inside ---------------------------------------------------------------------------------

    def _measure(self, step: int, loss: Any, grad_scale: Any, controls: Controls) -> StepStats | None:
        lr = self.lr.effective_lr(self.optimizers[0], controls.lr_factor)
        param_norms = self._param_norms_now()
        if self._dist is not None:
            stats = self._dist.measure(self.params, step, loss=loss, lr=lr, grad_scale=grad_scale,
                                       param_norms=param_norms)
        else:
            stats = measure(self.params, step, loss=loss, lr=lr, grad_scale=grad_scale, param_norms=param_norms)
        if stats is None:
            return None
        self.measured += 1
        if stats.params_measured:
            self._param_norm = stats.param_norm
        return stats

    def _param_norms_now(self) -> bool | np.ndarray:
        """True to measure parameter norms on this step, else the last values (or False)."""
        if self.param_norm_every == 0:
            return False
        stale = self._param_norm is None or len(self._param_norm) != len(self.params)
        boost = self.measured < self._param_boost_until
        if stale or boost or self.rollbacks.due or self.measured % self.param_norm_every == 0:
            return True
        assert self._param_norm is not None
        return self._param_norm

    def _resolve_rollback_every(self, rollback_every: int | str | None) -> int | None:
        """``"auto"``: snapshots when the policy rolls back and one copy fits the budget."""
        size = sum(p.numel() * p.element_size() for p in self.params.params)
        return resolve_rollback_every(rollback_every, self.monitor.policy, size)

    def _refresh_layout(self) -> None:
        if self.params.stale(self.optimizers):
            self.params = build_layout(self.model, self.optimizers, names=self.names)
            self._match_monitor_layout()
            self.rollbacks.forget()

    def _match_monitor_layout(self) -> None:
        """Share the monitor's layout object when they are equal: no comparison per step."""
        layout = self.monitor.layout
        if layout is not None and layout is not self.params.layout and layout == self.params.layout:
            self.params.layout = layout

    def _stop_together(self, exc: BaseException) -> bool:
        assert self._dist is not None
        return self._dist.fail(exc, len(self.params))

    def _forget_loss(self) -> None:
        self._loss, self._loss_count = None, 0
