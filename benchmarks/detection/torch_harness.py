"""Running PyTorch scenarios: the unwatched reference run with a plain-autograd probe, and the
watched run.

A scenario builds a :class:`TorchRun`: one or more :class:`Group` (a model and the optimizers that
step together after one ``backward()``) and a ``step(t, on_backward)`` method doing one optimizer
step. ``on_backward(group, loss)`` is called after that group's backward pass and before its
optimizer step: the one place where the probe reads gradients, gradwatch's watch records the loss,
and the remedy benchmark clips.

The probe (:class:`Probe`) measures with plain PyTorch, one ``.item()`` per tensor, nothing from
gradwatch: the loss, every gradient's and parameter's norm, and (when a scenario asks) the share
of units of named modules whose output is exactly zero on the whole batch. Its :class:`Trace` is
what each scenario's label check reads.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradwatch

from .scoring import LabelCheck, Outcome, score
from .trace import GroupTrace, Trace

OnBackward = Callable[[int, torch.Tensor], None]


@dataclass
class Group:
    """A model and the optimizers that step together after one backward pass.

    Attributes:
        model: The module whose parameters the optimizers update.
        optimizers: The optimizers.
        scaler: The ``torch.amp.GradScaler`` in use, if any.
    """

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    scaler: Any = None


class TorchRun:
    """One training run of a scenario. Subclasses implement :meth:`step` and :meth:`eval_loss`."""

    groups: list[Group]

    def step(self, t: int, on_backward: OnBackward) -> float:
        """One optimizer step (of every group); returns the main loss as a float."""
        raise NotImplementedError

    def eval_loss(self) -> float:
        """The final loss on the scenario's clean evaluation data (NaN when parameters are)."""
        raise NotImplementedError


class Supervised(TorchRun):
    """A supervised loop with the usual options.

    Args:
        model: The model.
        optimizers: One optimizer or several stepping together.
        batch: ``batch(i) -> (x, y)`` for micro-batch ``i``.
        loss_fn: ``loss_fn(output, y) -> loss``.
        eval_data: Clean ``(x, y)`` for :meth:`eval_loss`.
        lr_factor: ``lr_factor(t) -> float``: the LR at step ``t`` is the base LR times this
            (an LR jump, a warm-up). Defaults to None (the base LR, or the schedulers').
        schedulers: LR schedulers stepped after each optimizer step. Defaults to ().
        accumulate: Micro-batches per optimizer step. Defaults to 1.
        scaler: A GradScaler. Defaults to None.
        autocast: An autocast dtype (``torch.bfloat16``). Defaults to None.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        eval_data: tuple[torch.Tensor, torch.Tensor],
        *,
        lr_factor: Callable[[int], float] | None = None,
        schedulers: Sequence[Any] = (),
        accumulate: int = 1,
        scaler: Any = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.groups = [Group(model, opts, scaler)]
        self.model = model
        self.optimizers = opts
        self.batch = batch
        self.loss_fn = loss_fn
        self.eval_data = eval_data
        self.lr_factor = lr_factor
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
        self.schedulers = list(schedulers)
        self.accumulate = accumulate
        self.scaler = scaler
        self.autocast = autocast

    def step(self, t: int, on_backward: OnBackward) -> float:
        self.model.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.lr_factor is not None:
            factor = self.lr_factor(t)
            for opt, base in zip(self.optimizers, self.base_lrs):
                for group, lr in zip(opt.param_groups, base):
                    group["lr"] = lr * factor
        total = torch.zeros(())
        for k in range(self.accumulate):
            x, y = self.batch(t * self.accumulate + k)
            if self.autocast is not None:
                with torch.autocast("cpu", dtype=self.autocast):
                    loss = self.loss_fn(self.model(x), y)
            else:
                loss = self.loss_fn(self.model(x), y)
            scaled = loss / self.accumulate
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total = total + loss.detach().float()
        mean = total / self.accumulate
        on_backward(0, mean)
        for opt in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        for sched in self.schedulers:
            sched.step()
        return float(mean)

    def eval_loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            x, y = self.eval_data
            return float(self.loss_fn(self.model(x), y))


def _norm(t: torch.Tensor) -> float:
    values = t.coalesce().values() if t.is_sparse else t
    return float(torch.linalg.vector_norm(values.double()))


class Probe:
    """Plain-PyTorch measurements for label checks (one ``.item()`` per tensor; slow, exact)."""

    def __init__(self, run: TorchRun, dead_modules: Sequence[str] = ()) -> None:
        self.run = run
        self.named = [list(g.model.named_parameters()) for g in run.groups]
        self.trace = Trace([GroupTrace([n for n, _ in named]) for named in self.named])
        self._dead_now: dict[str, float] = {}
        self._handles = []
        modules = dict(run.groups[0].model.named_modules())
        for name in dead_modules:
            self.trace.dead[name] = []
            self._handles.append(modules[name].register_forward_hook(self._dead_hook(name)))

    def _dead_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if not module.training:
                return
            with torch.no_grad():
                flat = output.detach().transpose(0, 1).reshape(output.shape[1], -1)
                self._dead_now[name] = float((flat == 0).all(1).float().mean())

        return hook

    def on_backward(self, g: int, loss: torch.Tensor) -> None:
        gt = self.trace.groups[g]
        gt.loss.append(float(loss))
        gt.grad_norm.append([math.nan if p.grad is None else _norm(p.grad) for _, p in self.named[g]])
        gt.has_grad.append([p.grad is not None for _, p in self.named[g]])
        gt.param_norm.append([_norm(p.detach()) for _, p in self.named[g]])
        gt.lr.append(float(self.run.groups[g].optimizers[0].param_groups[0]["lr"]))
        if g == 0:
            for name in self.trace.dead:
                self.trace.dead[name].append(self._dead_now.get(name, math.nan))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass(frozen=True)
class Scenario:
    """A labelled PyTorch training scenario.

    Attributes:
        name: Short unique name.
        label: ``"healthy"`` or the finding kind it must produce.
        build: Returns a fresh, seeded :class:`TorchRun`.
        steps: Optimizer steps.
        check: Label check on the unwatched run's :class:`Trace`.
        onset: Designed onset step (None for healthy, or when the check measures it).
        about: The trap it sets (healthy) or the pathology and where (pathological).
        dead_modules: Modules whose dead-unit share the probe records.
        remedy: Part of the remedy benchmark (diverging or non-finite).
    """

    name: str
    label: str
    build: Callable[[], TorchRun]
    steps: int
    check: Callable[[Trace], LabelCheck]
    onset: int | None = None
    about: str = ""
    dead_modules: tuple[str, ...] = ()
    remedy: bool = False


def run_reference(scenario: Scenario) -> tuple[Trace, list[torch.Tensor]]:
    """The unwatched run with the probe. Returns the trace and the final parameters."""
    run = scenario.build()
    probe = Probe(run, scenario.dead_modules)
    probe.trace.eval_before = run.eval_loss()
    for t in range(scenario.steps):
        run.step(t, probe.on_backward)
    probe.remove()
    probe.trace.eval_after = run.eval_loss()
    return probe.trace, _params(run)


def _params(run: TorchRun) -> list[torch.Tensor]:
    return [p.detach().clone() for g in run.groups for p in g.model.parameters()]


def run_watched(
    scenario: Scenario, *, policy: str = "observe", steps: int | None = None, **watch_kwargs: Any
) -> tuple[list[Any], TorchRun]:
    """The run watched by gradwatch (one watch per group). Returns the reports and the run."""
    run = scenario.build()
    watches = [
        gradwatch.watch(g.model, g.optimizers, policy=policy, scaler=g.scaler, strict=True, **watch_kwargs)
        for g in run.groups
    ]

    def on_backward(g: int, loss: torch.Tensor) -> None:
        watches[g].record_loss(loss)

    try:
        for t in range(scenario.steps if steps is None else steps):
            run.step(t, on_backward)
    finally:
        reports = [w.report() for w in watches]
        for w in watches:
            w.remove()
    return reports, run


def detect(scenario: Scenario) -> Outcome:
    """Run a scenario unwatched (label check) and watched under ``observe`` (detection); score it."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trace, reference = run_reference(scenario)
        try:
            check = scenario.check(trace)
        except Exception as exc:  # a check that cannot run is a failed label, said so
            check = LabelCheck(False, f"label check raised {type(exc).__name__}: {exc}")
        reports, run = run_watched(scenario)
    identical = all(
        a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
        for a, b in zip(reference, _params(run))
    )
    findings = [f for r in reports for f in r.findings]
    return score(
        framework="torch", name=scenario.name, label=scenario.label, about=scenario.about,
        onset=scenario.onset, check=check, findings=findings, identical=identical,
        seconds=time.perf_counter() - start,
    )


__all__ = ["Group", "GroupTrace", "Probe", "Scenario", "Supervised", "Trace", "TorchRun", "detect",
           "run_reference", "run_watched"]
