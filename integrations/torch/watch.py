"""The handle behind ``gradwatch.watch``: hooks, measurement, decisions and remedies per step.

See :mod:`gradwatch.integrations.torch` for the user's view; this module holds the
:class:`Watch` class only.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from gradwatch.errors import GradwatchWarning
from gradwatch.monitor import Monitor
from gradwatch.policy import Decision, Policy
from gradwatch.report import Report

from . import distributed as torch_distributed
from .layout import LayerNames, TorchParams, build_layout
from .measure import measure
from .remedies import LRScale, Rollbacks, apply_decision, clip_grads


class Watch:
    """The handle :func:`gradwatch.watch` returns. See :func:`gradwatch.integrations.torch.watch`
    for the arguments.

    Attributes:
        monitor: The :class:`gradwatch.Monitor` judging the run.
        params: The measured parameters and their layout (:class:`TorchParams`).
        step: Optimizer steps seen so far (including steps GradScaler skipped).
    """

    def __init__(
        self,
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
    ) -> None:
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizers = [optimizer]
        else:
            try:
                optimizers = list(optimizer) if optimizer is not None and not isinstance(optimizer, str) else []
            except TypeError:
                optimizers = []
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(
                "gradwatch.watch(model, optimizer) needs a torch.optim.Optimizer or a list of them. "
                f"Received optimizer={optimizer!r}."
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"gradwatch.watch needs a torch.nn.Module as model. Received {type(model).__name__}.")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (measure every N optimizer steps). Received every={every!r}.")
        self._rollbacks = Rollbacks(rollback_every)  # validates rollback_every
        if not isinstance(param_norm_every, int) or param_norm_every < 0:
            raise ValueError(
                "param_norm_every must be an int >= 0 (0: never measure parameter norms). "
                f"Received param_norm_every={param_norm_every!r}."
            )
        if scaler is not None and not hasattr(scaler, "_per_optimizer_states"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler. Received {type(scaler).__name__}.")
        self.model = model
        self.optimizers = optimizers
        self.monitor = monitor if monitor is not None else Monitor(policy=policy, framework="torch")
        # DDP / FSDP: one collective per measured step, the same decision on every rank.
        self._dist = torch_distributed.attach(self.monitor, model) if torch_distributed.active(distributed) else None
        self.every = every
        self.strict = strict
        self.names = names
        self.rollback_every = rollback_every
        self.param_norm_every = param_norm_every
        self._param_norm: Any = None  # the last measured parameter norms (numpy), reused in between
        self._measured = 0
        self._controls = self.monitor.controls  # the standing orders, refreshed by each decision
        self.scaler = scaler
        self.params: TorchParams = build_layout(model, optimizers, names=names)
        self.step = 0
        self._lr = LRScale()
        self._loss: Any = None
        self._loss_count = 0
        self._round: set[int] = set()
        self._fired_since_update: set[int] = set()
        self._active = True
        self._removed = False
        self._failed: BaseException | None = None
        self._handles: list[Any] = []
        for k, opt in enumerate(optimizers):
            self._handles.append(opt.register_step_pre_hook(self._make_pre_hook(k)))
            self._handles.append(opt.register_step_post_hook(self._make_post_hook(k)))
        self._scaler_update: Any = None
        if scaler is not None:
            original = scaler.update

            def update(new_scale: Any = None) -> None:
                self._guard(self._before_scaler_update)
                return original(new_scale)

            scaler.update = update
            self._scaler_update = update

    # -- public ---------------------------------------------------------------------------------

    def record_loss(self, loss: Any) -> None:
        """Record the loss of the coming optimizer step (enables ``loss_spike``). No host sync:
        a tensor is kept on the device and read in the step's single transfer. Called several times
        before one step (gradient accumulation), the mean is recorded. Call it before
        ``optimizer.step()``.

        Args:
            loss: A scalar tensor or a number.
        """
        if not self._active:
            return
        try:
            value: Any
            if isinstance(loss, torch.Tensor):
                value = loss.detach()
                if value.dim() != 0 or value.dtype != torch.float32:
                    value = value.float().reshape(-1)[0]
            else:
                value = float(loss)
            self._loss = value if self._loss is None else self._loss + value
            self._loss_count += 1
        except Exception as exc:  # never break training
            self._fail(exc)

    def report(self) -> Report:
        """The run's :class:`gradwatch.Report` so far."""
        return self.monitor.report()

    @property
    def healthy(self) -> bool:
        return self.monitor.healthy

    @property
    def lr_factor(self) -> float:
        """The learning-rate factor in force over the user's schedule (1.0: untouched)."""
        return float(self._controls.lr_factor)

    def remove(self) -> None:
        """Remove the hooks, put the LR schedule back as the user set it and free the snapshot.
        The first call also hands the final report to the ``gradwatch_on_report`` plugins. Safe to
        call twice."""
        if self._removed:
            return
        self._removed = True
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for opt in self.optimizers:
            self._lr.restore(opt)
        if self.scaler is not None and self.scaler.__dict__.get("update") is self._scaler_update:
            del self.scaler.__dict__["update"]
        self._rollbacks.forget()
        self._loss = None
        try:
            self.monitor.finish()
        except Exception as exc:
            if self.strict:
                raise
            warnings.warn(GradwatchWarning(f"gradwatch could not finish its report: {exc!r}"), stacklevel=2)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def state_dict(self) -> dict[str, Any]:
        """The watch's state for a checkpoint: the monitor (history, findings, remedy state), the
        step counts and the last parameter norms. Plain Python values (safe for
        ``torch.save(..., weights_only=True)``). The rollback snapshot is not included.

        Returns:
            The state.
        """
        return {
            "monitor": self.monitor.state_dict(), "step": self.step, "every": self.every,
            "measured": self._measured, "healthy_since_snapshot": self._rollbacks.healthy_since,
            "param_norm": None if self._param_norm is None else [float(x) for x in self._param_norm],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run from :meth:`state_dict`: same history, same remedy state (clip level,
        LR factor), same step count.

        Args:
            state: What :meth:`state_dict` returned.

        Raises:
            ValueError: if ``state`` is not a watch state.
        """
        if not isinstance(state, dict) or "monitor" not in state or "step" not in state:
            raise ValueError(
                "Watch.load_state_dict expects what Watch.state_dict() returned (a dict with "
                f"'monitor' and 'step'). Received {type(state).__name__}"
                + (f" with keys {sorted(state)}." if isinstance(state, dict) else ".")
            )
        self.monitor.load_state_dict(state["monitor"])
        self._controls = self.monitor.controls
        self.step = int(state["step"])
        self._rollbacks.healthy_since = int(state.get("healthy_since_snapshot", 0))
        self._measured = int(state.get("measured", 0))
        saved = state.get("param_norm")
        self._param_norm = None if saved is None else np.array(saved, dtype=np.float64)
        if self.monitor.layout is not None and self.monitor.layout == self.params.layout:
            self.params.layout = self.monitor.layout  # the same object: no comparison per step

    # -- hooks ----------------------------------------------------------------------------------

    def _make_pre_hook(self, k: int) -> Any:
        def pre_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            if self._active:
                self._guard(self._pre_step, k, optimizer)

        return pre_hook

    def _make_post_hook(self, k: int) -> Any:
        def post_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            if self._lr.active:
                self._guard(self._lr.restore, optimizer)

        return post_hook

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            self._fail(exc)
            return None

    def _fail(self, exc: BaseException) -> None:
        if self.strict:
            raise exc
        if self._dist is not None and self._active:
            # Every rank stops together: now if this rank owes the step's collective, else at the
            # next one (rank 0 warns). See gradwatch.integrations.torch_distributed.
            self._failed = self._failed or exc
            if not self._dist.fail(exc, len(self.params)):
                return
        elif self._failed is None:
            self._failed = exc
            warnings.warn(
                GradwatchWarning(
                    f"gradwatch hit an internal error and stopped monitoring; training goes on "
                    f"unchanged: {type(exc).__name__}: {exc}. Pass strict=True to raise instead."
                ),
                stacklevel=3,
            )
        self._active = False
        self._loss = None

    def _pre_step(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        self._fired_since_update.add(k)
        if k in self._round or not self._round:
            self._round = set()
            self._begin_step(optimizer)
        self._round.add(k)
        if self._active:
            self._lr.apply(optimizer, self._controls.lr_factor)

    def _begin_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Start of one optimizer step (the first optimizer of a round): measure, decide, act."""
        step = self.step
        self.step += 1
        loss, count = self._loss, self._loss_count
        self._loss, self._loss_count = None, 0
        grad_scale = getattr(optimizer, "grad_scale", None)  # fused optimizer under GradScaler
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and float(found_inf) > 0:
            # The fused kernel will skip this step on its own: a scaler skip, not an explosion.
            self.monitor.note_skipped(step, "grad_scaler")
            return
        if self._dist is not None and step % self.every == 0:
            self._dist.owe()  # from here on this rank owes the step's collective, even if it fails
        if self.params.stale(self.optimizers):
            rebuilt = build_layout(self.model, self.optimizers, names=self.names)
            if rebuilt.layout == self.params.layout:
                rebuilt.layout = self.params.layout
            self.params = rebuilt
            self._rollbacks.forget()
        params = self.params.params
        controls = self._controls
        if step % self.every != 0:
            # Unmeasured: only the standing clip applies (on the device, no sync). A non-finite
            # step here cannot be seen, so it cannot be skipped: see docs/torch.md, "every".
            if controls.clip_norm != float("inf"):
                clip_grads(params, controls.clip_norm, grad_scale=grad_scale, guard_nonfinite=True)
            return
        if count > 1 and loss is not None:
            loss = loss / count
        measure_step: Any = measure if self._dist is None else self._dist.measure
        stats = measure_step(
            self.params, step, loss=loss, lr=self._lr.effective_lr(self.optimizers[0], controls.lr_factor),
            grad_scale=grad_scale, param_norms=self._param_norms_now(),
        )
        if stats is None:  # gradwatch failed on some rank: every rank stops at this same step
            self._active = False
            self._loss = None
            return
        self._measured += 1
        if stats.params_measured:
            self._param_norm = stats.param_norm
        can_rollback = self._rollbacks.can_rollback
        decision: Decision = self.monitor.observe(stats, immediate=True, can_rollback=can_rollback)
        # A plugin (select_actions) may have changed the decision's factor: the decision rules.
        self._controls = dataclasses.replace(decision.controls, lr_factor=decision.lr_factor)
        apply_decision(decision, params, grad_scale=grad_scale, snapshot=self._rollbacks.snapshot)
        self._rollbacks.after(step, stats, decision, params, self.optimizers)

    def _param_norms_now(self) -> Any:
        """True to measure parameter norms on this step, else the last values (or False)."""
        if self.param_norm_every == 0:
            return False
        snapshot_due = self._rollbacks.due
        stale = self._param_norm is None or len(self._param_norm) != len(self.params)
        if stale or snapshot_due or self._measured % self.param_norm_every == 0:
            return True
        return self._param_norm

    def _before_scaler_update(self) -> None:
        """GradScaler.update: an optimizer that the scaler stepped but whose pre-hook did not fire
        had its step skipped (inf/NaN in the scaled gradients)."""
        if not self._active:
            return
        fired = self._fired_since_update
        self._fired_since_update = set()
        states = self.scaler._per_optimizer_states
        stepped = False
        for opt in self.optimizers:
            state = states.get(id(opt)) if hasattr(states, "get") else None
            if state and getattr(state.get("stage"), "name", "") == "STEPPED":
                stepped = True
        if stepped and not fired:
            self.monitor.note_skipped(self.step, "grad_scaler")
            self.step += 1
            self._round = set()
            self._loss, self._loss_count = None, 0


__all__ = ["Watch"]
