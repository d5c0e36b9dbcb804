"""What every PyTorch trainer callback shares (Lightning's, the Hugging Face Trainer's): the
monitor, the fail-safe, the sinks, one :class:`~gradwatch.integrations.torch.driver.StepDriver`
built when training starts, checkpoints, the report and the end of training.

A trainer callback is :class:`TrainerCallbackCore` plus the trainer's own callback class, and says
only what differs: where the step is, how to clip, where the loss comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradwatch.errors import GradwatchWarning
from gradwatch.failsafe import FailSafe
from gradwatch.monitor import Monitor
from gradwatch.options import check_every, check_rollback_every, param_norm_every_from
from gradwatch.policy import Policy
from gradwatch.report import Report
from gradwatch.sinks import Sink, WarnOnceSink, resolve_sinks

from .driver import Clip, StepDriver
from .layout import LayerNames

__all__ = ["TrainerCallbackCore"]


class TrainerCallbackCore:
    """The framework-free half of a PyTorch trainer callback.

    Args:
        policy: ``"auto"``, ``"observe"`` or a :class:`gradwatch.Policy`.
        owner: The callback's class name, for messages.
        framework: The report's framework name.
        every: Measure every N optimizer steps.
        strict: Raise gradwatch's own errors instead of warning once and stopping.
        sinks: :class:`gradwatch.sinks.Sink` objects or JSON Lines paths, attached to this
            callback's monitor.
        names: How layers are named (see :func:`gradwatch.integrations.torch.build_layout`).
        rollback_every: Healthy steps in a row between rollback snapshots (None: none; ``"auto"``).
        param_norm_every: Measure parameter norms every N measured steps (0: never).
        param_norms: Deprecated boolean form of ``param_norm_every`` (True: 1, False: 0).
        monitor: A monitor to use instead of a new one.
        warn: ``warn(message, category)``: how findings (``UserWarning``) and gradwatch's own
            failure (:class:`gradwatch.GradwatchWarning`) are warned about, once, on rank zero.

    Raises:
        TypeError, ValueError: for an option of the wrong type or range.
    """

    def __init__(
        self,
        policy: str | Policy,
        *,
        owner: str,
        framework: str,
        every: int,
        strict: bool,
        sinks: Any,
        names: LayerNames,
        rollback_every: int | str | None,
        param_norm_every: int,
        param_norms: bool | None,
        monitor: Monitor | None,
        warn: Callable[[str, type[Warning]], None],
    ) -> None:
        self.every = check_every(every)
        self.rollback_every = check_rollback_every(rollback_every)
        self.param_norm_every = param_norm_every_from(owner, param_norms, param_norm_every)
        self.names = names
        self.strict = bool(strict)
        self.monitor = monitor if monitor is not None else Monitor(policy=policy, framework=framework)
        self.sinks: list[Sink] = [s.attach(self.monitor) for s in resolve_sinks(sinks)]
        self.main = True  # only the main process warns and prints (the others still judge)

        def warn_on_main(message: str, category: type[Warning]) -> None:
            if self.main:
                warn(message, category)

        WarnOnceSink(lambda message: warn_on_main(message, UserWarning)).attach(self.monitor)
        self.failsafe = FailSafe(strict=strict, owner=owner, warn=lambda message: warn_on_main(message, GradwatchWarning))
        self.owner = owner
        self.driver: StepDriver | None = None
        self._lr_hooks: list[Any] = []
        self._saved: dict[str, Any] | None = None  # a checkpoint loaded before the driver exists

    # -- the driver -----------------------------------------------------------------------------

    def bind(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: Clip, *,
             loss_reduction: str = "mean", restore_lr_after_step: bool = False) -> StepDriver:
        """Build the driver for this model and optimizer (again when the optimizer changed),
        continuing the step count and any checkpoint loaded before training started.

        Args:
            model: The model (layers are named after its modules).
            optimizer: The optimizer (unwrapped: ``torch.optim.Optimizer``).
            clip: How this trainer clips.
            loss_reduction: How the losses recorded for a step combine. Defaults to ``"mean"``.
            restore_lr_after_step: Put the scheduled LR back in an optimizer step post-hook (for
                trainers without an event right after ``optimizer.step()``). Defaults to False.

        Returns:
            The driver.
        """
        previous = self.driver
        self._remove_lr_hooks()
        self.driver = StepDriver(
            self.monitor, model=model, optimizers=[optimizer], failsafe=self.failsafe, every=self.every,
            names=self.names, rollback_every=self.rollback_every, param_norm_every=self.param_norm_every,
            clip=clip, loss_reduction=loss_reduction,
        )
        if self._saved is not None:
            self.driver.load_counters(self._saved)  # the monitor was restored when it was loaded
            self._saved = None
        elif previous is not None:
            self.driver.step = previous.step
            self.driver.measured = previous.measured
            previous.close()
        if restore_lr_after_step:
            driver = self.driver
            self._lr_hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: driver.restore_lr(opt)))
        return self.driver

    @property
    def step(self) -> int:
        """Optimizer steps of the watched optimizer seen so far."""
        if self.driver is not None:
            return self.driver.step
        return int(self._saved.get("step", 0)) if self._saved else 0

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state and the step counts, plain Python (saved in checkpoints)."""
        if self.driver is not None:
            return self.driver.state_dict()
        if self._saved is not None:
            return dict(self._saved)
        return {"monitor": self.monitor.state_dict(), "step": 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: same history, findings, remedy state and step count.

        Raises:
            ValueError: if ``state_dict`` is not such a state.
        """
        if not isinstance(state_dict, dict) or "monitor" not in state_dict:
            raise ValueError(
                f"{self.owner}.load_state_dict expects what {self.owner}.state_dict() returned (a dict "
                f"with 'monitor' and 'step'). Received {type(state_dict).__name__}"
                + (f" with keys {sorted(state_dict)}." if isinstance(state_dict, dict) else ".")
            )
        if self.driver is not None:
            self.driver.load_state_dict(state_dict, owner=self.owner)
        else:
            self.monitor.load_state_dict(state_dict["monitor"])
            self._saved = dict(state_dict)

    # -- results --------------------------------------------------------------------------------

    def report(self) -> Report:
        """The run's :class:`gradwatch.Report` so far."""
        return self.monitor.report()

    @property
    def healthy(self) -> bool:
        """No finding of severity warning or error so far."""
        return self.monitor.healthy

    def release(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give the run back as it was (also after monitoring stopped): the scheduled LR, no
        hooks, no snapshot."""
        try:
            if self.driver is not None:
                if optimizer is not None:
                    self.driver.restore_lr(optimizer)
                self.driver.close()
            self._remove_lr_hooks()
        except Exception as exc:  # never break training, not even on the way out
            self.failsafe.fail(exc)

    def finish(self, say: Callable[[str], Any] = print) -> Report | None:
        """The end of training: hand the final report to the plugins, close the sinks, and show
        its summary (on the main process) when the run was not healthy.

        Args:
            say: How to show the summary. Defaults to ``print``.

        Returns:
            The final report, or None when gradwatch failed to make it.
        """
        self.release()
        report: Report | None = None
        try:
            report = self.monitor.finish()
        except Exception as exc:
            self.failsafe.fail(exc)
        for sink in self.sinks:
            sink.close()
        if report is not None and not report.healthy and self.main:
            say("gradwatch report:\n" + report.summary())
        return report

    def _remove_lr_hooks(self) -> None:
        for handle in self._lr_hooks:
            handle.remove()
        self._lr_hooks = []
