"""Lightning callback: ``Trainer(callbacks=[GradWatch()])``.

::

    import lightning.pytorch as pl
    from gradwatch.integrations.lightning import GradWatch

    trainer = pl.Trainer(callbacks=[GradWatch()])      # policy="auto"
    trainer.fit(model, loader)

The step is :class:`~gradwatch.integrations.torch.driver.StepDriver`'s; this shell says where it
is (``on_before_optimizer_step``: once per optimizer step, after backward, DDP's averaging and the
``GradScaler``'s unscale, before Lightning clips), how to clip (through
``trainer.gradient_clip_val`` for the step where Lightning can clip, by hand where it cannot:
manual optimization, a fused optimizer under a ``GradScaler``, ``gradient_clip_algorithm="value"``)
and where the loss comes from (``on_before_backward``). It logs ``grad_norm/total`` and grouped
per-layer norms through ``pl_module.log``; its state is saved in checkpoints under
:attr:`GradWatch.state_key`. Details: docs/lightning.md.

Raises:
    gradwatch.MissingExtraError: on import, when ``lightning`` or ``torch`` is not installed.
"""

from __future__ import annotations

import math
from typing import Any

from gradwatch.errors import require

require("torch", "lightning")
require("lightning.pytorch", "lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn  # noqa: E402

from gradwatch.monitor import Monitor  # noqa: E402
from gradwatch.policy import Policy  # noqa: E402
from gradwatch.sinks import step_scalars  # noqa: E402

from .torch.callback import TrainerCallbackCore  # noqa: E402
from .torch.layout import LayerNames, TorchParams  # noqa: E402
from .torch.remedies import clip_grads  # noqa: E402

__all__ = ["GradWatch"]


class GradWatch(TrainerCallbackCore, pl.Callback):
    """Watch the gradients of a Lightning run, say what is wrong, apply remedies.

    The shared options mean what they mean for every adapter (``gradwatch.watch`` documents
    them; docs/api.md has the table).

    Args:
        policy: ``"auto"``, ``"observe"`` or a :class:`gradwatch.Policy`. Defaults to ``"auto"``.
        every: Measure every N optimizer steps. Defaults to 1.
        strict: Raise gradwatch's own errors instead of warning once. Defaults to False.
        sinks: :class:`gradwatch.sinks.Sink` objects or JSON Lines paths. Defaults to None.
        names: How layers are named. Defaults to None (module paths).
        rollback_every: Healthy steps in a row between rollback snapshots; None: none. Defaults to
            ``"auto"`` (every 20 under ``policy="auto"`` while a copy fits 1 GiB).
        param_norm_every: Parameter norms every N measured steps (0: never). Defaults to 10.
        monitor: A :class:`gradwatch.Monitor` to use instead of a new one. Defaults to None.
        log: Log ``grad_norm/total`` and grouped per-layer norms through ``pl_module.log``.
            Defaults to True.
        max_groups: The most per-layer groups logged. Defaults to 8.
        optimizer_index: Which of the Trainer's optimizers to watch. Defaults to 0.
        param_norms: Deprecated: ``param_norm_every=1`` (True) or ``0`` (False). Defaults to None.

    Attributes:
        monitor: The monitor judging the run (``callback.monitor.report()``).
        step: Optimizer steps of the watched optimizer seen so far.

    Raises:
        TypeError, ValueError: for ``every`` below 1, a negative ``optimizer_index`` and other
            options of the wrong type.
    """

    def __init__(
        self,
        policy: str | Policy = "auto",
        *,
        every: int = 1,
        strict: bool = False,
        sinks: Any = None,
        names: LayerNames = None,
        rollback_every: int | str | None = "auto",
        param_norm_every: int = 10,
        monitor: Monitor | None = None,
        log: bool = True,
        max_groups: int = 8,
        optimizer_index: int = 0,
        param_norms: bool | None = None,
    ) -> None:
        if not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be an int >= 0. Received optimizer_index={optimizer_index!r}.")
        super().__init__(
            policy, owner="GradWatch", framework="lightning", every=every, strict=strict, sinks=sinks,
            names=names, rollback_every=rollback_every, param_norm_every=param_norm_every,
            param_norms=param_norms, monitor=monitor,
            warn=lambda message, category: rank_zero_warn(message, category=category),
        )
        self.log = log
        self.max_groups = max_groups
        self.optimizer_index = optimizer_index
        self._optimizer: Any = None
        self._loss: Any = None
        self._trainer: Any = None
        self._pl_module: Any = None
        self._clip_set: float | None = None  # what we wrote into trainer.gradient_clip_val
        self._user_clip: tuple[Any, Any] = (None, None)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.monitor.policy.name, optimizer_index=self.optimizer_index)

    # -- Lightning hooks ------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.failsafe.guard(self._fit_start, trainer, pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.failsafe.active and isinstance(loss, torch.Tensor):
            if self.driver is not None:
                self.failsafe.guard(self.driver.learn_loss_function, loss)
            # Under accumulate_grad_batches Lightning hands each micro-batch's loss already divided
            # by the number of micro-batches: their sum is the step's mean loss. No host sync.
            value = loss.detach().float().reshape(-1)[0]
            self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.failsafe.guard(self._before_step, trainer, pl_module, optimizer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teardown(trainer)
        self.finish(rank_zero_info)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown(trainer)

    # -- the shell: where the step is, how to clip, where the loss comes from ---------------------

    def _fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        self._bind(pl_module, optimizers[self.optimizer_index])

    def _bind(self, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._optimizer = optimizer
        self.bind(pl_module, optimizer, self._clip, loss_reduction="sum", restore_lr_after_step=True)

    def _before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the optimizer
        if self._optimizer is None:
            self._bind(pl_module, raw)
        if raw is not self._optimizer:
            return
        driver = self.driver
        assert driver is not None
        self._restore_clip(trainer)
        self._trainer, self._pl_module = trainer, pl_module
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        fused = bool(getattr(raw, "_step_supports_amp_scaling", False))
        loss, self._loss = self._loss, None
        result = driver.before_optimizer_step(
            loss=loss, grad_scale=scaler._scale if scaler is not None and fused else None,
            scaler_skips=scaler is not None,
        )
        if self.failsafe.active:
            driver.apply_lr(raw)
        if result is not None and self.log:
            stats, decision = result
            for name, value in step_scalars(stats, None, self.max_groups).items():
                pl_module.log(name, value, on_step=True, on_epoch=False)
            pl_module.log("gradwatch/lr_factor", float(decision.lr_factor), on_step=True, on_epoch=False)

    def _clip(self, tp: TorchParams, level: float, grad_scale: Any, unmeasured: bool) -> None:
        """Clip the global norm to ``level`` this step: through ``trainer.gradient_clip_val`` when
        Lightning will clip right after this hook, by hand otherwise."""
        if not math.isfinite(level):
            return
        trainer, pl_module = self._trainer, self._pl_module
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
        try:  # also after monitoring stopped: the user's clipping and LR must come back
            self._restore_clip(trainer)
        except Exception as exc:  # never break training, not even on the way out
            self.failsafe.fail(exc)
        self.release(self._optimizer)
