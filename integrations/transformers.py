"""Hugging Face ``Trainer`` callback: ``Trainer(..., callbacks=[GradWatch()])``.

::

    from gradwatch.integrations.transformers import GradWatch

    gw = GradWatch()                                          # policy="auto"
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[gw])
    trainer.train()
    print(gw.report().summary())

The step is :class:`~gradwatch.integrations.torch.driver.StepDriver`'s; this shell says where it
is (``on_pre_optimizer_step``), how to clip (it takes the Trainer's ``max_grad_norm`` over, so that
it sees unclipped gradients, and clips at the smaller of the user's and gradwatch's level exactly
as the Trainer would), and where the loss comes from (each micro-batch's ``outputs.loss``, read by
a forward hook, non-finite ones counted whatever ``logging_nan_inf_filter`` hides). What each
Trainer event sees and why it works this way: docs/transformers.md.

Raises:
    gradwatch.MissingExtraError: on import, when ``transformers`` or ``torch`` is not installed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from gradwatch.errors import require

require("torch", "transformers")
require("transformers", "transformers")

from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402

from gradwatch.monitor import Monitor  # noqa: E402
from gradwatch.policy import Policy  # noqa: E402

from .torch.callback import TrainerCallbackCore  # noqa: E402
from .torch.layout import LayerNames, TorchParams  # noqa: E402
from .torch.losses import MicroBatchLosses, output_loss  # noqa: E402
from .torch.remedies import clip_grads  # noqa: E402

__all__ = ["GradWatch"]


class GradWatch(TrainerCallbackCore, TrainerCallback, ExportableState):
    """Watch the gradients of a Hugging Face ``Trainer`` run, say what is wrong, apply remedies.

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
        param_norms: Deprecated: ``param_norm_every=1`` (True) or ``0`` (False). Defaults to None.

    Attributes:
        monitor: The monitor judging the run.
        step: Optimizer steps seen.
        losses: The micro-batch losses (``nonfinite_losses``, ``micro_batches``).

    Raises:
        TypeError, ValueError: for ``every`` below 1 and other options of the wrong type.
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
        param_norms: bool | None = None,
    ) -> None:
        super().__init__(
            policy, owner=type(self).__name__, framework="transformers", every=every, strict=strict,
            sinks=sinks, names=names, rollback_every=rollback_every, param_norm_every=param_norm_every,
            param_norms=param_norms, monitor=monitor,
            warn=lambda message, category: warnings.warn(message, category, stacklevel=5),
        )
        self.losses = MicroBatchLosses()
        self._optimizer: Any = None
        self._hook: Any = None
        self._user_max_grad_norm: float | None = None  # set while the callback does the clipping
        self._args: Any = None
        self.failsafe.on_stop(self._give_clipping_back)

    @property
    def nonfinite_losses(self) -> int:
        """Micro-batches whose loss was NaN or Inf (those of unmeasured steps are added at the end)."""
        return self.losses.nonfinite

    @property
    def micro_batches(self) -> int:
        """Micro-batches whose loss was seen."""
        return self.losses.micro_batches

    # -- checkpoints (transformers' ExportableState, saved in trainer_state.json) ---------------

    def state(self) -> dict[str, Any]:
        """What ``Trainer`` saves with each checkpoint (restored with
        ``TrainingArguments(restore_callback_states_from_checkpoint=True)``, which builds a new
        callback from ``args`` and sets the ``attributes``; find it in
        ``trainer.callback_handler.callbacks``)."""
        return {
            "args": {"policy": self.monitor.policy.name, "every": self.every,
                     "param_norm_every": self.param_norm_every, "strict": self.strict},
            "attributes": {"gradwatch_state": self.state_dict()},
        }

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and the counters, plain Python."""
        return {**super().state_dict(), "nonfinite_losses": self.nonfinite_losses, "micro_batches": self.micro_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`.

        Raises:
            ValueError: if ``state_dict`` is not such a state.
        """
        super().load_state_dict(state_dict)
        self.losses.nonfinite = int(state_dict.get("nonfinite_losses", 0))
        self.losses.micro_batches = int(state_dict.get("micro_batches", 0))

    @property
    def gradwatch_state(self) -> dict[str, Any]:
        return self.state_dict()

    @gradwatch_state.setter
    def gradwatch_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

    # -- Trainer events -------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        self.main = bool(getattr(state, "is_world_process_zero", True))
        self.failsafe.guard(self._train_begin, args, model, optimizer)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self.failsafe.guard(self._before_step, args, model, optimizer) is None:
            self.losses.clear()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None and self.driver is not None:
            try:  # also after monitoring stopped: the user's LR must come back
                self.driver.restore_lr(optimizer)
            except Exception as exc:
                self.failsafe.fail(exc)

    def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._teardown(args, optimizer)
        hidden = " (hidden from the logged loss by logging_nan_inf_filter=True)" if args.logging_nan_inf_filter else ""
        self.losses.close(warn=self.main, note=hidden)
        self.finish()

    # -- the shell: where the step is, how to clip, where the loss comes from ---------------------

    def _train_begin(self, args: Any, model: Any, optimizer: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError(f"{self.owner} needs the Trainer's model and optimizer in on_train_begin; got None.")
        self._args = args
        self._optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self.bind(model, self._optimizer, self._clip)
        if self._hook is None:
            self._hook = model.register_forward_hook(self._record_loss)
        if bool(getattr(args, "deepspeed", None)) or bool(getattr(args, "fsdp", None)):
            if self.main:
                warnings.warn(
                    "gradwatch: under DeepSpeed/FSDP the Trainer clips the gradients its own way before any "
                    "callback sees them, so gradwatch measures clipped gradients and does not clip itself.",
                    UserWarning,
                    stacklevel=3,
                )
        elif self._user_max_grad_norm is None:
            self._user_max_grad_norm = float(args.max_grad_norm or 0.0)
            args.max_grad_norm = 0.0

    def _record_loss(self, module: Any, inputs: Any, output: Any) -> None:
        if self.failsafe.active and module.training:
            loss = output_loss(output)
            if loss is not None:
                if self.driver is not None:
                    self.failsafe.guard(self.driver.learn_loss_function, loss)
                self.losses.add(loss)

    def _before_step(self, args: Any, model: Any, optimizer: Any) -> bool:
        if self.driver is None or getattr(optimizer, "optimizer", optimizer) is not self._optimizer:
            self._train_begin(args, model, optimizer)
        driver = self.driver
        assert driver is not None
        step = driver.step
        loss, losses = self.losses.take(measured=step % self.every == 0)
        # fp16: a GradScaler skips steps whose scaled gradients overflow, on its own.
        result = driver.before_optimizer_step(loss=loss, scaler_skips=getattr(optimizer, "scaler", None) is not None)
        if result is not None:
            hidden = " The Trainer's logged loss hides it (logging_nan_inf_filter=True)." if getattr(
                args, "logging_nan_inf_filter", False) else ""
            self.losses.count(losses, result[0].loss, step, warn=self.main,
                              note=f"{hidden} gradwatch counts them: {self.owner}.nonfinite_losses.")
        if self.failsafe.active:
            driver.apply_lr(optimizer)
        return True

    def _clip(self, tp: TorchParams, level: float, grad_scale: Any, unmeasured: bool) -> None:
        """Clip at the smaller of the user's ``max_grad_norm`` (taken over from the Trainer) and
        gradwatch's level, exactly as the Trainer would have (``clip_grad_norm_``)."""
        user = self._user_max_grad_norm
        threshold = min(level, user if user is not None and user > 0 else math.inf)
        if math.isfinite(threshold):
            # Unmeasured steps are not checked for NaN: never let a non-finite norm poison the clip.
            # On measured steps a non-finite step was skipped, or is left exactly as the Trainer
            # would have left it (observe policy).
            clip_grads(tp.params, threshold, guard_nonfinite=unmeasured)

    def _give_clipping_back(self) -> None:
        """Monitoring stopped: the Trainer clips again, as without gradwatch."""
        self.losses.clear()
        if self._user_max_grad_norm is not None and self._args is not None:
            self._args.max_grad_norm = self._user_max_grad_norm
            self._user_max_grad_norm = None

    def _teardown(self, args: Any, optimizer: Any) -> None:
        try:  # also after monitoring stopped
            self._args = self._args or args
            self._give_clipping_back()
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
        except Exception as exc:
            self.failsafe.fail(exc)
        self.release(optimizer)


def __getattr__(name: str) -> Any:
    if name == "GradWatchCallback":  # the old name, for one release
        warnings.warn("gradwatch.integrations.transformers.GradWatchCallback is now GradWatch, the name of "
                      "every gradwatch callback; the old name goes away in the next release.",
                      DeprecationWarning, stacklevel=2)
        return GradWatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
