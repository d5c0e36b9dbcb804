"""Scenarios run on every rank by gw_dist_harness (DDP and FSDP2 on CPU with gloo).

Each returns plain JSON values; the tests compare the ranks with each other and with the
single-process reference that rank 0 computes on the whole batch (``distributed=False``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from gradwatch.integrations.torch import watch
from gradwatch.sinks import Sink


def mlp(seed: int = 0, *, act: type[nn.Module] = nn.ReLU, depth: int = 2, width: int = 8, d_in: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, 1))
    model = nn.Sequential(*layers)
    if act is nn.ReLU:
        with torch.no_grad():
            first: Any = model[0]
            first.bias[3] = -1e3  # one dead unit: its weight row's gradient is exactly zero
    return model


def data(n: int = 32, d_in: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return x, x[:, :1] * 2 + x[:, 1:2] ** 2 - 1


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def wrap(kind: str, model: nn.Sequential) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def full_params(model: nn.Module) -> list[list[float]]:
    """The parameters as plain lists (FSDP2 shards gathered: a collective on every rank)."""
    out = []
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(t.detach().reshape(-1).tolist())
    return out


def summary(w: Any) -> dict[str, Any]:
    report = w.report()
    return {
        "measured": report.steps_measured,
        "global_norm": report.history["global_norm"],
        "layer_grad_norm": report.history["layer_grad_norm"],
        "loss": report.history["loss"],
        "lr_factor": report.history["lr_factor"],
        "actions": [(a.step, a.kind) for a in report.actions],
        "kinds": sorted(report.finding_counts),
        "dead": {layer["layer"]: layer["dead_fraction"] for layer in report.layers},
        "healthy": report.healthy,
    }


def loop(model: nn.Module, opt: torch.optim.Optimizer, w: Any, batches: Callable[[int], list[tuple]],
         steps: int, *, no_sync: bool = False) -> list[float]:
    """Train ``steps`` optimizer steps; ``batches(t)`` gives the micro-batches of step t (the first
    ones under ``no_sync()`` when asked)."""
    losses = []
    for t in range(steps):
        opt.zero_grad()
        micro = batches(t)
        for k, (x, y) in enumerate(micro):
            last = k == len(micro) - 1
            ctx = getattr(model, "no_sync")() if (no_sync and not last) else _null()  # noqa: B009 - DDP only
            with ctx:
                loss = nn.functional.mse_loss(model(x), y) / len(micro)
                loss.backward()
            w.record_loss(loss * len(micro))
        losses.append(float(loss.detach()))
        opt.step()
    return losses


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _norms(kind: str, rank: int, world: int, *, accumulate: bool) -> dict[str, Any]:
    x, y = data()
    steps = 4

    def local(t: int) -> list[tuple]:
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        return list(zip(xs.chunk(2), ys.chunk(2))) if accumulate else [(xs, ys)]

    def whole(t: int) -> list[tuple]:
        return _whole_micro(x, y, world) if accumulate else [(x, y)]

    model = wrap(kind, mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, param_norm_every=1) as w:
        loop(model, opt, w, local, steps, no_sync=accumulate and kind == "ddp")
    out = {"dist": summary(w), "params": full_params(model)}
    if rank == 0:
        ref = mlp()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
        with watch(ref, ref_opt, param_norm_every=1, distributed=False) as rw:
            loop(ref, ref_opt, rw, whole, steps)
        out["ref"] = summary(rw)
        out["ref_params"] = [p.detach().reshape(-1).tolist() for p in ref.parameters()]
    return out


def _whole_micro(x: torch.Tensor, y: torch.Tensor, world: int) -> list[tuple]:
    """The global micro-batch k: micro-batch k of every rank's shard, concatenated."""
    xs = [c.chunk(2) for c in x.chunk(world)]
    ys = [c.chunk(2) for c in y.chunk(world)]
    return [(torch.cat([s[k] for s in xs]), torch.cat([s[k] for s in ys])) for k in range(2)]


def ddp_norms(rank: int, world: int) -> dict[str, Any]:
    return _norms("ddp", rank, world, accumulate=False)


def ddp_no_sync(rank: int, world: int) -> dict[str, Any]:
    return _norms("ddp", rank, world, accumulate=True)


def fsdp_norms(rank: int, world: int) -> dict[str, Any]:
    return _norms("fsdp", rank, world, accumulate=False)


def _explode(kind: str, rank: int, world: int) -> dict[str, Any]:
    """lr 0.3 on a deep tanh MLP diverges to NaN unwatched; under "auto" it is rescued."""
    x, y = data(n=128, d_in=10)
    steps = 100
    model = wrap(kind, mlp(act=nn.Tanh, depth=4, width=32, d_in=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    with watch(model, opt) as w:
        losses = loop(model, opt, w, lambda t: [(xs, ys)], steps)
    out = {"dist": summary(w), "params": full_params(model), "last_loss": losses[-1], "first_loss": losses[0]}
    if rank == 0:
        plain = mlp(act=nn.Tanh, depth=4, width=32, d_in=10)
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.3)
        with watch(plain, plain_opt, policy="observe", distributed=False) as pw:
            plain_losses = loop(plain, plain_opt, pw, lambda t: [(x, y)], steps)
        out["unwatched_diverges"] = not all(math.isfinite(v) for v in plain_losses)
        ref = mlp(act=nn.Tanh, depth=4, width=32, d_in=10)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
        with watch(ref, ref_opt, distributed=False) as rw:
            loop(ref, ref_opt, rw, lambda t: [(x, y)], steps)
        out["ref"] = summary(rw)
        out["ref_params"] = [p.detach().reshape(-1).tolist() for p in ref.parameters()]
    return out


def _rollback(kind: str, rank: int, world: int) -> dict[str, Any]:
    """A weight turns Inf at step 12 (outside the gradients; under FSDP2 in rank 0's shard only):
    every rank restores the snapshot of step 10 at the same step."""
    x, y = data()
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    model = wrap(kind, mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = next(iter(model.parameters()))
    saved: dict[int, list[list[float]]] = {}
    with watch(model, opt, rollback_every=5) as w:
        for t in range(16):
            if t == 12:
                with torch.no_grad():
                    local = first.to_local() if hasattr(first, "to_local") else first
                    if kind == "ddp" or rank == 0:
                        local[0, 0] = float("inf")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xs), ys)
            loss.backward()
            w.record_loss(loss)
            if t == 10:
                saved[10] = full_params(model)
            opt.step()
            if t == 12:
                saved[12] = full_params(model)
    return {"dist": summary(w), "params": full_params(model), "snapshot_restored": saved[10] == saved[12]}


def ddp_rollback(rank: int, world: int) -> dict[str, Any]:
    return _rollback("ddp", rank, world)


def fsdp_rollback(rank: int, world: int) -> dict[str, Any]:
    return _rollback("fsdp", rank, world)


def fsdp1_norms(rank: int, world: int) -> dict[str, Any]:
    """FSDP1 (FullyShardedDataParallel, an accelerator and NCCL): its flat shards are plain
    tensors; the global norm must still equal the single-process one."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    device = torch.device("cuda", rank)
    x, y = (t.to(device) for t in data())
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    out: dict[str, Any] = {}
    for orig in (False, True):
        model = FullyShardedDataParallel(mlp().to(device), device_id=device, use_orig_params=orig)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with watch(model, opt, param_norm_every=1) as w:
            loop(model, opt, w, lambda t: [(xs, ys)], 4)
        out[f"orig={orig}"] = summary(w)
    if rank == 0:
        ref = mlp().to(device)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
        with watch(ref, ref_opt, param_norm_every=1, distributed=False) as rw:
            loop(ref, ref_opt, rw, lambda t: [(x, y)], 4)
        out["ref"] = summary(rw)
    return out


def fsdp_clip(rank: int, world: int) -> dict[str, Any]:
    """gradwatch's clip of FSDP2 (DTensor) gradients equals torch's clip_grad_norm_."""
    from gradwatch.integrations.torch import apply_decision
    from gradwatch.policy import Decision

    x, y = data()
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    grads = []
    for clip in ("torch", "gradwatch"):
        model = wrap("fsdp", mlp(act=nn.Tanh))
        nn.functional.mse_loss(model(xs), ys).backward()
        if clip == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        else:
            apply_decision(Decision(step=0, clip_norm=0.1), list(model.parameters()))
        grads.append([cast(Any, p.grad).full_tensor().reshape(-1).tolist() for p in model.parameters()])
    return {"torch": grads[0], "gradwatch": grads[1]}


def ddp_explode(rank: int, world: int) -> dict[str, Any]:
    return _explode("ddp", rank, world)


def fsdp_explode(rank: int, world: int) -> dict[str, Any]:
    return _explode("fsdp", rank, world)


class Recorder(Sink):
    """Counts the events that reach sinks in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def write_step(self, stats: Any, decision: Any, monitor: Any) -> None:
        self.events.append("step")

    def write_finding(self, finding: Any, monitor: Any) -> None:
        self.events.append(f"finding:{finding.kind}")

    def write_action(self, action: Any, monitor: Any) -> None:
        self.events.append(f"action:{action.kind}")

    def write_report(self, report: Any, monitor: Any) -> None:
        self.events.append("report")


def _nan_one_rank(kind: str, rank: int, world: int) -> dict[str, Any]:
    """Rank 1's batch holds a NaN at step 3; the collective spreads it: both ranks skip."""
    x, y = data()
    xs, ys = shard(x, rank, world).clone(), shard(y, rank, world)
    poisoned = xs.clone()
    poisoned[0, 0] = float("nan")
    model = wrap(kind, mlp(act=nn.Tanh))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    local_nan: dict[int, bool] = {}

    def probe(optimizer: Any, args: Any, kwargs: Any) -> None:  # registered before the watch's
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        local_nan[len(local_nan)] = not all(bool(torch.isfinite(g).all()) for g in local)

    handle = opt.register_step_pre_hook(probe)
    sink: Any = Recorder().register()
    try:
        with watch(model, opt) as w:
            counts = record_nonfinite(w)
            loop(model, opt, w, lambda t: [(poisoned if (t == 3 and rank == 1) else xs, ys)], 6)
    finally:
        sink.detach()
        handle.remove()
    params = full_params(model)
    out = {
        "dist": summary(w), "params": params, "local_nan": [local_nan[t] for t in sorted(local_nan)],
        "finite": all(math.isfinite(v) for p in params for v in p), "events": sink.events, "nonfinite": counts,
    }
    if rank == 0:  # the same batches in one process: rank 1's half poisoned at step 3
        bad_x = torch.cat([shard(x, r, world) if r != 1 else _poison(shard(x, r, world)) for r in range(world)])
        ref = mlp(act=nn.Tanh)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
        with watch(ref, ref_opt, distributed=False) as rw:
            out["ref_nonfinite"] = record_nonfinite(rw)
            loop(ref, ref_opt, rw, lambda t: [(bad_x if t == 3 else x, y)], 6)
        out["ref"] = summary(rw)
    return out


def _poison(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def record_nonfinite(w: Any) -> list[list[int]]:
    """The per-tensor non-finite element counts the monitor is given, step by step."""
    counts: list[list[int]] = []
    observe = w.monitor.observe

    def recording(stats: Any, **kwargs: Any) -> Any:
        counts.append([int(c) for c in stats.nonfinite])
        return observe(stats, **kwargs)

    w.monitor.observe = recording
    return counts


def ddp_nan_one_rank(rank: int, world: int) -> dict[str, Any]:
    return _nan_one_rank("ddp", rank, world)


def fsdp_nan_one_rank(rank: int, world: int) -> dict[str, Any]:
    return _nan_one_rank("fsdp", rank, world)


def _failing(kind: str, rank: int, world: int, where: str) -> dict[str, Any]:
    """gradwatch raises on rank 1 only at step 2: before its collective ("measure") or after it
    ("observe"). No rank may hang; every rank stops monitoring; training goes on."""
    x, y = data()
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    model = wrap(kind, mlp(act=nn.Tanh))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = watch(model, opt)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"injected failure on rank {rank}")

    def before_step(t: int) -> None:
        if t == 2 and rank == 1:
            if where == "measure":
                w.driver._dist._local = boom
            elif where == "before":  # in the watch, before the step's collective
                object.__setattr__(w.params, "stale", boom)
            else:
                w.monitor.observe = boom

    steps = 6
    for t in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        w.record_loss(loss)
        before_step(t)
        opt.step()
    active = w.failsafe.active
    w.remove()
    return {"measured": w.report().steps_measured, "active": active, "params": full_params(model), "steps": steps}


def ddp_fail_measure(rank: int, world: int) -> dict[str, Any]:
    return _failing("ddp", rank, world, "measure")


def ddp_fail_observe(rank: int, world: int) -> dict[str, Any]:
    return _failing("ddp", rank, world, "observe")


def ddp_fail_before(rank: int, world: int) -> dict[str, Any]:
    return _failing("ddp", rank, world, "before")


def ddp_every(rank: int, world: int) -> dict[str, Any]:
    """every=2: the collective runs on measured steps only, on every rank alike."""
    x, y = data()
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    model = wrap("ddp", mlp(act=nn.Tanh))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, every=2) as w:
        loop(model, opt, w, lambda t: [(xs, ys)], 7)
    return {"dist": summary(w), "params": full_params(model)}


def fsdp_fail_measure(rank: int, world: int) -> dict[str, Any]:
    return _failing("fsdp", rank, world, "measure")



def dtensor_placements(rank: int, world: int) -> dict[str, Any]:
    """DTensor gradients placed Replicate, Shard(0), Shard(1) and Partial: the measured norms are
    those of the full tensors, the same on every rank; dead units only where rows are whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from gradwatch.integrations.torch import DistributedMeasure, build_layout

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 2))
    placements = {"0.weight": Shard(0), "1.weight": Shard(1), "2.weight": Replicate()}
    full_grads: dict[str, torch.Tensor] = {}
    for name, p in list(model.named_parameters()):
        module, attr = model[int(name.split(".")[0])], name.split(".")[1]
        placement = placements.get(name, Replicate())
        grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(full_grads)))
        if name == "0.weight":
            grad[1] = 0.0  # a dead unit, in the first rank's rows
        param = nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]))
        if name == "2.bias":  # unreduced partial sums: each rank holds its part
            param.grad = DTensor.from_local(grad * (rank + 1), mesh, [Partial()])
            full_grads[name] = grad * sum(r + 1 for r in range(world))
        else:
            param.grad = distribute_tensor(grad, mesh, [placement])
            full_grads[name] = grad
        setattr(module, attr, param)
    tp = build_layout(model)
    stats = DistributedMeasure(model=model).measure(tp, 0, loss=float(rank), param_norms=True)
    assert stats is not None
    names = list(tp.layout.names)
    return {
        "names": names,
        "grad_norm": stats.grad_norm.tolist(),
        "expected": [float(full_grads[n].norm()) for n in names],
        "param_norm": stats.param_norm.tolist(),
        "expected_param": [float(cast(Any, dict(model.named_parameters())[n]).full_tensor().norm()) for n in names],
        "zero_fraction": stats.zero_fraction.tolist(),
        "loss": stats.loss,
    }
