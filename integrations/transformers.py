"""Hugging Face ``Trainer`` callback: ``Trainer(..., callbacks=[GradWatchCallback()])``.

::

    from transformers import Trainer
    from gradwatch.integrations.transformers import GradWatchCallback

    gw = GradWatchCallback()                                  # policy="auto"
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[gw])
    trainer.train()
    print(gw.report().summary())

What each ``Trainer`` event sees (transformers 4.40 to 5.x), and why gradwatch works where it does:

* ``on_step_begin``: before the first micro-batch's forward; no gradient yet.
* the micro-batches: forward and backward, no event. The Trainer adds each micro-batch loss to
  its running total, except that with ``logging_nan_inf_filter=True`` (the default) a NaN/Inf
  loss is replaced by the average so far: the logged ``loss`` never shows it.
* then the Trainer clips: ``max_grad_norm`` (default 1.0) through ``clip_grad_norm_``, which
  returns the pre-clip global norm that the Trainer logs as ``grad_norm`` at logging steps only.
* ``on_pre_optimizer_step``: gradients complete, but *already clipped*; a single NaN anywhere has
  turned every gradient into NaN (clipping by a NaN norm multiplies everything by NaN).
* ``on_optimizer_step``: after ``optimizer.step()``, before the LR scheduler steps.
* ``on_step_end``: after ``zero_grad()``; the gradients are gone.

So the callback takes the clipping over: on ``on_train_begin`` it reads the user's
``args.max_grad_norm`` and sets it to 0 (the Trainer re-reads it every step, and then only computes
the norm for its log, without changing the gradients); in ``on_pre_optimizer_step`` it measures the
unclipped gradients, judges them, and clips at the smaller of the user's ``max_grad_norm`` and
gradwatch's level, with the same ``clip_grad_norm_`` over the same parameters: a healthy run is
unchanged, bit for bit, and the logged ``grad_norm`` is still the pre-clip norm. ``on_train_end``
puts ``args.max_grad_norm`` back. (Under DeepSpeed or FSDP, whose clipping is their own, the
callback leaves the clipping alone and measures the clipped gradients; it says so once.)

The loss of each micro-batch is read from the model's output (``outputs.loss``, what Hugging Face
models return when given labels) by a forward hook, kept on the device and moved with the step's
statistics in its single host transfer. Non-finite micro-batch losses are counted
(:attr:`GradWatchCallback.nonfinite_losses`), reported as ``nonfinite`` findings and warned about
once, whatever ``logging_nan_inf_filter`` does to the logged loss.

Remedies: skip (gradients set to None, so the optimizer changes nothing), clip (above), LR decay
(the factor multiplies each group's ``lr`` for the duration of ``optimizer.step()`` only, so the
Trainer's LR scheduler keeps its shape and the logged ``learning_rate`` stays the scheduled one).

Raises:
    gradwatch.MissingExtraError: on import, when ``transformers`` or ``torch`` is not installed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from gradwatch.errors import GradwatchWarning, require

torch = require("torch", "transformers")
transformers = require("transformers", "transformers")

from gradwatch.integrations.torch import (  # noqa: E402
    LRScale,
    Rollbacks,
    TorchParams,
    apply_decision,
    build_layout,
    clip_grads,
    measure,
)
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402

from gradwatch.monitor import Monitor  # noqa: E402
from gradwatch.policy import Policy  # noqa: E402
from gradwatch.report import Report  # noqa: E402
from gradwatch.sinks import WarnOnceSink, resolve_sinks  # noqa: E402

__all__ = ["GradWatchCallback"]


def _output_loss(output: Any) -> Any:
    """The ``loss`` of a model output (ModelOutput, dict or tuple from ``return_dict=False``)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class GradWatchCallback(TrainerCallback, ExportableState):
    """Watch the gradients of a Hugging Face ``Trainer`` run, say what is wrong, apply remedies.

    Args:
        policy: ``"auto"`` (skip non-finite steps, clip and decay the LR on explosions, recommend
            BatchNorm where gradients vanish), ``"observe"`` (never touch training) or a
            :class:`gradwatch.Policy`. Defaults to ``"auto"``.
        every: Measure every N optimizer steps; on the others only the standing clip level and LR
            factor apply. Defaults to 1.
        sinks: Where to send this run's numbers and findings: :class:`gradwatch.sinks.Sink`
            objects or file paths (JSON Lines). Attached to this callback's monitor only.
            Defaults to None.
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
        monitor: The monitor judging the run.
        step: Optimizer steps seen.
        nonfinite_losses: Micro-batches whose loss was NaN or Inf (those of steps not measured,
            with ``every > 1``, are added at the end of training).
        micro_batches: Micro-batches whose loss was seen.

    Raises:
        ValueError: for ``every`` below 1.
    """

    def __init__(
        self,
        policy: str | Policy = "auto",
        *,
        every: int = 1,
        sinks: Any = None,
        param_norms: bool = True,
        strict: bool = False,
        rollback_every: int | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (measure every N optimizer steps). Received every={every!r}.")
        self._rollbacks = Rollbacks(rollback_every)  # validates rollback_every
        self.monitor = monitor if monitor is not None else Monitor(policy=policy, framework="transformers")
        self.every = every
        self.param_norms = param_norms
        self.strict = strict
        self.sinks = [s.attach(self.monitor) for s in resolve_sinks(sinks)]
        self._warn = WarnOnceSink().attach(self.monitor)
        self.step = 0
        self.nonfinite_losses = 0
        self.micro_batches = 0
        self._params: TorchParams | None = None
        self._lr = LRScale()
        self._losses: list[Any] = []
        self._unmeasured_bad: Any = None  # device tensor: non-finite losses on unmeasured steps
        self._hook: Any = None
        self._user_max_grad_norm: float | None = None  # set while the callback does the clipping
        self._args: Any = None
        self._active = True
        self._failed: BaseException | None = None
        self._main = True
        self._loss_warned = False

    # -- results --------------------------------------------------------------------------------

    def report(self) -> Report:
        """The run's :class:`gradwatch.Report` so far."""
        return self.monitor.report()

    @property
    def healthy(self) -> bool:
        return self.monitor.healthy

    # -- checkpoints (transformers' ExportableState, saved in trainer_state.json) ---------------

    def state(self) -> dict[str, Any]:
        """What ``Trainer`` saves with each checkpoint (restored with
        ``TrainingArguments(restore_callback_states_from_checkpoint=True)``, which builds a new
        callback from ``args`` and sets the ``attributes``; find it in
        ``trainer.callback_handler.callbacks``)."""
        return {
            "args": {"policy": self.monitor.policy.name, "every": self.every, "param_norms": self.param_norms,
                     "strict": self.strict},
            "attributes": {"gradwatch_state": self.state_dict()},
        }

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and the counters, plain Python."""
        return {"monitor": self.monitor.state_dict(), "step": self.step, "nonfinite_losses": self.nonfinite_losses,
                "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`.

        Raises:
            ValueError: if ``state`` is not a GradWatchCallback state.
        """
        if not isinstance(state, dict) or "monitor" not in state:
            raise ValueError(
                "GradWatchCallback.load_state_dict expects what state_dict() returned (a dict with 'monitor'). "
                f"Received {type(state).__name__}."
            )
        self.monitor.load_state_dict(state["monitor"])
        self.step = int(state.get("step", 0))
        self.nonfinite_losses = int(state.get("nonfinite_losses", 0))
        self.micro_batches = int(state.get("micro_batches", 0))
        self._params = None

    @property
    def gradwatch_state(self) -> dict[str, Any]:
        return self.state_dict()

    @gradwatch_state.setter
    def gradwatch_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

    # -- Trainer events -------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        self._main = bool(getattr(state, "is_world_process_zero", True))
        self._warn.enabled = self._main
        if self._active:
            self._guard(self._train_begin, args, model, optimizer)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self._active:
            self._guard(self._before_step, args, model, optimizer)
        else:
            self._losses = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None and self._lr.active:
            self._guard(self._lr.restore, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._teardown(args, optimizer)
        if self._unmeasured_bad is not None:
            self.nonfinite_losses += int(self._unmeasured_bad.cpu())
            self._unmeasured_bad = None
        try:
            report = self.monitor.finish()
        except Exception as exc:
            self._fail(exc)
            return
        for sink in self.sinks:
            sink.close()
        if self.nonfinite_losses and self._main:
            warnings.warn(
                f"gradwatch: {self.nonfinite_losses} of {self.micro_batches} micro-batch losses were NaN/Inf"
                + (" (hidden from the logged loss by logging_nan_inf_filter=True)" if args.logging_nan_inf_filter else "")
                + ". See the nonfinite findings in the report.",
                UserWarning,
                stacklevel=2,
            )
        if not report.healthy and self._main:
            print(report.summary())

    # -- the work -------------------------------------------------------------------------------

    def _train_begin(self, args: Any, model: Any, optimizer: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError("GradWatchCallback needs the Trainer's model and optimizer in on_train_begin; got None.")
        self._args = args
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        tp = build_layout(model, [raw])
        if self.monitor.layout is not None and tp.layout == self.monitor.layout:
            tp.layout = self.monitor.layout
        self._params = tp
        if self._hook is None:
            self._hook = model.register_forward_hook(self._record_loss)
        sharded = bool(getattr(args, "deepspeed", None)) or bool(getattr(args, "fsdp", None))
        if sharded:
            if self._main:
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
        if self._active and module.training:
            loss = _output_loss(output)
            if loss is not None:
                self._losses.append(loss.detach().float().reshape(()))

    def _before_step(self, args: Any, model: Any, optimizer: Any) -> None:
        if self._params is None:
            self._train_begin(args, model, optimizer)
        assert self._params is not None
        raw = getattr(optimizer, "optimizer", optimizer)
        if self._params.stale([raw]):
            self._params = build_layout(model, [raw])
            self._rollbacks.forget()
        tp = self._params
        step = self.step
        self.step += 1
        losses, self._losses = self._losses, []
        controls = self.monitor.controls
        if step % self.every != 0:
            if losses:
                # Counted on the device, read once at the end of training: no sync on this step.
                self.micro_batches += len(losses)
                bad = (~torch.isfinite(torch.stack(losses))).sum()
                self._unmeasured_bad = bad if self._unmeasured_bad is None else self._unmeasured_bad + bad
            self._clip(tp, controls.clip_norm, unmeasured=True)
            self._lr.apply(optimizer, controls.lr_factor)
            return
        loss = torch.stack(losses).mean() if losses else None
        stats = measure(tp, step, loss=loss, lr=self._lr.effective_lr(optimizer, controls.lr_factor),
                        param_norms=self.param_norms)
        if losses:
            self.micro_batches += len(losses)
            if stats.loss is not None and not math.isfinite(stats.loss):
                self._count_nonfinite(losses, args, step)
        if getattr(optimizer, "scaler", None) is not None and not stats.finite and _finite_or_unknown(stats.loss):
            # fp16: the scaled gradients overflowed. The GradScaler skips this step on its own and
            # lowers the scale; routine, not an explosion. (A NaN loss is judged as usual.)
            self.monitor.note_skipped(step, "grad_scaler")
            return
        decision = self.monitor.observe(stats, immediate=True, can_rollback=self._rollbacks.can_rollback)
        if decision.skip:
            apply_decision(decision, tp.params, snapshot=self._rollbacks.snapshot)
        else:
            level = decision.clip_norm if decision.clip_norm is not None else math.inf
            self._clip(tp, level, unmeasured=False)
        self._lr.apply(optimizer, decision.lr_factor)
        self._rollbacks.after(step, stats, decision, tp.params, [raw])

    def _count_nonfinite(self, losses: list[Any], args: Any, step: int) -> None:
        """The rare path: how many micro-batch losses were NaN/Inf (one extra host transfer)."""
        bad = int((~torch.isfinite(torch.stack(losses))).sum().cpu())
        self.nonfinite_losses += bad
        if bad and self._main and not self._loss_warned:
            self._loss_warned = True
            hidden = " The Trainer's logged loss hides it (logging_nan_inf_filter=True)." if getattr(
                args, "logging_nan_inf_filter", False) else ""
            warnings.warn(
                f"gradwatch: {bad} micro-batch loss(es) NaN/Inf at optimizer step {step}.{hidden} "
                "gradwatch counts them: GradWatchCallback.nonfinite_losses.",
                UserWarning,
                stacklevel=4,
            )

    def _clip(self, tp: TorchParams, level: float, *, unmeasured: bool) -> None:
        """Clip at the smaller of the user's ``max_grad_norm`` (taken over from the Trainer) and
        gradwatch's level, exactly as the Trainer would have (``clip_grad_norm_``)."""
        user = self._user_max_grad_norm
        threshold = min(level, user if user is not None and user > 0 else math.inf)
        if math.isfinite(threshold):
            # Unmeasured steps are not checked for NaN: never let a non-finite norm poison the clip.
            # On measured steps a non-finite step was skipped, or is left exactly as the Trainer
            # would have left it (observe policy).
            clip_grads(tp.params, threshold, guard_nonfinite=unmeasured)

    def _teardown(self, args: Any, optimizer: Any) -> None:
        try:
            if self._user_max_grad_norm is not None and args is not None:
                args.max_grad_norm = self._user_max_grad_norm
                self._user_max_grad_norm = None
            if optimizer is not None:
                self._lr.restore(optimizer)
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self._losses = []
            self._rollbacks.forget()
        except Exception as exc:
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
        self._losses = []
        # Give the clipping back to the Trainer at once: training goes on as without gradwatch.
        if self._user_max_grad_norm is not None and self._args is not None:
            self._args.max_grad_norm = self._user_max_grad_norm
            self._user_max_grad_norm = None
        if self._failed is None:
            self._failed = exc
            if self._main:
                warnings.warn(
                    GradwatchWarning(
                        "gradwatch hit an internal error and stopped monitoring; training goes on unchanged: "
                        f"{type(exc).__name__}: {exc}. Pass GradWatchCallback(strict=True) to raise instead."
                    ),
                    stacklevel=3,
                )


def _finite_or_unknown(loss: float | None) -> bool:
    return loss is None or math.isfinite(loss)
