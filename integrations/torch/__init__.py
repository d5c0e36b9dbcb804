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

Building blocks for other integrations (Lightning, Hugging Face), stable signatures:

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

from gradwatch.monitor import Monitor  # noqa: E402
from gradwatch.policy import Policy  # noqa: E402

from .distributed import DistributedMeasure, RankZeroHooks  # noqa: E402
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
    *,
    policy: str | Policy = "auto",
    scaler: Any = None,
    every: int = 1,
    strict: bool = False,
    names: LayerNames = None,
    rollback_every: int | None = None,
    param_norm_every: int = 10,
    monitor: Monitor | None = None,
    distributed: bool | None = None,
) -> Watch:
    """Watch the gradients of ``model`` as ``optimizer`` trains it, and apply remedies.

    Args:
        model: The model (names layers by their ``named_modules`` path). May be None: parameters
            are then named ``optimizer0.param3``.
        optimizer: The optimizer, or a list of optimizers that step together after the same
            ``backward()`` (a GAN's generator and discriminator step after different backward
            passes: watch each pair separately).
        policy: ``"auto"`` (skip non-finite steps, clip and decay the LR on explosions, recommend
            BatchNorm where gradients vanish), ``"observe"`` (never touch training) or a
            :class:`gradwatch.Policy`. Defaults to ``"auto"``.
        scaler: The ``torch.amp.GradScaler`` in use, so that the steps it skips are counted.
            Defaults to None.
        every: Measure every N optimizer steps. On the other steps only the standing controls
            that need no measurement apply (LR factor, clip level); a non-finite gradient there is
            not seen and not skipped. Defaults to 1.
        strict: Raise gradwatch's own internal errors instead of warning once and stopping.
            Defaults to False.
        names: How layers are named: None (the module path), a mapping from module path to a name,
            or a function of the module path. Defaults to None.
        rollback_every: Keep a copy of the parameters and optimizer state, refreshed every N
            healthy measured steps, and restore it when the parameters turn non-finite. Costs one
            copy of the parameters and of the optimizer state. Defaults to None (no rollback).
        param_norm_every: Measure the parameter norms (for the vanishing detector's
            ``||g|| / ||W||``) every N measured steps, reusing the last values in between (they
            change slowly), and in any case on a step with a non-finite gradient or loss (to see
            non-finite parameters) and before a rollback snapshot. 1: every measured step; 0:
            never. Defaults to 10.
        monitor: A :class:`gradwatch.Monitor` to use instead of a new one (custom detectors,
            history length); its own policy is used and ``policy`` is ignored. Defaults to None.
        distributed: Measure across the ranks of ``torch.distributed`` (DDP, FSDP, FSDP2): one
            small collective per measured step, so every rank sees the global norms and takes the
            same decision; only rank 0 emits events (sinks, reports). None: when
            ``torch.distributed`` is initialised with more than one rank; False: this process
            alone. Every rank must watch and step together. See docs/distributed.md.
            Defaults to None.

    Returns:
        The :class:`Watch` handle: ``record_loss``, ``report``, ``remove``, ``state_dict``,
        ``load_state_dict``, ``monitor``; also a context manager.

    Raises:
        TypeError: for an optimizer, model or scaler of the wrong type.
        ValueError: for ``every`` or ``rollback_every`` below 1, or a model without parameters.
        RuntimeError: for ``distributed=True`` without an initialised process group.

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
    return Watch(
        model, optimizer, policy=policy, scaler=scaler, every=every, strict=strict, names=names,
        rollback_every=rollback_every, param_norm_every=param_norm_every, monitor=monitor,
        distributed=distributed,
    )


__all__ = [
    "DistributedMeasure",
    "LRScale",
    "LayerNames",
    "RankZeroHooks",
    "Rollbacks",
    "Snapshot",
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
