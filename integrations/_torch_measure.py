"""Measure one optimizer step of a PyTorch model: reductions on the device, one host transfer.

:func:`measure` reads every gradient once and returns a :class:`gradwatch.StepStats`:

* weight tensors (two or more dimensions): the L2 norm of each output row (unit) with
  ``torch.linalg.vector_norm(g.flatten(1), dim=1)``. The tensor's norm is the norm of its row norms
  (one ``_foreach_norm``), and its dead units are the rows whose norm is exactly 0, counted by the
  L0 "norm" (number of non-zeros) of the row norms (one more ``_foreach_norm``, on a few KB). One
  read of the gradient gives both: counting zero rows tensor by tensor with ``(g == 0).all(1)``
  costs about 10x more.
* other dense tensors (biases, normalisation scales, embeddings): one ``torch._foreach_norm``.
* sparse gradients (``nn.Embedding(sparse=True)``): coalesced, the norm of the values.
* fp16/bf16 gradients and parameters: norms accumulated in float32.
* parameter norms: one ``torch._foreach_norm`` (the vanishing detector compares ``||g|| / ||W||``).

Non-finite values are read off the norms (a NaN or Inf element makes its tensor's norm non-finite).
Only on that rare path are the non-finite elements of the affected tensors counted, in a second
transfer; a norm that merely overflowed float32 is then recomputed in float64.

Everything goes into one small float32 vector and crosses to the host in one ``.cpu()``. No
reference to a gradient survives the call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradwatch.stats import StepStats

from ._torch_layout import TorchParams

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norms of dense tensors, float32 accumulation for half precision, as 0-d tensors."""
    if not tensors:
        return []
    if not any(t.dtype in LOW_PRECISION for t in tensors):
        return list(torch._foreach_norm(tensors))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    low = [i for i, t in enumerate(tensors) if t.dtype in LOW_PRECISION]
    high = [i for i, t in enumerate(tensors) if t.dtype not in LOW_PRECISION]
    for idx, kwargs in ((low, {"dtype": torch.float32}), (high, {})):
        if idx:
            for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, **kwargs)):
                out[i] = n
    return out  # type: ignore[return-value]


def _row_norms(g: torch.Tensor) -> torch.Tensor:
    flat = g if g.dim() == 2 else g.reshape(g.shape[0], -1)
    if g.dtype in LOW_PRECISION:
        return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(flat, dim=1)


def _stack(scalars: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One 1-D tensor of 0-d tensors: a single ``torch.stack`` in the common case (same device)."""
    try:
        return torch.stack(scalars)
    except RuntimeError:  # several devices (model parallel) or odd shapes
        return torch.cat([_to(t, device) for t in scalars])


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.reshape(-1)
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.device == device else t.to(device)


class _Plan:
    """How to reduce one presence pattern of gradients (cached: it rarely changes)."""

    __slots__ = ("has_grad", "order", "present", "rows", "row_idx", "flat_idx", "sparse_idx", "low_flat",
                 "low_params", "row_at", "rest_at", "present_at")

    def __init__(self, tp: TorchParams, grads: list[torch.Tensor | None], present: tuple[int, ...]) -> None:
        params = tp.params
        self.present = list(present)
        self.has_grad = np.zeros(len(params), dtype=bool)
        self.has_grad[self.present] = True
        self.row_idx: list[int] = []
        self.flat_idx: list[int] = []
        self.sparse_idx: list[int] = []
        for i in present:
            g = grads[i]
            assert g is not None
            if g.is_sparse:
                self.sparse_idx.append(i)
            elif tp.unit_rows[i] and g.dim() >= 2 and g.shape[0] > 0:
                self.row_idx.append(i)
            else:
                self.flat_idx.append(i)
        self.order = self.row_idx + self.flat_idx + self.sparse_idx
        self.rows = np.array([params[i].shape[0] for i in self.row_idx], dtype=np.float64)
        self.low_flat = any(grads[i].dtype in LOW_PRECISION for i in self.flat_idx)  # type: ignore[union-attr]
        self.low_params = any(params[i].dtype in LOW_PRECISION for i in self.present)
        self.row_at = np.array(self.row_idx, dtype=np.intp)
        self.rest_at = np.array(self.flat_idx + self.sparse_idx, dtype=np.intp)
        self.present_at = np.array(self.present, dtype=np.intp)


def _plan(tp: TorchParams, grads: list[torch.Tensor | None]) -> _Plan:
    present = tuple(i for i, g in enumerate(grads) if g is not None)
    sparse = tuple(i for i in present if grads[i].is_sparse)  # type: ignore[union-attr]
    cache: dict[Any, _Plan] = tp.__dict__.setdefault("_plans", {})
    key = (present, sparse)
    plan = cache.get(key)
    if plan is None:
        if len(cache) > 32:
            cache.clear()
        plan = cache[key] = _Plan(tp, grads, present)
    return plan


def measure_tensors(
    tp: TorchParams,
    step: int,
    *,
    loss: torch.Tensor | float | None = None,
    lr: float | None = None,
    grad_scale: torch.Tensor | float | None = None,
    param_norms: bool | np.ndarray = True,
    extras: Sequence[torch.Tensor] = (),
) -> tuple[StepStats, list[float]]:
    """:func:`measure`, also moving ``extras`` (0-d tensors) to the host in the same transfer.

    Returns:
        The statistics and the values of ``extras`` as floats.
    """
    params = tp.params
    n = len(params)
    grads: list[torch.Tensor | None] = [p.grad for p in params]
    plan = _plan(tp, grads)
    present = plan.present
    fresh_params = param_norms is True
    device = params[present[0]].device if present else params[0].device
    with torch.no_grad():
        scalars: list[torch.Tensor] = []
        if plan.row_idx:
            # One read of each weight gradient: the L2 norm of every output row (unit). The
            # tensor's norm is the norm of its row norms; its dead units are the rows whose norm
            # is exactly 0, counted by the L0 "norm" (number of non-zeros) of the row norms.
            rows = [_row_norms(grads[i]) for i in plan.row_idx]  # type: ignore[arg-type]
            scalars += torch._foreach_norm(rows)
            scalars += torch._foreach_norm(rows, 0)
            del rows
        flat = [grads[i] for i in plan.flat_idx]
        if flat:
            scalars += _norms(flat) if plan.low_flat else torch._foreach_norm(flat)  # type: ignore[arg-type]
        del flat
        for i in plan.sparse_idx:
            values = grads[i].coalesce().values()  # type: ignore[union-attr]
            kwargs = {"dtype": torch.float32} if values.dtype in LOW_PRECISION else {}
            scalars.append(torch.linalg.vector_norm(values, **kwargs))
        if fresh_params and present:
            weights = [params[i].detach() for i in present]
            scalars += _norms(weights) if plan.low_params else torch._foreach_norm(weights)
        tensor_loss = isinstance(loss, torch.Tensor)
        if isinstance(loss, torch.Tensor):
            scalars.append(loss.detach())
        tensor_scale = isinstance(grad_scale, torch.Tensor)
        if isinstance(grad_scale, torch.Tensor):
            scalars.append(grad_scale)
        scalars += [torch.as_tensor(e) for e in extras]
        host = _stack(scalars, device).cpu().numpy().astype(np.float64) if scalars else np.zeros(0)
    del grads, scalars

    n_rows = len(plan.row_idx)
    grad_norm = np.full(n, np.nan)
    zero_fraction = np.full(n, np.nan)
    pos = 0
    if n_rows:
        grad_norm[plan.row_at] = host[:n_rows]
        zero_fraction[plan.row_at] = 1.0 - host[n_rows:2 * n_rows] / plan.rows
        pos = 2 * n_rows
    n_rest = len(plan.rest_at)
    grad_norm[plan.rest_at] = host[pos:pos + n_rest]
    pos += n_rest
    param_norm: Any = None
    if fresh_params:
        param_norm = np.full(n, np.nan)
        param_norm[plan.present_at] = host[pos:pos + len(present)]
        pos += len(present)
    elif isinstance(param_norms, np.ndarray):
        param_norm = param_norms
    values = host[pos:].tolist()
    loss_value: float | None = None
    if tensor_loss:
        loss_value = values.pop(0)
    elif loss is not None:
        loss_value = float(loss)
    scale_value: float | None = None
    if tensor_scale:
        scale_value = values.pop(0)
    elif grad_scale is not None:
        scale_value = float(grad_scale)
    if scale_value is not None:
        grad_norm /= scale_value
    tail_values = values

    nonfinite = np.zeros(n, dtype=np.int64)
    finite = math.isfinite(float(np.sum(grad_norm[plan.present_at]))) if present else True
    if not finite or (loss_value is not None and not math.isfinite(loss_value)):
        # The rare path: count non-finite values, and measure the parameters now whatever the
        # caller asked, so that non-finite parameters are seen (a rollback needs to know).
        bad = [i for i in present if not math.isfinite(grad_norm[i])]
        if bad:
            _count_nonfinite(tp, bad, grad_norm, nonfinite, scale_value)
        if not fresh_params and param_norms is not False and present:
            with torch.no_grad():
                now = torch.stack(_norms([params[i].detach() for i in present])).cpu().numpy()
            param_norm = np.full(n, np.nan) if param_norm is None else param_norm.copy()
            param_norm[present] = now
    stats = StepStats(
        step=step,
        layout=tp.layout,
        grad_norm=grad_norm,
        param_norm=param_norm,
        nonfinite=nonfinite,
        zero_fraction=zero_fraction,
        has_grad=plan.has_grad.copy(),
        loss=loss_value,
        lr=lr,
    )
    return stats, tail_values


def _count_nonfinite(
    tp: TorchParams,
    bad: list[int],
    grad_norm: np.ndarray,
    nonfinite: np.ndarray,
    scale: float | None,
) -> None:
    """The rare path: count non-finite elements where a norm is non-finite; recompute in float64
    the norms that only overflowed float32."""
    with torch.no_grad():
        counts = []
        for i in bad:
            g = tp.params[i].grad
            assert g is not None
            values = g.coalesce().values() if g.is_sparse else g
            counts.append((~torch.isfinite(values)).sum())
        host = torch.stack(counts).cpu().tolist()
        for i, c in zip(bad, host):
            nonfinite[i] = int(c)
            if c == 0:  # finite values whose float32 norm overflowed
                g = tp.params[i].grad
                assert g is not None
                values = g.coalesce().values() if g.is_sparse else g
                norm = float(torch.linalg.vector_norm(values.double()).cpu())
                grad_norm[i] = norm / (scale if scale is not None else 1.0)


def measure(
    tp: TorchParams,
    step: int,
    *,
    loss: torch.Tensor | float | None = None,
    lr: float | None = None,
    grad_scale: torch.Tensor | float | None = None,
    param_norms: bool | np.ndarray = True,
) -> StepStats:
    """Measure the gradients of ``tp.params`` as they are now, in one host transfer.

    Call it where the optimizer is about to read the gradients: after ``backward()`` (and DDP's
    averaging), after ``GradScaler.unscale_``, before any clipping.

    Args:
        tp: The parameters and layout from :func:`build_layout`.
        step: The optimizer step number to record.
        loss: The step's loss, a tensor (moved in the same transfer) or a float. Defaults to None.
        lr: The learning rate in force, for the record. Defaults to None.
        grad_scale: Divide the gradient norms by this loss scale, for gradients that are still
            scaled (fused optimizers under ``GradScaler``). Defaults to None (unscaled).
        param_norms: True: measure the parameter norms (the vanishing detector compares
            ``||g|| / ||W||``; non-finite parameters call for a rollback). False: do not. An array
            (one value per tensor, from an earlier step): use it as they are, except on a step with
            a non-finite gradient or loss, where they are measured anyway. Defaults to True.

    Returns:
        The step's statistics.

    Example:
        >>> import torch
        >>> from gradwatch.integrations.torch import build_layout, measure
        >>> model = torch.nn.Linear(3, 2)
        >>> model(torch.ones(4, 3)).sum().backward()
        >>> stats = measure(build_layout(model), step=0)
        >>> stats.has_grad.tolist(), bool(stats.finite)
        ([True, True], True)
    """
    stats, _ = measure_tensors(tp, step, loss=loss, lr=lr, grad_scale=grad_scale, param_norms=param_norms)
    return stats


__all__ = ["measure", "measure_tensors"]
