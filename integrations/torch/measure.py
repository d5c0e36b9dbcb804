"""Measure one optimizer step of a PyTorch model: reductions on the device, one host transfer.

:func:`measure` reads every gradient once and returns a :class:`gradwatch.StepStats`:

* weight tensors (two or more dimensions): the L2 norm of each output row (unit) with
  ``torch.linalg.vector_norm(g.flatten(1), dim=1)``. The tensor's norm is the norm of its row norms
  (one ``_foreach_norm``), and its dead units are the rows whose norm is exactly 0, counted by the
  L0 "norm" (number of non-zeros) of the row norms (one more ``_foreach_norm``, on a few KB). One
  read of the gradient gives both: counting zero rows tensor by tensor with ``(g == 0).all(1)``
  costs about 10x more.
* dead units, followed one by one: every unit keeps a count of measured steps in a row with an
  exactly zero row norm (one int32 per unit, reset where the row is non-zero, left as it is on a
  step whose gradient is zero everywhere: a converged batch). The units whose count reaches
  :data:`gradwatch.stats.UNIT_STREAK` are counted per tensor (``StepStats.dead_fraction``): with
  batches of a sample or two the per-step share of zero rows is high in a healthy ReLU layer, but
  not for the same units. On an accelerator the counts live on the device (a handful of
  element-wise ops on all the row norms at once, no extra transfer); on the CPU, where every torch
  op costs its dispatch (about 15 us each in a real step, 0.2 ms for the handful), the row norms
  join the one transfer and the counts are kept in numpy.
* other dense tensors (biases, normalisation scales, embeddings): one ``torch._foreach_norm``.
* sparse gradients (``nn.Embedding(sparse=True)``): coalesced, the norm of the values.
* fp16/bf16 gradients and parameters: norms accumulated in float32.
* parameter norms: one ``torch._foreach_norm`` (the vanishing detector compares ``||g|| / ||W||``).
* small tensors (at most :data:`SMALL` elements) that share a shape — the biases, norms and
  narrow layers of a deep model — are stacked and reduced in one op per shape: for them the cost
  is the per-op dispatch (a few microseconds per tensor on a CPU), not the read.

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

from gradwatch.stats import UNIT_STREAK, StepStats

from .layout import TorchParams

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


HOST_UNITS = True
"""On the CPU, keep the units' zero-gradient streaks in numpy (False: on the device, as on an
accelerator; the tests compare the two)."""

SMALL = 1 << 16
"""Tensors of at most this many elements that share a shape are stacked and reduced in one op:
for them the cost is the per-op dispatch, not the read (a model with many small layers)."""


def _groups(indices: list[int], tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[list[int]]]:
    """Split ``indices`` into singles and groups of >= 2 small tensors of the same shape, dtype
    and device."""
    by_key: dict[Any, list[int]] = {}
    singles: list[int] = []
    for i in indices:
        t = tensors[i]
        if t.numel() <= SMALL:
            by_key.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
        else:
            singles.append(i)
    groups = []
    for members in by_key.values():
        if len(members) >= 2:
            groups.append(members)
        else:
            singles += members
    return sorted(singles), groups


class _Plan:
    """How to reduce one presence pattern of gradients (cached: it rarely changes).

    The host vector is laid out as: per-tensor scalars (grad norms, non-zero row counts), the
    per-tensor parameter norms (when measured), the caller's scalars (loss, scale, extras), then the
    grouped vectors (grad norms and non-zero row counts of stacked groups), then the grouped
    parameter norms (when measured).
    """

    def __init__(self, tp: TorchParams, grads: list[torch.Tensor | None], present: tuple[int, ...],
                 host_units: bool) -> None:
        params = tp.params
        n = len(params)
        self.present = list(present)
        self.present_at = np.array(self.present, dtype=np.intp)
        self.has_grad = np.zeros(n, dtype=bool)
        self.has_grad[self.present] = True
        dense: list[torch.Tensor] = [g if g is not None else params[i] for i, g in enumerate(grads)]
        row_idx: list[int] = []
        flat_idx: list[int] = []
        self.sparse_idx: list[int] = []
        for i in present:
            g = grads[i]
            assert g is not None
            if g.is_sparse:
                self.sparse_idx.append(i)
            elif tp.unit_rows[i] and g.dim() >= 2 and g.shape[0] > 0:
                row_idx.append(i)
            else:
                flat_idx.append(i)
        self.row_single, self.row_groups = _groups(row_idx, dense)
        self.flat_single, self.flat_groups = _groups(flat_idx, dense)
        self.param_single, self.param_groups = _groups(self.present, params)
        self.low_flat = any(dense[i].dtype in LOW_PRECISION for i in self.flat_single)
        self.low_params = any(params[i].dtype in LOW_PRECISION for i in self.param_single)
        self.group_rows = [int(dense[members[0]].shape[0]) for members in self.row_groups]
        # Where each number lands: (positions in the block, tensor indices).
        k = len(self.row_single)
        self.scalar_grad = self.row_single + self.flat_single + self.sparse_idx
        self.scalar_grad_pos = np.array(list(range(k)) + list(range(2 * k, 2 * k + len(self.flat_single) + len(self.sparse_idx))), dtype=np.intp)
        self.scalar_zero_pos = np.arange(k, 2 * k, dtype=np.intp)
        self.n_scalars = 2 * k + len(self.flat_single) + len(self.sparse_idx)
        vec_grad: list[int] = []
        vec_grad_pos: list[int] = []
        vec_zero: list[int] = []
        vec_zero_pos: list[int] = []
        pos = 0
        for members in self.row_groups:
            vec_grad += members
            vec_grad_pos += range(pos, pos + len(members))
            vec_zero += members
            vec_zero_pos += range(pos + len(members), pos + 2 * len(members))
            pos += 2 * len(members)
        for members in self.flat_groups:
            vec_grad += members
            vec_grad_pos += range(pos, pos + len(members))
            pos += len(members)
        # Dead-unit counts, one per row tensor (singles, then the groups' members), after the
        # groups' vectors; the per-unit streaks they come from follow the same order.
        unit_tensors = self.row_single + [i for members in self.row_groups for i in members]
        self.dead_at = np.array(unit_tensors, dtype=np.intp)
        unit_rows = [int(dense[i].shape[0]) for i in unit_tensors]
        self.unit_rows = unit_rows
        """Per row tensor of ``dead_at``, its number of units (rows)."""
        self.host_units = host_units
        """True: the row norms cross to the host and the streaks are kept in numpy (on the CPU)."""
        if host_units:  # every row norm, in the order of ``dead_at``
            self.unit_starts = np.cumsum([0] + unit_rows[:-1], dtype=np.intp)
            self.dead_pos = np.arange(pos, pos + sum(unit_rows), dtype=np.intp)
        else:  # one count per row tensor
            self.dead_pos = np.arange(pos, pos + len(unit_tensors), dtype=np.intp)
        pos += len(self.dead_pos)
        self.n_vector = pos
        self.streak: torch.Tensor | np.ndarray | None = None
        """Per unit (row), measured steps in a row with an exactly-zero gradient (on the device, or
        in numpy with ``host_units``)."""
        self.longest: torch.Tensor | np.ndarray | None = None
        """Per row tensor of ``dead_at``, the longest streak one of its units came back from: a
        unit counts as dead only past it (see :func:`_dead_units`)."""
        self.unit_segments: torch.Tensor | None = None
        """Per unit, the position of its tensor in ``dead_at`` (on the device, built once)."""
        saved: dict[str, list[int]] = tp.__dict__.get("_saved_streaks", {})
        self.start_streaks = [saved.get(tp.layout.names[i], []) for i in unit_tensors]
        """Per row tensor of ``dead_at``, the streaks to start from (:func:`load_unit_streaks`;
        empty: from 0)."""
        self.vec_grad = np.array(vec_grad, dtype=np.intp)
        self.vec_grad_pos = np.array(vec_grad_pos, dtype=np.intp)
        self.vec_zero = np.array(vec_zero, dtype=np.intp)
        self.vec_zero_pos = np.array(vec_zero_pos, dtype=np.intp)
        self.scalar_grad_at = np.array(self.scalar_grad, dtype=np.intp)
        self.scalar_zero_at = np.array(self.row_single, dtype=np.intp)
        self.param_group_at = np.array([i for g in self.param_groups for i in g], dtype=np.intp)
        self.param_single_at = np.array(self.param_single, dtype=np.intp)
        rows = np.ones(n)
        for i in row_idx:
            rows[i] = params[i].shape[0]
        self.rows = rows
        self.dead_rows = rows[self.dead_at]
        self._gathers: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray, np.ndarray | None, slice]] = {}

    def gather(self, n_tail: int, fresh_params: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, slice]:
        """Where, in the host vector with a NaN appended, each tensor's gradient norm, non-zero
        row count and parameter norm (None unless measured) are, and the slice of the dead-unit
        numbers; for ``n_tail`` caller's scalars. Missing entries point at the NaN (-1)."""
        key = (n_tail, fresh_params)
        cached = self._gathers.get(key)
        if cached is None:
            n = len(self.has_grad)
            grad = np.full(n, -1, dtype=np.intp)
            zero = np.full(n, -1, dtype=np.intp)
            grad[self.scalar_grad_at] = self.scalar_grad_pos
            zero[self.scalar_zero_at] = self.scalar_zero_pos
            n_fixed = self.n_scalars + (len(self.param_single) if fresh_params else 0)
            base = n_fixed + n_tail  # where the vectors start
            grad[self.vec_grad] = base + self.vec_grad_pos
            zero[self.vec_zero] = base + self.vec_zero_pos
            param = None
            if fresh_params:
                param = np.full(n, -1, dtype=np.intp)
                param[self.param_single_at] = self.n_scalars + np.arange(len(self.param_single))
                param[self.param_group_at] = base + self.n_vector + np.arange(len(self.param_group_at))
            dead = slice(base + int(self.dead_pos[0]), base + int(self.dead_pos[-1]) + 1) if len(self.dead_pos) else slice(0, 0)
            cached = self._gathers[key] = (grad, zero, param, dead)
        return cached


def _plan(tp: TorchParams, grads: list[torch.Tensor | None]) -> _Plan:
    present = tuple(i for i, g in enumerate(grads) if g is not None)
    sparse = tuple(i for i in present if grads[i].is_sparse)  # type: ignore[union-attr]
    cache: dict[Any, _Plan] = tp.__dict__.setdefault("_plans", {})
    host_units = HOST_UNITS and (grads[present[0]] if present else tp.params[0]).device.type == "cpu"  # type: ignore[union-attr]
    key = (present, sparse, host_units)
    plan = cache.get(key)
    if plan is None:
        if len(cache) > 32:
            cache.clear()
        plan = cache[key] = _Plan(tp, grads, present, host_units)
    return plan


def _stacked_norms(tensors: list[torch.Tensor], rows: int = 0) -> torch.Tensor:
    """Norms of a group of same-shape tensors in one op: per tensor ``[k]``, or with ``rows`` per
    row ``[k, rows]``."""
    stacked = torch.stack(tensors)
    kwargs = {"dtype": torch.float32} if stacked.dtype in LOW_PRECISION else {}
    if rows:
        return torch.linalg.vector_norm(stacked.reshape(len(tensors), rows, -1), dim=2, **kwargs)
    return torch.linalg.vector_norm(stacked.reshape(len(tensors), -1), dim=1, **kwargs)


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
        units: list[torch.Tensor] = []  # every row norm, for the dead-unit streaks
        if plan.row_single:
            # One read of each weight gradient: the L2 norm of every output row (unit). The
            # tensor's norm is the norm of its row norms; its dead units are the rows whose norm
            # is exactly 0, counted by the L0 "norm" (number of non-zeros) of the row norms.
            rows = [_row_norms(grads[i]) for i in plan.row_single]  # type: ignore[arg-type]
            scalars += torch._foreach_norm(rows)
            scalars += torch._foreach_norm(rows, 0)
            units += rows
            del rows
        others: list[torch.Tensor] = []  # the norms of the gradients that are not row tensors
        if plan.flat_single:
            flat = [grads[i] for i in plan.flat_single]
            others += _norms(flat) if plan.low_flat else torch._foreach_norm(flat)  # type: ignore[arg-type]
            scalars += others
            del flat
        for i in plan.sparse_idx:
            values = grads[i].coalesce().values()  # type: ignore[union-attr]
            kwargs = {"dtype": torch.float32} if values.dtype in LOW_PRECISION else {}
            scalars.append(torch.linalg.vector_norm(values, **kwargs))
            others.append(scalars[-1])
        if fresh_params and plan.param_single:
            weights = [params[i] for i in plan.param_single]  # under no_grad: no detach needed
            scalars += _norms(weights) if plan.low_params else torch._foreach_norm(weights)
        n_fixed = len(scalars)
        tensor_loss = isinstance(loss, torch.Tensor)
        if isinstance(loss, torch.Tensor):
            scalars.append(loss.detach())
        tensor_scale = isinstance(grad_scale, torch.Tensor)
        if isinstance(grad_scale, torch.Tensor):
            scalars.append(grad_scale)
        scalars += [torch.as_tensor(e) for e in extras]
        vectors: list[torch.Tensor] = []
        for group, n_rows in zip(plan.row_groups, plan.group_rows):
            row_norms = _stacked_norms([grads[i] for i in group], n_rows)  # type: ignore[misc]
            vectors += [torch.linalg.vector_norm(row_norms, dim=1), torch.linalg.vector_norm(row_norms, 0, dim=1)]
            units.append(row_norms.reshape(-1))
        for group in plan.flat_groups:
            vectors.append(_stacked_norms([grads[i] for i in group]))  # type: ignore[misc]
            others.append(vectors[-1])
        if units:
            vectors.append(torch.cat([u.reshape(-1) for u in units]) if plan.host_units
                           else _dead_units(plan, units, device, others))
        del others
        del units
        if fresh_params:
            vectors += [_stacked_norms([params[i] for i in group]) for group in plan.param_groups]
        n_tail = len(scalars) - n_fixed
        parts = ([_stack(scalars, device)] if scalars else []) + [_to(v, device) for v in vectors]
        moved = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().numpy() if parts else np.zeros(0)
    del grads, scalars, vectors, parts
    # float64, with one NaN after the end: every "not measured" entry gathers it (index -1).
    host = np.empty(moved.size + 1)
    host[:-1] = moved
    host[-1] = np.nan
    at_grad, at_zero, at_param, at_dead = plan.gather(n_tail, fresh_params)
    grad_norm = host[at_grad]
    zero_fraction = 1.0 - host[at_zero] / plan.rows  # NaN where rows are not counted
    param_norm: Any = host[at_param] if at_param is not None else None
    if not fresh_params and isinstance(param_norms, np.ndarray):
        param_norm = param_norms
    values = host[n_fixed:n_fixed + n_tail].tolist()
    dead_fraction = np.full(n, np.nan)
    if len(plan.dead_at):
        dead = (_host_dead_units(plan, host[at_dead], float(np.sum(grad_norm[plan.present_at])))
                if plan.host_units else host[at_dead])
        dead_fraction[plan.dead_at] = dead / plan.dead_rows
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
                now = torch.stack(_norms([params[i] for i in present])).cpu().numpy()
            param_norm = np.full(n, np.nan) if param_norm is None else param_norm.copy()
            param_norm[plan.present_at] = now
    stats = StepStats(
        step=step,
        layout=tp.layout,
        grad_norm=grad_norm,
        param_norm=param_norm,
        nonfinite=nonfinite,
        zero_fraction=zero_fraction,
        dead_fraction=dead_fraction,
        has_grad=plan.has_grad.copy(),
        loss=loss_value,
        lr=lr,
    )
    return stats, tail_values


def _start_streaks(plan: _Plan) -> list[int]:
    return [v for part, k in zip(plan.start_streaks, plan.unit_rows) for v in (part[:k] if len(part) in (k, k + 1) else [0] * k)]


def _start_longest(plan: _Plan) -> list[int]:
    """Per row tensor, the longest streak a unit came back from, as saved (0 when not saved)."""
    return [part[k] if len(part) == k + 1 else 0 for part, k in zip(plan.start_streaks, plan.unit_rows)]


def _host_dead_units(plan: _Plan, rows: np.ndarray, total: float) -> np.ndarray:
    """:func:`_dead_units` in numpy, from the row norms that crossed in the transfer (on the CPU);
    ``total``: the sum of every gradient's norm."""
    streak, longest = plan.streak, plan.longest
    if not isinstance(streak, np.ndarray) or streak.shape != rows.shape or not isinstance(longest, np.ndarray):
        streak = plan.streak = np.array(_start_streaks(plan), dtype=np.int32)
        longest = plan.longest = np.array(_start_longest(plan), dtype=np.int32)
    if total > 0:  # as on the device: a step with no gradient anywhere leaves the streaks alone
        back = np.where(rows != 0, streak, 0)
        np.maximum(longest, np.maximum.reduceat(back, plan.unit_starts), out=longest)
        streak += 1
        np.multiply(streak, rows == 0, out=streak)
    limit = np.repeat(np.maximum(longest + 1, UNIT_STREAK), plan.unit_rows)
    return np.add.reduceat(streak >= limit, plan.unit_starts, dtype=np.float64)


def _dead_units(plan: _Plan, units: list[torch.Tensor], device: torch.device,
                others: list[torch.Tensor]) -> torch.Tensor:
    """Advance every unit's zero-gradient streak by this step's row norms (on the device, no sync)
    and count, per row tensor, the units that are dead: a streak of :data:`UNIT_STREAK` or more,
    and longer than any streak a unit of the same tensor came back from (with batches of a sample
    or two, a healthy ReLU unit that fires on a tenth of the samples is off ten steps in a row
    every so often; one that never comes back outlasts them all)."""
    rows = torch.cat([_to(u, device) for u in units])
    streak, longest = plan.streak, plan.longest
    if (not isinstance(streak, torch.Tensor) or streak.shape != rows.shape or streak.device != rows.device
            or not isinstance(longest, torch.Tensor)):
        streak = plan.streak = torch.tensor(_start_streaks(plan), dtype=torch.int32, device=rows.device)
        longest = plan.longest = torch.tensor(_start_longest(plan), dtype=torch.int32, device=rows.device)
        plan.unit_segments = torch.repeat_interleave(torch.arange(len(plan.dead_at), device=rows.device),
                                                     torch.tensor(plan.unit_rows, device=rows.device))
    # A step with no gradient anywhere (a batch fitted to zero loss) says nothing about units: the
    # streaks stay as they are (so does a non-finite step: its sum is NaN). Anywhere, not only in
    # the row tensors: when a whole layer is dead, every weight before and after it gets zero
    # gradient too, and only the output bias still learns (as in Keras: the global norm).
    pieces = [rows] + [_to(o, rows.device).reshape(-1) for o in others]
    live = torch.cat(pieces).sum() > 0 if len(pieces) > 1 else rows.sum() > 0
    zero = rows == 0
    back = torch.where(live & ~zero, streak, 0)
    longest = longest.scatter_reduce(0, plan.unit_segments, back, "amax")  # type: ignore[arg-type]
    streak = torch.where(live, torch.where(zero, streak + 1, 0), streak)
    plan.longest, plan.streak = longest, streak
    limit = (longest + 1).clamp_min(UNIT_STREAK)[plan.unit_segments]
    dead = (streak >= limit).float()
    counts = torch.zeros(len(plan.dead_at), device=rows.device)
    return counts.index_add_(0, plan.unit_segments, dead)  # type: ignore[arg-type]


def unit_streaks(tp: TorchParams) -> dict[str, list[int]]:
    """Every followed unit's zero-gradient streak, by parameter name, then the longest streak a
    unit of that tensor came back from (for a state dict: a resumed run continues the same
    counts)."""
    out: dict[str, list[int]] = dict(tp.__dict__.get("_saved_streaks", {}))
    for plan in tp.__dict__.get("_plans", {}).values():
        if plan.streak is None:
            continue
        values = plan.streak.tolist() if isinstance(plan.streak, np.ndarray) else plan.streak.cpu().tolist()
        longest = plan.longest.tolist() if isinstance(plan.longest, np.ndarray) else plan.longest.cpu().tolist()
        at = 0
        for j, (i, k) in enumerate(zip(plan.dead_at, plan.unit_rows)):
            out[tp.layout.names[i]] = values[at:at + k] + [int(longest[j])]
            at += k
    return out


def load_unit_streaks(tp: TorchParams, saved: dict[str, list[int]]) -> None:
    """Start the units' streaks from :func:`unit_streaks` of an earlier run (names that are not
    parameters of ``tp`` are ignored)."""
    names = set(tp.layout.names)
    tp.__dict__["_saved_streaks"] = {name: [int(v) for v in values] for name, values in saved.items() if name in names}
    tp.__dict__.pop("_plans", None)  # plans built from now on start from the saved streaks


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


__all__ = ["load_unit_streaks", "measure", "measure_tensors", "unit_streaks"]
