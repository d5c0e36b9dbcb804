"""PyTorch adapter: ``gradwatch.watch(model, optimizer)``.

::

    import gradwatch
    watch = gradwatch.watch(model, optimizer)          # policy="auto"
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        watch.record_loss(loss)                        # optional, no host sync
        optimizer.step()
    print(watch.report().summary())
    watch.remove()                                     # or: with gradwatch.watch(...) as watch:

Where it measures: in an optimizer step pre-hook (``Optimizer.register_step_pre_hook``), once per
optimizer step: after ``backward()`` (DDP has averaged), after ``GradScaler.unscale_`` (which
``GradScaler.step`` calls before ``optimizer.step()``; fused optimizers that keep the gradients
scaled get their norms divided by the scale), before any clipping. Steps that GradScaler skips
(inf/NaN in the scaled gradients) fire no hook; with ``scaler=`` they are counted and reported,
not called explosions. The remedies act in the same pre-hook, before the optimizer reads the
gradients.

Building blocks for other integrations, stable signatures. A new trainer callback needs only
:class:`StepDriver` (the whole step: measure, judge, skip/clip/roll back, snapshots) and
:class:`~gradwatch.integrations.torch.callback.TrainerCallbackCore` (monitor, fail-safe, sinks,
checkpoints), as the Lightning and Hugging Face callbacks do; the pieces below are what those are
made of:

* :class:`StepDriver` ``(monitor, *, model, optimizers, failsafe, every=1, ...)``: ``before_optimizer_step(...)``
  once per optimizer step before the optimizer reads the gradients, ``apply_lr`` / ``restore_lr``
  around ``optimizer.step()``, ``record_loss``, ``state_dict`` / ``load_state_dict``.

* :func:`build_layout` ``(model, optimizers=None, *, names=None) -> TorchParams``: the measured
  parameters (``.params``) and their :class:`gradwatch.Layout` (``.layout``), built once.
* :func:`measure` ``(tp, step, *, loss=None, lr=None, grad_scale=None, param_norms=True) -> StepStats``:
  the gradients as they are now, reduced on the device, one host transfer.
* :func:`apply_decision` ``(decision, params, *, grad_scale=None, snapshot=None) -> None``:
  rollback / skip (gradients set to None) / clip (exactly ``clip_grad_norm_``).
* :class:`LRScale`: ``apply(optimizer, factor)`` before ``optimizer.step()``, ``restore(optimizer)``
  after it; keeps the user's LR schedule and applies the factor on top.
* :class:`Snapshot` ``(params, optimizers)``: ``take(step)`` / ``restore()`` for rollbacks.
* :class:`Rollbacks` ``(every)``: when to take that snapshot (every N healthy steps):
  ``can_rollback``, ``due``, ``after(step, stats, decision, params, optimizers)``, ``forget()``.
* :func:`clip_grads`, :func:`drop_grads`.
* :class:`DistributedMeasure` ``(group=None, model=None)``: ``measure(tp, step, ...)`` as above but
  across the ranks of ``torch.distributed`` (DDP, FSDP2, FSDP1) in one collective, the same
  statistics on every rank (None when gradwatch failed on some rank: stop on every rank);
  :class:`RankZeroHooks` silences a monitor's output hooks on ranks other than 0
  (docs/distributed.md).

Raises:
    gradwatch.MissingExtraError: on import, when PyTorch is not installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gradwatch.errors import require

require("torch", "torch")  # a missing PyTorch raises MissingExtraError naming the extra to install

import torch  # noqa: E402

from .distributed import DistributedMeasure, RankZeroHooks  # noqa: E402
from .driver import StepDriver  # noqa: E402
from .layout import (  # noqa: E402
    LayerNames,
    TorchParams,
    build_layout,
    optimizer_params,
    param_role,
)
from .measure import measure, measure_tensors  # noqa: E402
from .remedies import (  # noqa: E402
    LRScale,
    Rollbacks,
    Snapshot,
    apply_decision,
    clip_grads,
    drop_grads,
)
from .watch import Watch  # noqa: E402


def watch(
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    **options: Any,
) -> Watch:
    """Watch the gradients of ``model`` as ``optimizer`` trains it, and apply remedies.

    The same as ``Watch(model, optimizer, **options)``; :class:`Watch` documents every option
    (``policy``, ``scaler``, ``every``, ``strict``, ``names``, ``rollback_every``,
    ``param_norm_every``, ``sinks``, ``monitor``, ``distributed``).

    Returns:
        The :class:`Watch` handle: ``record_loss``, ``report``, ``remove``, ``state_dict``,
        ``load_state_dict``, ``monitor``; also a context manager.

    Raises:
        TypeError, ValueError, RuntimeError: see :class:`Watch`.

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradwatch.watch(model, opt) as w:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         loss = model(torch.ones(8, 4)).pow(2).mean()
        ...         loss.backward()
        ...         w.record_loss(loss)
        ...         opt.step()
        >>> w.report().healthy, w.report().steps_measured
        (True, 3)
    """
    return Watch(model, optimizer, **options)


__all__ = [
    "DistributedMeasure",
    "LRScale",
    "LayerNames",
    "RankZeroHooks",
    "Rollbacks",
    "Snapshot",
    "StepDriver",
    "TorchParams",
    "Watch",
    "apply_decision",
    "build_layout",
    "clip_grads",
    "drop_grads",
    "measure",
    "measure_tensors",
    "optimizer_params",
    "param_role",
    "watch",
]
