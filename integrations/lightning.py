"""Lightning callback: ``Trainer(callbacks=[GradWatch()])``.

::

    import lightning.pytorch as pl
    from gradwatch.integrations.lightning import GradWatch

    trainer = pl.Trainer(callbacks=[GradWatch()])      # policy="auto"
    trainer.fit(model, loader)

Where it measures: in ``on_before_optimizer_step``, which Lightning calls once per optimizer step
(after the last micro-batch under ``accumulate_grad_batches``), after ``backward`` (and DDP's
averaging), after the AMP ``GradScaler`` unscaled the gradients and before Lightning clips them.
Optimizers that unscale inside their own ``step`` (``fused=True`` under ``precision="16-mixed"``)
still hold scaled gradients there: their norms are divided by the loss scale. Steps whose scaled
gradients overflow are left to the scaler (it skips them) and counted as skipped, not explosions.

Note that ``gradwatch.watch(model, optimizer)`` does not fit Lightning: its optimizer pre-hook
runs before Lightning's closure computes the gradients.

The remedies go through Lightning's own knobs where they exist:

* clip: ``trainer.gradient_clip_val`` (and ``gradient_clip_algorithm="norm"``) for the step, which
  Lightning re-reads every optimizer step right after this hook; the user's own value comes back
  on the next step. Where Lightning cannot clip (manual optimization, a fused optimizer under a
  ``GradScaler``, the user's ``gradient_clip_algorithm="value"``), gradwatch clips the global norm
  itself, exactly as ``torch.nn.utils.clip_grad_norm_``.
* lr_decay: the factor multiplies each group's ``lr`` for the duration of ``optimizer.step()`` only
  (:class:`gradwatch.integrations.torch.LRScale`), so LR schedulers keep their own shape.
* skip_step: the gradients are set to None, so the optimizer changes neither the parameters nor
  its state.

It logs ``grad_norm/total`` and a few grouped per-layer norms ``grad_norm/<group>`` (see
:func:`gradwatch.sinks.group_layers`) through ``pl_module.log``, so they reach whatever logger the
Trainer has (TensorBoard, CSV, W&B...). Findings of severity warning and error become one Python
warning per kind, on rank zero. The monitor's state is saved in checkpoints (``state_dict`` /
``load_state_dict``, under :attr:`GradWatch.state_key`), so a resumed run keeps its history and its
remedy state.

Manual optimization (``automatic_optimization = False``) is supported: measurement happens in the
same hook when you call ``opt.step()``; clipping is done by gradwatch. With several optimizers,
only one is watched (``optimizer_index``, the first by default).

Raises:
    gradwatch.MissingExtraError: on import, when ``lightning`` or ``torch`` is not installed.
"""

from __future__ import annotations

import math
from typing import Any

from gradwatch.errors import GradwatchWarning, require

torch = require("torch", "lightning")
pl = require("lightning.pytorch", "lightning")

from gradwatch.integrations.torch import (  # noqa: E402
    LRScale,
    Rollbacks,
    TorchParams,
    apply_decision,
    build_layout,
    clip_grads,
    measure,
)
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn  # noqa: E402

from gradwatch.monitor import Monitor  # noqa: E402
from gradwatch.policy import Policy  # noqa: E402
from gradwatch.report import Report  # noqa: E402
from gradwatch.sinks import WarnOnceSink, resolve_sinks, step_scalars  # noqa: E402

__all__ = ["GradWatch"]


class GradWatch(pl.Callback):
    """Watch the gradients of a Lightning run, say what is wrong, apply remedies.

    Args:
        policy: ``"auto"`` (skip non-finite steps, clip and decay the LR on explosions, recommend
            BatchNorm where gradients vanish), ``"observe"`` (never touch training) or a
            :class:`gradwatch.Policy`. Defaults to ``"auto"``.
        every: Measure every N optimizer steps; on the others only the standing clip level and LR
            factor apply. Defaults to 1.
        log: Log ``grad_norm/total`` and grouped per-layer norms through ``pl_module.log``.
            Defaults to True.
        max_groups: The most per-layer groups logged. Defaults to 8.
        sinks: Where else to send this run's numbers and findings: :class:`gradwatch.sinks.Sink`
            objects or file paths (JSON Lines). Attached to this callback's monitor only.
            Defaults to None.
        optimizer_index: Which of the Trainer's optimizers to watch. Defaults to 0.
        param_norms: Measure parameter norms (vanishing detector, non-finite parameters).
            Defaults to True.
        strict: Raise gradwatch's own internal errors instead of warning once and stopping.
            Defaults to False.
        rollback_every: Keep a copy of the parameters and optimizer state every N healthy steps, so
            that ``auto`` can roll back (parameters turned non-finite, or an explosion right after
            the LR jumped). Costs one copy of the parameters plus the optimizer state. Defaults to
            None (no copy, no rollback).
        monitor: A :class:`gradwatch.Monitor` to use instead of a new one. Defaults to None.

    Attributes:
        monitor: The monitor judging the run (``callback.monitor.report()``).
        step: Optimizer steps of the watched optimizer seen so far.

    Raises:
        ValueError: for ``every`` below 1 or a negative ``optimizer_index``.
    """

    def __init__(
        self,
        policy: str | Policy = "auto",
        *,
        every: int = 1,
        log: bool = True,
        max_groups: int = 8,
        sinks: Any = None,
        optimizer_index: int = 0,
        param_norms: bool = True,
        strict: bool = False,
        rollback_every: int | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (measure every N optimizer steps). Received every={every!r}.")
        if optimizer_index < 0:
            raise ValueError(f"optimizer_index must be >= 0. Received optimizer_index={optimizer_index}.")
        self._rollbacks = Rollbacks(rollback_every)  # validates rollback_every
        self.monitor = monitor if monitor is not None else Monitor(policy=policy, framework="lightning")
        self.every = every
        self.log = log
        self.max_groups = max_groups
        self.optimizer_index = optimizer_index
        self.param_norms = param_norms
        self.strict = strict
        self.sinks = [s.attach(self.monitor) for s in resolve_sinks(sinks)]
        self._warn = WarnOnceSink(lambda message: rank_zero_warn(message, category=UserWarning)).attach(self.monitor)
        self.step = 0
        self._params: TorchParams | None = None
        self._optimizer: Any = None
        self._lr = LRScale()
        self._handles: list[Any] = []
        self._loss: Any = None
        self._active = True
        self._failed: BaseException | None = None
        self._clip_set: float | None = None  # what we wrote into trainer.gradient_clip_val
        self._user_clip: tuple[Any, Any] = (None, None)

    # -- checkpoints ----------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.monitor.policy.name, optimizer_index=self.optimizer_index)

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and the step count, plain Python (Lightning saves it in checkpoints)."""
        return {"monitor": self.monitor.state_dict(), "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: same history, findings and remedy state.

        Raises:
            ValueError: if ``state_dict`` is not a GradWatch state.
        """
        if not isinstance(state_dict, dict) or "monitor" not in state_dict:
            raise ValueError(
                "GradWatch.load_state_dict expects what GradWatch.state_dict() returned (a dict with "
                f"'monitor' and 'step'). Received {type(state_dict).__name__}."
            )
        self.monitor.load_state_dict(state_dict["monitor"])
        self.step = int(state_dict.get("step", 0))
        self._params = None  # rebuilt (and matched to the restored layout) on the next step

    # -- results --------------------------------------------------------------------------------

    def report(self) -> Report:
        """The run's :class:`gradwatch.Report` so far."""
        return self.monitor.report()

    @property
    def healthy(self) -> bool:
        return self.monitor.healthy

    # -- Lightning hooks ------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._guard(self._fit_start, trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self._active and isinstance(loss, torch.Tensor):
            # Under accumulate_grad_batches Lightning hands each micro-batch's loss already divided
            # by the number of micro-batches: their sum is the step's mean loss. No host sync.
            value = loss.detach().float().reshape(-1)[0]
            self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._active:
            self._guard(self._before_step, trainer, pl_module, optimizer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teardown(trainer)
        try:
            report = self.monitor.finish()
        except Exception as exc:
            self._fail(exc)
            return
        for sink in self.sinks:
            sink.close()
        if not report.healthy:
            rank_zero_info("gradwatch report:\n" + report.summary())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown(trainer)

    # -- the work -------------------------------------------------------------------------------

    def _fit_start(self, trainer: pl.Trainer) -> None:
        optimizers = list(trainer.optimizers)
        if self.optimizer_index >= len(optimizers):
            raise ValueError(
                f"GradWatch(optimizer_index={self.optimizer_index}) but the Trainer has {len(optimizers)} "
                "optimizer(s). Pass an index below that."
            )
        if len(optimizers) > 1:
            rank_zero_warn(
                f"gradwatch watches one optimizer: trainer.optimizers[{self.optimizer_index}] "
                f"({type(optimizers[self.optimizer_index]).__name__}); the {len(optimizers) - 1} other(s) "
                "are not watched. Add a second GradWatch(optimizer_index=...) to watch another.",
                category=UserWarning,
            )
        self._user_clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        self._clip_set = None
        self._bind(optimizers[self.optimizer_index])

    def _bind(self, optimizer: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._optimizer = optimizer
        self._params = None

        def restore_lr(opt: Any, args: Any, kwargs: Any) -> None:
            self._lr.restore(opt)

        self._handles = [optimizer.register_step_post_hook(restore_lr)]

    def _layout(self, pl_module: pl.LightningModule) -> TorchParams:
        if self._params is None or self._params.stale([self._optimizer]):
            tp = build_layout(pl_module, [self._optimizer])
            self._rollbacks.forget()
            if self.monitor.layout is not None and tp.layout == self.monitor.layout:
                tp.layout = self.monitor.layout  # the same object: no comparison per step
            self._params = tp
        return self._params

    def _scaler(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def _before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the optimizer
        if self._optimizer is None:
            self._bind(raw)
        if raw is not self._optimizer:
            return
        self._restore_clip(trainer)
        step = self.step
        self.step += 1
        loss, self._loss = self._loss, None
        tp = self._layout(pl_module)
        scaler = self._scaler(trainer)
        fused = bool(getattr(raw, "_step_supports_amp_scaling", False))
        grad_scale = scaler._scale if scaler is not None and fused else None
        controls = self.monitor.controls
        if step % self.every != 0:
            self._clip(trainer, pl_module, tp, controls.clip_norm, grad_scale, unmeasured=True)
            self._lr.apply(raw, controls.lr_factor)
            return
        stats = measure(tp, step, loss=loss, lr=self._lr.effective_lr(raw, controls.lr_factor), grad_scale=grad_scale,
                        param_norms=self.param_norms)
        if not bool(stats.has_grad.any()):
            return  # training_step returned None: Lightning skips backward, nothing to judge
        if scaler is not None and not stats.finite and (stats.loss is None or math.isfinite(stats.loss)):
            # The scaled gradients overflowed: GradScaler skips this step on its own and lowers the
            # scale. Routine under fp16, not an explosion. (A NaN loss is judged as usual.)
            self.monitor.note_skipped(step, "grad_scaler")
            return
        decision = self.monitor.observe(stats, immediate=True, can_rollback=self._rollbacks.can_rollback)
        if decision.skip:
            apply_decision(decision, tp.params, snapshot=self._rollbacks.snapshot)
        elif decision.clip_norm is not None:
            self._clip(trainer, pl_module, tp, decision.clip_norm, grad_scale, unmeasured=False)
        self._lr.apply(raw, decision.lr_factor)
        self._rollbacks.after(step, stats, decision, tp.params, [raw])
        if self.log:
            for name, value in step_scalars(stats, None, self.max_groups).items():
                pl_module.log(name, value, on_step=True, on_epoch=False)
            pl_module.log("gradwatch/lr_factor", float(decision.lr_factor), on_step=True, on_epoch=False)

    def _clip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tp: TorchParams, level: float,
              grad_scale: Any, *, unmeasured: bool) -> None:
        """Clip the global norm to ``level`` this step: through ``trainer.gradient_clip_val`` when
        Lightning will clip right after this hook, by hand otherwise."""
        if not math.isfinite(level):
            return
        user_val, user_algo = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        lightning_clips = (
            pl_module.automatic_optimization
            and grad_scale is None
            and (user_algo is None or str(getattr(user_algo, "value", user_algo)) == "norm")
        )
        if lightning_clips:
            if user_val is None or user_val <= 0 or level < user_val:
                self._user_clip = (user_val, user_algo)
                trainer.gradient_clip_val = level
                trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM
                self._clip_set = level
        else:
            # Unmeasured steps are not checked for NaN: never let a non-finite norm poison the clip.
            clip_grads(tp.params, level, grad_scale=grad_scale, guard_nonfinite=unmeasured)

    def _restore_clip(self, trainer: pl.Trainer) -> None:
        if self._clip_set is not None:
            if trainer.gradient_clip_val == self._clip_set:  # untouched by the user since
                trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._user_clip
            self._clip_set = None

    def _teardown(self, trainer: pl.Trainer) -> None:
        try:
            self._restore_clip(trainer)
            if self._optimizer is not None:
                self._lr.restore(self._optimizer)
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self._rollbacks.forget()
        except Exception as exc:  # never break training, not even on the way out
            self._fail(exc)

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.strict:
            raise exc
        self._active = False
        self._loss = None
        if self._failed is None:
            self._failed = exc
            rank_zero_warn(
                "gradwatch hit an internal error and stopped monitoring; training goes on unchanged: "
                f"{type(exc).__name__}: {exc}. Pass GradWatch(strict=True) to raise instead.",
                category=GradwatchWarning,
            )

