"""Distributed PyTorch (DDP, FSDP, FSDP2): one measurement and one decision for all ranks.

:class:`DistributedMeasure` replaces :func:`gradwatch.integrations.torch.measure` when
``torch.distributed`` is initialised with more than one rank. Every rank reduces its own part of
the gradients on the device, then ONE ``all_reduce(SUM)`` of a small float64 vector makes the
numbers global, so every rank hands identical :class:`gradwatch.StepStats` to its monitor and
gets the identical decision back (skip, clip, LR factor, rollback). The vector holds, per
parameter tensor:

* the squared L2 norm of the local gradient, times the tensor's *weight*: 1 for the shards of a
  sharded tensor (FSDP2 ``Shard(0)`` DTensors, FSDP1 flat shards), ``1 / replicas`` for a tensor
  every rank holds in full (DDP gradients, already averaged, or a ``Replicate`` DTensor mesh
  dimension). The sum over ranks is the squared global norm;
* the number of non-zero output rows (units), weighted likewise: ``Shard(0)`` splits a weight by
  rows, so rows counted on each rank add up to the tensor's rows (other placements: not counted);
* whether the gradient exists (a parameter unused on one rank is still used globally);
* the squared parameter norm, on the steps that measure parameter norms;

then the sum of the losses recorded with ``record_loss`` and how many ranks recorded one (the loss
is the mean over ranks; a NaN loss on one rank is NaN everywhere), and one "gradwatch is ok" flag
per rank.

A NaN or Inf on any rank makes the reduced norm non-finite on every rank, so every rank takes the
rare path together: a second collective counts the non-finite elements. A rank whose own
measurement raises still takes part in the collective, with its flag at 0: every rank sees it in
the reduced vector, the error messages are gathered with ``all_gather_object`` and all ranks stop
monitoring at the same step (rank 0 warns once, naming the failing ranks). Failures after the
collective (the monitor, a remedy) are deferred to the next measured step the same way. No rank
ever waits in a collective the others will not reach.

Only rank 0 emits events: the monitors of the other ranks get :class:`RankZeroHooks` that still
run the detectors and ``gradwatch_select_actions`` (decisions must match) but not the output hooks
(``on_step``, ``on_finding``, ``on_action``, ``on_report``: sinks, logs, reports).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gradwatch.errors import GradwatchWarning
from gradwatch.plugins import Hooks
from gradwatch.stats import StepStats

from .layout import TorchParams
from .measure import LOW_PRECISION, _norms

try:  # DTensor (FSDP2, tensor parallel); absent from very old torch builds
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch < 2.4
    DTensor = Partial = Replicate = Shard = None  # type: ignore[assignment,misc]


def active(distributed: bool | None) -> bool:
    """Whether a watch should measure across ranks.

    Args:
        distributed: The user's choice: True, False or None (automatic: True when
            ``torch.distributed`` is initialised with more than one rank).

    Returns:
        True to use :class:`DistributedMeasure`.

    Raises:
        RuntimeError: for ``distributed=True`` without an initialised process group.
    """
    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return bool(ready and dist.get_world_size() > 1)
    if distributed and not ready:
        raise RuntimeError(
            "gradwatch.watch(..., distributed=True) needs torch.distributed initialised "
            "(torch.distributed.init_process_group) before the watch is created. "
            "Received an uninitialised default process group; call init_process_group first or "
            "pass distributed=None."
        )
    return bool(distributed)


def is_rank_zero() -> bool:
    """True on rank 0 of the default group, and in a process that is not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RankZeroHooks(Hooks):
    """The plugin hooks of a monitor on rank ``rank``: on ranks other than 0 the output hooks
    (``on_step``, ``on_finding``, ``on_action``, ``on_report``) are not called, so sinks, logs and
    reports come from rank 0 alone. Detectors and ``select_actions`` run on every rank: the
    decisions must be the same everywhere.

    Args:
        manager: The plugin manager of the monitor's current hooks.
        rank: This process's rank.
    """

    def __init__(self, manager: Any, rank: int) -> None:
        super().__init__(manager)
        self.rank = rank

    @property
    def speaks(self) -> bool:
        return self.rank == 0

    def on_step(self, stats: Any, decision: Any, monitor: Any) -> None:
        if self.rank == 0:
            super().on_step(stats, decision, monitor)

    def on_finding(self, finding: Any, monitor: Any) -> None:
        if self.rank == 0:
            super().on_finding(finding, monitor)

    def on_action(self, action: Any, monitor: Any) -> None:
        if self.rank == 0:
            super().on_action(action, monitor)

    def on_report(self, report: Any, monitor: Any = None) -> None:
        if self.rank == 0:
            super().on_report(report, monitor)


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def fsdp1_weights(model: torch.nn.Module | None, world: int) -> dict[int, float]:
    """The weights of the parameters FSDP1 (``FullyShardedDataParallel``) shards, by ``id``.

    FSDP1 parameters are plain tensors holding this rank's shard (a flat parameter, or with
    ``use_orig_params=True`` views into it): each element lives on ``world / shards`` ranks, so
    its local sums weigh ``shards / world`` (1 for ``FULL_SHARD``, ``1 / world`` for
    ``NO_SHARD``, the intra-node share for hybrid sharding).

    Args:
        model: The watched model (None: no FSDP1).
        world: The number of ranks.

    Returns:
        ``{id(param): weight}`` for every parameter an FSDP1 module manages.
    """
    if model is None:
        return {}
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    except ImportError:  # pragma: no cover - torch without FSDP
        return {}
    weights: dict[int, float] = {}
    for module in model.modules():  # outer modules first: an inner FSDP unit overrides
        if isinstance(module, FullyShardedDataParallel):
            if module.sharding_strategy == ShardingStrategy.NO_SHARD:
                shards = 1
            else:
                shards = dist.get_world_size(module.process_group)
            for p in module.parameters():
                weights[id(p)] = shards / world
    return weights


def _weight_and_rows(t: torch.Tensor, world: int, sharded: float | None = None) -> tuple[float, bool, torch.Tensor]:
    """How a tensor is spread over the ranks: (weight of its local sums, whether its rows can be
    counted per rank, the local tensor to reduce). ``sharded``: the FSDP1 weight of a plain
    tensor that holds a shard."""
    if not _is_dtensor(t):
        if sharded is not None:
            return sharded, False, t  # a flat shard: rows are not whole
        return 1.0 / world, True, t
    d: Any = t
    placements = d.placements
    mesh = d.device_mesh
    if any(isinstance(p, Partial) for p in placements):
        # Unreduced partial sums: make them whole first (rare for gradients; FSDP2 reduce-scatters).
        return 1.0 / world, True, d.full_tensor()
    if mesh.size() != world:
        raise ValueError(
            "gradwatch measures a DTensor across the default process group, so its device mesh "
            f"must span every rank. Received a mesh of {mesh.size()} ranks in a world of {world}; "
            "watch with distributed=False and reduce across the mesh yourself, or file an issue."
        )
    replicas = 1
    rows = True
    for dim, p in enumerate(placements):
        if isinstance(p, Replicate):
            replicas *= mesh.size(dim)
        elif isinstance(p, Shard) and p.dim != 0:
            rows = False  # a row split across ranks: its zero-ness is not a sum of counts
    return 1.0 / replicas, rows, d.to_local()


class DistributedMeasure:
    """Measure one optimizer step across all ranks with one collective (see the module docstring).

    Args:
        group: The process group. Defaults to None (the default group).
        model: The watched model, to find the parameters FSDP1 shards. Defaults to None.

    Attributes:
        rank: This process's rank.
        world: The number of ranks.
        pending: An error raised inside gradwatch on this rank after the last collective; it is
            announced to the other ranks at the next one.
    """

    def __init__(self, group: Any = None, model: torch.nn.Module | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.sharded = fsdp1_weights(model, self.world)
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.pending: BaseException | None = None
        self.owed = False
        self.broken = False

    def _all_reduce(self, vec: torch.Tensor) -> torch.Tensor:
        """``all_reduce(SUM)`` in place; a collective that raises (a timeout, a dead rank) marks
        the group broken, so that gradwatch never waits on it again."""
        try:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.group)
        except Exception:
            self.broken = True
            raise
        return vec

    def owe(self) -> None:
        """Mark the start of a measured step: this rank owes the step's collective from now on,
        even if it fails before reaching :meth:`measure`."""
        self.owed = True

    def fail(self, exc: BaseException, n: int) -> bool:
        """A failure inside gradwatch on this rank.

        Before the step's collective (:meth:`owe` was called), the rank takes part in it now,
        flagged, and every rank stops; otherwise the failure is announced at the next collective.

        Args:
            exc: The error.
            n: The number of measured tensors (the size of the collective).

        Returns:
            True when monitoring stopped now (on every rank), False when deferred.
        """
        if self.pending is None:
            self.pending = exc
        if not self.broken and not self.owed:
            return False
        if not self.broken:
            self.owed = False
            try:
                vec = self._all_reduce(torch.zeros(self._size(n), dtype=torch.float64, device=self.device))
                self._stop_all(self.pending, vec.cpu().numpy()[4 * n + 2:])
                return True
            except Exception as collective_error:  # never raise into the training loop
                exc = collective_error
        # The collective itself failed (a timeout, a dead rank): the other ranks see it too.
        warnings.warn(
            GradwatchWarning(
                f"gradwatch stopped monitoring on rank {self.rank}: its collective failed "
                f"({type(exc).__name__}: {exc}); training goes on unchanged."
            ),
            stacklevel=5,
        )
        return True

    def _countable(self, tp: TorchParams) -> list[bool]:
        """Per tensor, whether its dead units are counted: weights whose rows are whole on each
        rank (plain, ``Replicate`` or ``Shard(0)``). From the parameters, so the same on every
        rank whatever gradients a rank holds."""
        cached = getattr(self, "_countable_for", None)
        if cached is not None and cached[0] is tp:
            return cached[1]
        out = []
        for i, p in enumerate(tp.params):
            if _is_dtensor(p):
                whole = not any(isinstance(pl, Shard) and pl.dim != 0 for pl in p.placements)  # type: ignore[attr-defined]
            else:
                whole = id(p) not in self.sharded
            out.append(bool(tp.unit_rows[i]) and p.dim() >= 2 and whole)
        self._countable_for = (tp, out)
        return out

    def _size(self, n: int) -> int:
        return 4 * n + 2 + self.world

    def _local(
        self, tp: TorchParams, loss: Any, fresh_params: bool
    ) -> tuple[torch.Tensor, list[bool], np.ndarray]:
        """This rank's part of the vector (on :attr:`device`), which rows are countable, and the
        per-tensor weights."""
        params = tp.params
        n = len(params)
        weights = np.full(n, 1.0 / self.world)
        countable = self._countable(tp)
        grad_sq: list[torch.Tensor] = []
        rows_nz: list[torch.Tensor] = []
        present = torch.zeros(n, dtype=torch.float64)
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            dense: list[torch.Tensor] = []
            dense_at: list[int] = []
            row_parts: list[torch.Tensor] = []
            row_at: list[int] = []
            scalars: list[torch.Tensor] = [zero] * n
            nonzero: list[torch.Tensor] = [zero] * n
            for i, p in enumerate(params):
                g = p.grad
                if g is None:
                    continue
                w, rows_ok, local = _weight_and_rows(g, self.world, self.sharded.get(id(p)))
                weights[i] = w
                present[i] = w
                if local.is_sparse:
                    values = local.coalesce().values()
                    kwargs = {"dtype": torch.float32} if values.dtype in LOW_PRECISION else {}
                    scalars[i] = torch.linalg.vector_norm(values, **kwargs)
                elif countable[i]:
                    if not rows_ok or local.dim() < 2:
                        raise ValueError(
                            f"gradwatch counts the rows of {tp.layout.names[i]!r} per rank, but its "
                            f"gradient is not split by rows (local shape {tuple(local.shape)}); "
                            "watch with distributed=False or file an issue."
                        )
                    if local.shape[0] == 0:  # an empty shard (more ranks than rows)
                        continue
                    flat = local.reshape(local.shape[0], -1)
                    kwargs = {"dtype": torch.float32} if flat.dtype in LOW_PRECISION else {}
                    row_parts.append(torch.linalg.vector_norm(flat, dim=1, **kwargs))
                    row_at.append(i)
                else:
                    dense.append(local)
                    dense_at.append(i)
            if row_parts:
                for i, norm, nz in zip(row_at, torch._foreach_norm(row_parts), torch._foreach_norm(row_parts, 0)):
                    scalars[i], nonzero[i] = norm, nz
            for i, norm in zip(dense_at, _norms(dense)):
                scalars[i] = norm
            grad_sq = [s.to(self.device, torch.float32) for s in scalars]
            rows_nz = [s.to(self.device, torch.float32) for s in nonzero]
            param_sq: list[torch.Tensor] = [zero] * n
            if fresh_params:
                locals_ = [_weight_and_rows(p, self.world, self.sharded.get(id(p))) for p in params]
                for i, norm in enumerate(_norms([loc for _, _, loc in locals_])):
                    param_sq[i] = norm.to(self.device, torch.float32)
                p_weights = torch.tensor([w for w, _, _ in locals_], dtype=torch.float64, device=self.device)
            else:
                p_weights = torch.zeros(n, dtype=torch.float64, device=self.device)
            w_t = torch.as_tensor(weights, dtype=torch.float64, device=self.device)
            g_vec = torch.stack(grad_sq).double().square() * w_t
            z_vec = torch.stack(rows_nz).double() * w_t
            p_vec = torch.stack(param_sq).double().square() * p_weights
            if loss is None:
                loss_part = torch.zeros(2, dtype=torch.float64, device=self.device)
            else:
                value = loss.detach().reshape(()).to(self.device, torch.float64) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss), dtype=torch.float64, device=self.device)
                loss_part = torch.stack([value, torch.ones((), dtype=torch.float64, device=self.device)])
            ok = torch.zeros(self.world, dtype=torch.float64, device=self.device)
            ok[self.rank] = 1.0
            vec = torch.cat([g_vec, z_vec, present.to(self.device), p_vec, loss_part, ok])
        return vec, countable, weights

    def measure(
        self,
        tp: TorchParams,
        step: int,
        *,
        loss: Any = None,
        lr: float | None = None,
        grad_scale: Any = None,
        param_norms: bool | np.ndarray = True,
    ) -> StepStats | None:
        """Measure the step across all ranks (a collective: every rank must call it).

        Args:
            tp: The parameters and layout (the same layout on every rank).
            step: The optimizer step number.
            loss: This rank's loss for the step (tensor or float), or None. Defaults to None.
            lr: The learning rate in force, for the record. Defaults to None.
            grad_scale: The loss scale the gradients still carry. Defaults to None.
            param_norms: As for :func:`gradwatch.integrations.torch.measure`. Defaults to True.

        Returns:
            The global statistics, identical on every rank; None when gradwatch failed on some
            rank, in which case every rank gets None at the same step and stops monitoring.
        """
        n = len(tp.params)
        fresh_params = param_norms is True
        countable: list[bool] = [False] * n
        error: BaseException | None = self.pending
        vec: torch.Tensor | None = None
        if error is None:
            try:
                vec, countable, _ = self._local(tp, loss, fresh_params)
            except Exception as exc:  # still take part in the collective, flagged
                error = exc
        if vec is None:
            vec = torch.zeros(self._size(n), dtype=torch.float64, device=self.device)
        self.owed = False
        host = self._all_reduce(vec).cpu().numpy()
        ok = host[4 * n + 2:]
        if error is not None or bool((ok < 0.5).any()):
            self._stop_all(error, ok)
            return None
        return self._stats(tp, step, host, countable, lr, grad_scale, param_norms)

    def _stop_all(self, error: BaseException | None, ok: np.ndarray) -> None:
        """Every rank arrives here at the same step: gather the errors, rank 0 warns once."""
        message = "" if error is None else f"{type(error).__name__}: {error}"
        messages: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(messages, message, group=self.group)
        except Exception:
            self.broken = True
            raise
        self.pending = None
        if self.rank == 0:
            failed = [r for r in range(self.world) if ok[r] < 0.5]
            detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            warnings.warn(
                GradwatchWarning(
                    f"gradwatch hit an internal error on rank(s) {failed} and stopped monitoring on "
                    f"every rank at the same step; training goes on unchanged ({detail}). "
                    "Pass strict=True to raise instead."
                ),
                stacklevel=5,
            )

    def _stats(
        self, tp: TorchParams, step: int, host: np.ndarray, countable: list[bool],
        lr: float | None, grad_scale: Any, param_norms: bool | np.ndarray,
    ) -> StepStats:
        params = tp.params
        n = len(params)
        grad_sq, nonzero, present, param_sq = host[:n], host[n:2 * n], host[2 * n:3 * n], host[3 * n:4 * n]
        loss_sum, loss_count = host[4 * n], host[4 * n + 1]
        has_grad = present > 0
        with np.errstate(invalid="ignore"):
            grad_norm = np.where(has_grad, np.sqrt(grad_sq), np.nan)
        rows = np.array([float(p.shape[0]) if tp.unit_rows[i] and p.dim() >= 2 else math.nan for i, p in enumerate(params)])
        zero_fraction = np.where(np.array(countable) & has_grad, 1.0 - nonzero / rows, np.nan)
        param_norm: Any = np.sqrt(param_sq) if param_norms is True else (param_norms if isinstance(param_norms, np.ndarray) else None)
        loss_value = float(loss_sum / loss_count) if loss_count > 0 else None
        scale = None if grad_scale is None else float(grad_scale)
        if scale is not None:
            grad_norm = grad_norm / scale
        nonfinite = np.zeros(n, dtype=np.int64)
        finite = bool(np.isfinite(grad_sq[has_grad]).all())
        if not finite or (loss_value is not None and not math.isfinite(loss_value)):
            # The rare path, taken by every rank together (the reduced numbers are the same).
            bad = [i for i in range(n) if has_grad[i] and not math.isfinite(grad_sq[i])]
            want_params = param_norms is not False and param_norms is not True
            counts, sq64, psq = self._rare(tp, bad, want_params)
            for i, c, s in zip(bad, counts, sq64):
                nonfinite[i] = int(round(c))
                if round(c) == 0 and math.isfinite(s):  # finite values whose float32 norm overflowed
                    grad_norm[i] = math.sqrt(s) / (scale if scale is not None else 1.0)
            if want_params:
                param_norm = np.sqrt(psq)
        return StepStats(
            step=step, layout=tp.layout, grad_norm=grad_norm, param_norm=param_norm, nonfinite=nonfinite,
            zero_fraction=zero_fraction, has_grad=has_grad, loss=loss_value, lr=lr,
        )

    def _rare(self, tp: TorchParams, bad: Sequence[int], want_params: bool) -> tuple[list[float], list[float], np.ndarray]:
        """Non-finite element counts and float64 squared norms of the ``bad`` tensors, and the
        parameter norms when asked: a second collective, reached by every rank together."""
        params = tp.params
        n = len(params)
        parts: list[torch.Tensor] = []
        with torch.no_grad():
            for i in bad:
                g = params[i].grad
                if g is None:
                    parts += [torch.zeros((), dtype=torch.float64)] * 2
                    continue
                w, _, local = _weight_and_rows(g, self.world, self.sharded.get(id(params[i])))
                values = local.coalesce().values() if local.is_sparse else local
                parts.append((~torch.isfinite(values)).sum().double().cpu() * w)
                parts.append(values.double().square().sum().cpu() * w)
            psq = torch.zeros(n, dtype=torch.float64)
            if want_params:
                for i, p in enumerate(params):
                    w, _, local = _weight_and_rows(p, self.world, self.sharded.get(id(p)))
                    psq[i] = float(torch.linalg.vector_norm(local.double()).square().cpu()) * w
            vec = torch.cat([torch.stack(parts) if parts else torch.zeros(0, dtype=torch.float64), psq]).to(self.device)
        host = self._all_reduce(vec).cpu().numpy()
        k = len(bad)
        return host[0:2 * k:2].tolist(), host[1:2 * k:2].tolist(), host[2 * k:]


def attach(monitor: Any, model: torch.nn.Module | None = None, group: Any = None) -> DistributedMeasure:
    """Prepare a watch's monitor for distributed training: on ranks other than 0 its output hooks
    are silenced (:class:`RankZeroHooks`).

    Args:
        monitor: The watch's :class:`gradwatch.Monitor`.
        model: The watched model (FSDP1 shards are found in it). Defaults to None.
        group: The process group. Defaults to None (the default group).

    Returns:
        The :class:`DistributedMeasure` the watch measures with.
    """
    measure = DistributedMeasure(group, model)
    if not isinstance(monitor.hooks, RankZeroHooks):
        monitor.hooks = RankZeroHooks(monitor.hooks.manager, measure.rank)
    return measure


__all__ = ["DistributedMeasure", "RankZeroHooks", "active", "attach", "is_rank_zero"]
