"""Carry out a :class:`gradwatch.Decision` on PyTorch parameters and optimizers.

All of it acts before the optimizer reads the gradients (in a step pre-hook):

* skip: every gradient is set to None. Every ``torch.optim`` optimizer skips a parameter without a
  gradient entirely, so neither the parameters nor the optimizer state (momentum buffers, Adam's
  moments and step counts) change, and no weight decay is applied.
* clip: exactly :func:`torch.nn.utils.clip_grad_norm_` at the threshold (its own two halves,
  ``get_total_norm`` and ``clip_grads_with_norm_``, are called). For gradients still multiplied by
  a loss scale, the threshold is multiplied by it too.
* lr factor: :class:`LRScale` multiplies each group's ``lr`` just before ``optimizer.step()`` and
  puts the scheduled value back right after, so an LR scheduler always reads and writes its own
  schedule and never undoes (or compounds) the factor: the effective LR is ``schedule(t) * factor``.
* rollback: :class:`Snapshot` keeps one copy of the parameters and of the optimizer state and
  copies it back in place (tensor identities are kept, so fused and capturable optimizers work).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from gradwatch.options import check_rollback_every
from gradwatch.policy import Decision

_get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
_clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)


def drop_grads(params: Iterable[torch.Tensor]) -> None:
    """Set every gradient to None: the coming optimizer step changes nothing.

    Args:
        params: The parameters.
    """
    for p in params:
        p.grad = None


def clip_grads(
    params: Iterable[torch.Tensor],
    max_norm: float,
    *,
    grad_scale: torch.Tensor | float | None = None,
    guard_nonfinite: bool = False,
) -> torch.Tensor | None:
    """Clip the global L2 norm of the gradients to ``max_norm``, as ``clip_grad_norm_`` does.

    Args:
        params: The parameters (those without a gradient are ignored).
        max_norm: The threshold, on the unscaled gradients.
        grad_scale: The loss scale the gradients are still multiplied by. Defaults to None.
        guard_nonfinite: Leave the gradients unchanged when their norm is non-finite (instead of
            turning every gradient into NaN as ``clip_grad_norm_`` would). Used on steps gradwatch
            does not measure. Defaults to False.

    Returns:
        The total norm (a tensor on the device, scaled like the gradients), or None when no
        parameter has a gradient.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return None
    threshold: Any = max_norm if grad_scale is None else max_norm * grad_scale
    sparse = [p for p in with_grad if p.grad is not None and p.grad.is_sparse]
    if sparse or _get_total_norm is None or _clip_with_norm is None:
        return _clip_generic(with_grad, threshold, guard_nonfinite)
    grads = [p.grad for p in with_grad]
    total = _get_total_norm(grads, 2.0, False, None)
    if guard_nonfinite:
        total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    _clip_with_norm(with_grad, threshold, total, None)
    return total


def _clip_generic(with_grad: list[torch.Tensor], threshold: Any, guard: bool) -> torch.Tensor:
    """Clipping that also handles sparse gradients (and torch < 2.6)."""
    with torch.no_grad():
        norms = []
        for p in with_grad:
            g = p.grad
            assert g is not None
            values = g.coalesce().values() if g.is_sparse else g
            norms.append(torch.linalg.vector_norm(values.float() if values.dtype in (torch.float16, torch.bfloat16) else values))
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device).float() for n in norms]))
        if guard:
            total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        coef = torch.clamp(threshold / (total + 1e-6), max=1.0)
        for p in with_grad:
            g = p.grad
            assert g is not None
            if g.is_sparse:
                p.grad = g.coalesce() * coef.to(g.device)
            else:
                g.mul_(coef.to(g.device, g.dtype))
        return total


class LRScale:
    """Apply a learning-rate factor for the duration of ``optimizer.step()`` only.

    :meth:`apply` in a step pre-hook multiplies every group's ``lr`` by the factor and remembers
    the scheduled value; :meth:`restore` in the step post-hook puts it back. A scheduler stepping
    between two optimizer steps sees and sets the user's own schedule, which is thus kept in shape
    (LambdaLR, OneCycleLR, CosineAnnealingLR's recursive form, ReduceLROnPlateau...), and the
    factor is never compounded. Reading ``optimizer.param_groups[i]["lr"]`` between steps gives the
    scheduled value; the effective one is that times the factor.

    Example:
        >>> import torch
        >>> from gradwatch.integrations.torch import LRScale
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> scale = LRScale()
        >>> scale.apply(opt, 0.5); opt.param_groups[0]["lr"]
        0.05
        >>> scale.restore(opt); opt.param_groups[0]["lr"]
        0.1
    """

    def __init__(self) -> None:
        self._saved: dict[int, list[Any]] = {}

    def apply(self, optimizer: torch.optim.Optimizer, factor: float) -> None:
        """Multiply every group's LR by ``factor`` (no-op for 1.0) until :meth:`restore`.

        Args:
            optimizer: The optimizer about to step.
            factor: The LR factor in force.
        """
        self.restore(optimizer)  # a step that raised never reached the post-hook
        if factor == 1.0:
            return
        saved = []
        for group in optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                saved.append(lr.clone())
                lr.mul_(factor)
            else:
                saved.append(lr)
                group["lr"] = lr * factor
        self._saved[id(optimizer)] = saved

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the scheduled LR back (no-op when nothing was applied).

        Args:
            optimizer: The optimizer that stepped.
        """
        saved = self._saved.pop(id(optimizer), None)
        if saved is None:
            return
        for group, lr in zip(optimizer.param_groups, saved):
            if isinstance(group["lr"], torch.Tensor) and isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr

    def effective_lr(self, optimizer: torch.optim.Optimizer, factor: float) -> float | None:
        """The first group's LR times ``factor`` (the scheduled LR when not applied), as a float."""
        if not optimizer.param_groups:
            return None
        lr = optimizer.param_groups[0].get("lr")
        if lr is None:
            return None
        value = float(lr)  # a tensor LR lives on the host for all built-in optimizers
        return value if id(optimizer) in self._saved else value * factor

    @property
    def active(self) -> bool:
        return bool(self._saved)


class Snapshot:
    """One copy of the parameters, the optimizer state and the model's floating-point buffers
    (BatchNorm's running statistics), restored in place.

    Memory: one extra copy of every parameter plus the optimizer state (Adam: 3x the parameters
    in total; SGD with momentum: 2x), plus the buffers.

    Args:
        params: The parameters.
        optimizers: The optimizers whose state is saved with them.
        buffers: The model's floating-point buffers. Defaults to none.
    """

    def __init__(self, params: Sequence[torch.Tensor], optimizers: Sequence[torch.optim.Optimizer],
                 buffers: Sequence[torch.Tensor] = ()) -> None:
        self.params = list(params)
        self.optimizers = list(optimizers)
        self.buffers = list(buffers)
        self.step: int = -1
        self._values: list[torch.Tensor] = []
        self._buffer_values: list[torch.Tensor] = []
        self._state: list[dict[int, dict[str, Any]]] = []

    @property
    def taken(self) -> bool:
        return self.step >= 0

    def take(self, step: int) -> None:
        """Copy the parameters and optimizer state as they are now.

        Args:
            step: The optimizer step the copy belongs to (for the record).
        """
        with torch.no_grad():
            if len(self._values) == len(self.params):
                for saved, p in zip(self._values, self.params):
                    saved.copy_(p)
            else:
                self._values = [p.detach().clone() for p in self.params]
            if len(self._buffer_values) == len(self.buffers):
                for saved, b in zip(self._buffer_values, self.buffers):
                    saved.copy_(b)
            else:
                self._buffer_values = [b.detach().clone() for b in self.buffers]
            self._state = []
            for opt in self.optimizers:
                per_param: dict[int, dict[str, Any]] = {}
                for p, state in opt.state.items():
                    per_param[id(p)] = {
                        k: (v.detach().clone() if isinstance(v, torch.Tensor) else _copy_value(v))
                        for k, v in state.items()
                    }
                self._state.append(per_param)
        self.step = int(step)

    def restore(self) -> None:
        """Copy the saved parameters and optimizer state back in place.

        Raises:
            RuntimeError: if no snapshot was taken.
        """
        if not self.taken:
            raise RuntimeError("Snapshot.restore() called before Snapshot.take(): nothing to restore.")
        with torch.no_grad():
            for saved, p in zip(self._values, self.params):
                p.copy_(saved)
            self.restore_buffers()
            for opt, saved_state in zip(self.optimizers, self._state):
                for group in opt.param_groups:
                    for p in group["params"]:
                        old = saved_state.get(id(p))
                        if old is None:
                            opt.state.pop(p, None)
                            continue
                        current = opt.state[p]
                        for key in list(current):
                            if key not in old:
                                del current[key]
                        for key, value in old.items():
                            target = current.get(key)
                            if isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor) and target.shape == value.shape:
                                target.copy_(value)
                            elif isinstance(value, torch.Tensor):
                                current[key] = value.clone()
                            else:
                                current[key] = _copy_value(value)

    def restore_buffers(self, *, only_if_nonfinite: bool = False) -> bool:
        """Copy the saved buffers back (BatchNorm's running statistics).

        Args:
            only_if_nonfinite: Only when some buffer holds a NaN/Inf now (a skipped step's
                forward pass already put it there). Defaults to False.

        Returns:
            True when buffers were restored.
        """
        if not self.taken or not self.buffers:
            return False
        if only_if_nonfinite and all(bool(torch.isfinite(b).all()) for b in self.buffers):
            return False
        with torch.no_grad():
            for saved, b in zip(self._buffer_values, self.buffers):
                b.copy_(saved)
        return True

    def clear(self) -> None:
        """Free the copy."""
        self._values = []
        self._buffer_values = []
        self._state = []
        self.step = -1


class Rollbacks:
    """When to take the :class:`Snapshot` a rollback restores: after ``every`` healthy measured
    steps in a row (finite gradients and parameters, no finding of severity warning or error, no
    action), and on the first healthy step (the initial parameters: what a run broken from its
    first step goes back to). A divergence starts a few steps before it is called: requiring a run
    of healthy steps keeps its first steps out of the snapshot.

    Shared by every PyTorch-based adapter so that they keep snapshots the same way.

    Args:
        every: Healthy steps between snapshots; None keeps none (no rollback).

    Raises:
        ValueError: if ``every`` is neither None nor an int >= 1.
    """

    def __init__(self, every: int | None, buffers: Sequence[torch.Tensor] = ()) -> None:
        self.buffers = list(buffers)
        checked = check_rollback_every(every)
        if isinstance(checked, str):
            raise ValueError("Rollbacks needs rollback_every resolved to None or an int (the adapter resolves 'auto').")
        self.every = checked
        self.snapshot: Snapshot | None = None
        self.healthy_since = 0

    @property
    def can_rollback(self) -> bool:
        """A snapshot is there to restore."""
        return self.snapshot is not None and self.snapshot.taken

    @property
    def due(self) -> bool:
        """The next healthy step takes a snapshot (adapters measure parameter norms then)."""
        return self.every is not None and (not self.can_rollback or self.healthy_since + 1 >= self.every)

    def after(self, step: int, stats: Any, decision: Decision, params: Sequence[torch.Tensor],
              optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """After a decision was carried out: take a snapshot when the step was healthy and one is due.

        Args:
            step: The optimizer step.
            stats: Its :class:`gradwatch.StepStats`.
            decision: Its decision.
            params: The parameters (the snapshot copies them, before this step's update).
            optimizers: Their optimizers.
        """
        if self.every is None:
            return
        healthy = decision.healthy_after(stats)
        if self.snapshot is None and stats.finite and not bool(stats.params_nonfinite.any()):
            # The first: the initial parameters, whatever was found on this step. A run broken
            # from its first step has nothing better to go back to.
            self.snapshot = Snapshot(params, optimizers, self.buffers)
            self.snapshot.take(step)
            self.healthy_since = 0
            return
        if not healthy:
            self.healthy_since = 0
            return
        self.healthy_since += 1
        if self.snapshot is None:
            self.snapshot = Snapshot(params, optimizers, self.buffers)
        if not self.snapshot.taken or self.healthy_since >= self.every:
            self.snapshot.take(step)
            self.healthy_since = 0

    def forget(self) -> None:
        """Drop the snapshot (the parameters changed, or the run ended)."""
        if self.snapshot is not None:
            self.snapshot.clear()
        self.snapshot = None


def _copy_value(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def apply_decision(
    decision: Decision,
    params: Sequence[torch.Tensor],
    *,
    grad_scale: torch.Tensor | float | None = None,
    snapshot: Snapshot | None = None,
) -> None:
    """Carry out a decision's per-step part on the gradients: rollback, skip or clip.

    The LR factor (``decision.lr_factor``) is standing and applied separately, with
    :class:`LRScale` around each ``optimizer.step()``.

    Args:
        decision: What :meth:`gradwatch.Monitor.observe` returned.
        params: The parameters whose gradients the optimizer is about to read.
        grad_scale: The loss scale the gradients still carry (fused optimizers under GradScaler).
            Defaults to None.
        snapshot: The snapshot to restore on ``decision.rollback``. Defaults to None.

    Raises:
        RuntimeError: on a rollback without a snapshot taken.

    Example:
        >>> import torch, gradwatch
        >>> from gradwatch.integrations.torch import apply_decision
        >>> p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 3.0)
        >>> apply_decision(gradwatch.Decision(step=0, clip_norm=1.0), [p])
        >>> round(float(p.grad.norm()), 4)
        1.0
    """
    if decision.rollback:
        if snapshot is None or not snapshot.taken:
            raise RuntimeError(
                f"The decision at step {decision.step} asks for a rollback but no snapshot was taken; "
                "pass can_rollback=False to Monitor.observe when there is none."
            )
        snapshot.restore()
        drop_grads(params)
    elif decision.skip:
        drop_grads(params)
    elif decision.clip_norm is not None and math.isfinite(decision.clip_norm):
        clip_grads(params, decision.clip_norm, grad_scale=grad_scale)


__all__ = ["LRScale", "Snapshot", "apply_decision", "clip_grads", "drop_grads"]
