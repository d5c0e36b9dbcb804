"""The handle behind ``gradwatch.watch``: optimizer hooks around the shared step driver.

See :mod:`gradwatch.integrations.torch` for the user's view. :class:`Watch` only says where the
step is (an optimizer step pre-hook, once per round of the optimizers that step together), how
it learns about a ``GradScaler`` skip, and where the loss comes from (``record_loss``); the step
itself is :class:`~gradwatch.integrations.torch.driver.StepDriver`'s.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from gradwatch.failsafe import FailSafe
from gradwatch.monitor import Monitor
from gradwatch.policy import Policy
from gradwatch.report import Report
from gradwatch.sinks import Sink, resolve_sinks

from .driver import StepDriver
from .layout import LayerNames, TorchParams, unwrap

__all__ = ["Watch"]

_WATCHED: weakref.WeakKeyDictionary[Any, Watch] = weakref.WeakKeyDictionary()
"""Models and optimizers under a live watch: a second watch of the same one is refused."""


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
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
    for opt in optimizers:
        if _needs_closure(opt):
            raise TypeError(
                f"gradwatch.watch cannot watch {type(opt).__name__}: its step(closure) evaluates the loss "
                "and gradients itself, several times, after gradwatch's pre-step hook, so gradwatch "
                "could neither see nor change the gradients it uses. Watch a first-order optimizer "
                "(SGD, Adam, ...) that steps after loss.backward()."
            )
    return optimizers


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """LBFGS and any optimizer whose ``step`` requires a closure."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _check_model(model: Any, optimizers: list[torch.optim.Optimizer]) -> None:
    if model is None:
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gradwatch.watch needs a torch.nn.Module as model. Received {type(model).__name__}.")
    owned = {id(p) for p in unwrap(model).parameters()}  # type: ignore[union-attr]
    if not owned:
        raise ValueError(
            f"gradwatch.watch: the model ({type(model).__name__}) has no parameters, so there are no "
            "gradients to watch. Pass the model the optimizer trains (or model=None to name "
            "parameters by position)."
        )
    held = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    if not any(i in owned for i in held):
        raise ValueError(
            f"gradwatch.watch: the optimizer holds none of the model's {len(owned)} parameters "
            f"(it holds {len(held)} others), so it does not train this model. Pass the optimizer built "
            "from this model's parameters (torch.optim.Adam(model.parameters()))."
        )


class Watch:
    """Watch the gradients of ``model`` as ``optimizer`` trains it, and apply remedies.

    What :func:`gradwatch.watch` returns. The options are the same keywords, with the same
    meaning, as those of the Lightning, Hugging Face and Keras callbacks (docs/api.md).

    Args:
        model: The model (names layers by their ``named_modules`` path). May be None: parameters
            are then named ``optimizer0.param3``.
        optimizer: The optimizer, or a list of optimizers that step together after the same
            ``backward()`` (a GAN's generator and discriminator step after different backward
            passes: watch each pair separately). Not LBFGS or another optimizer whose ``step``
            evaluates a closure: its gradients are computed where gradwatch cannot see them.
        policy: ``"auto"`` (skip non-finite steps, clip and decay the LR on explosions, recommend
            BatchNorm where gradients vanish), ``"observe"`` (never touch training) or a
            :class:`gradwatch.Policy`. Defaults to ``"auto"``.
        scaler: The ``torch.amp.GradScaler`` in use, so that the steps it skips are counted.
            Defaults to None.
        every: Measure every N optimizer steps. On the other steps only the standing controls
            that need no measurement apply (LR factor, clip level); a non-finite gradient there is
            not seen and not skipped. Defaults to 1.
        strict: Raise gradwatch's own internal errors instead of warning once and stopping.
            Defaults to False.
        names: How layers are named: None (the module path), a mapping from module path to a name,
            or a function of the module path. Defaults to None.
        rollback_every: Keep a copy of the parameters and optimizer state, refreshed after N
            healthy measured steps in a row, that ``auto`` restores when the parameters turn
            non-finite, an LR jump wrecked them or the step size runs away. Costs one copy of the
            parameters and of the optimizer state. Defaults to ``"auto"``: every 20 under a policy
            that rolls back, while that copy (counted as three times the parameters) fits in
            1 GiB; beyond it none, with one INFO log line saying so. None: never.
        param_norm_every: Measure the parameter norms (for the vanishing detector's
            ``||g|| / ||W||``) every N measured steps, reusing the last values in between (they
            change slowly), and in any case on a step with a non-finite gradient or loss (to see
            non-finite parameters) and before a rollback snapshot. 1: every measured step; 0:
            never. Defaults to 10.
        sinks: Where else this run's numbers, findings and actions go:
            :class:`gradwatch.sinks.Sink` objects or file paths (JSON Lines), attached to this
            watch's monitor only. Defaults to None.
        monitor: A :class:`gradwatch.Monitor` to use instead of a new one (custom detectors,
            history length); its own policy is used and ``policy`` is ignored. Defaults to None.
        distributed: Measure across the ranks of ``torch.distributed`` (DDP, FSDP, FSDP2): one
            small collective per measured step, so every rank sees the global norms and takes the
            same decision; only rank 0 emits events (sinks, reports). None: when
            ``torch.distributed`` is initialised with more than one rank; False: this process
            alone. Every rank must watch and step together. See docs/distributed.md.
            Defaults to None.

    Raises:
        TypeError: for an optimizer, model or scaler of the wrong type, or an optimizer that steps
            with a closure (LBFGS).
        ValueError: for ``every`` or ``rollback_every`` below 1, a model without parameters, or an
            optimizer that holds none of the model's parameters.
        RuntimeError: for a model or optimizer already watched by another live handle, or
            ``distributed=True`` without an initialised process group.

    Attributes:
        monitor: The :class:`gradwatch.Monitor` judging the run.
        driver: The :class:`~gradwatch.integrations.torch.driver.StepDriver` doing each step.
        sinks: The sinks attached to the monitor.
        removed: True once :meth:`remove` ran.
    """

    removed: bool

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
        rollback_every: int | str | None = "auto",
        param_norm_every: int = 10,
        sinks: Any = None,
        monitor: Monitor | None = None,
        distributed: bool | None = None,
    ) -> None:
        optimizers = _optimizers(optimizer)
        _check_model(model, optimizers)
        if scaler is not None and not hasattr(scaler, "_per_optimizer_states"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler. Received {type(scaler).__name__}.")
        for watched in [model, *optimizers]:
            other = _WATCHED.get(watched) if watched is not None else None
            if other is not None and not other.removed:
                what = "model" if watched is model else "optimizer"
                raise RuntimeError(
                    f"This {what} ({type(watched).__name__}) is already watched by another gradwatch.watch "
                    "handle, which would see gradients this one had already clipped. Use that handle, or "
                    "call its .remove() first."
                )
        self.model = model
        self.optimizers = optimizers
        self.scaler = scaler
        self.monitor = monitor if monitor is not None else Monitor(policy=policy, framework="torch")
        self.failsafe = FailSafe(strict=strict, owner="gradwatch.watch")
        self.driver = StepDriver(
            self.monitor, model=model, optimizers=optimizers, failsafe=self.failsafe, every=every,
            names=names, rollback_every=rollback_every, param_norm_every=param_norm_every,
            distributed=distributed,
        )
        self.sinks: list[Sink] = [s.attach(self.monitor) for s in resolve_sinks(sinks)]
        self.strict = strict
        self._round: set[int] = set()
        self._fired_since_update: set[int] = set()
        self.removed = False
        self._handles: list[Any] = []
        for k, opt in enumerate(optimizers):
            self._handles.append(opt.register_step_pre_hook(self._make_pre_hook(k)))
            self._handles.append(opt.register_step_post_hook(self._make_post_hook()))
        self._output_hook: Any = None
        self._scaler_update: Any = None
        if scaler is not None:
            original = scaler.update

            def update(new_scale: Any = None) -> None:
                self.failsafe.guard(self._before_scaler_update)
                return original(new_scale)

            scaler.update = update
            self._scaler_update = update
        if model is not None:
            # The first forward passes: the width of a 2-D output (a cross-entropy's chance level
            # is ln(width), and the loss tensor's graph no longer holds it after backward():
            # StepStats.chance_loss) and, for a squared error, the output and its gradient
            # (the targets, for StepStats.null_loss).
            self._output_hook = unwrap(model).register_forward_hook(self._see_output)  # type: ignore[union-attr]
            self._handles.append(self._output_hook)
        for watched in [model, *optimizers]:
            if watched is not None:
                _WATCHED[watched] = self

    # -- public ---------------------------------------------------------------------------------

    @property
    def params(self) -> TorchParams:
        """The measured parameters and their layout."""
        return self.driver.params

    @property
    def step(self) -> int:
        """Optimizer steps seen so far (including steps GradScaler skipped)."""
        return self.driver.step

    @property
    def every(self) -> int:
        return self.driver.every

    def record_loss(self, loss: Any) -> None:
        """Record the loss of the coming optimizer step (enables ``loss_spike``). No host sync:
        a tensor is kept on the device and read in the step's single transfer. Called several times
        before one step (gradient accumulation), the mean is recorded. Call it before
        ``optimizer.step()``.

        Args:
            loss: A scalar tensor (one element) or a real number.

        Raises:
            TypeError: for anything else, such as a string or a per-sample loss tensor (pass
                ``loss.mean()``).
        """
        self.driver.record_loss(loss)

    def report(self) -> Report:
        """The run's :class:`gradwatch.Report` so far."""
        return self.monitor.report()

    @property
    def healthy(self) -> bool:
        """No finding of severity warning or error so far."""
        return self.monitor.healthy

    @property
    def lr_factor(self) -> float:
        """The learning-rate factor in force over the user's schedule (1.0: untouched)."""
        return float(self.monitor.controls.lr_factor)

    def remove(self) -> None:
        """Remove the hooks, put the LR schedule back as the user set it and free the snapshot.
        The first call also hands the final report to the ``gradwatch_on_report`` plugins and
        closes the sinks. Safe to call twice."""
        if self.removed:
            return
        self.removed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for opt in self.optimizers:
            self.driver.restore_lr(opt)
        if self.scaler is not None and self.scaler.__dict__.get("update") is self._scaler_update:
            del self.scaler.__dict__["update"]
        self.driver.close()
        try:
            self.monitor.finish()
        except Exception as exc:
            self.failsafe.fail(exc)
        self.failsafe.stop()
        for sink in self.sinks:
            sink.close()
        for watched in [self.model, *self.optimizers]:
            if watched is not None and _WATCHED.get(watched) is self:
                del _WATCHED[watched]

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
        return self.driver.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run from :meth:`state_dict`: same history, same remedy state (clip level,
        LR factor), same step count.

        Args:
            state: What :meth:`state_dict` returned.

        Raises:
            ValueError: if ``state`` is not a watch state.
        """
        self.driver.load_state_dict(state, owner="Watch")

    # -- hooks ----------------------------------------------------------------------------------

    def _make_pre_hook(self, k: int) -> Any:
        def pre_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            if self.failsafe.active:
                # args holds the optimizer itself, then step's own positional arguments.
                if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
                    self.failsafe.refuse(
                        f"gradwatch stopped watching: {type(optimizer).__name__}.step(closure) recomputes "
                        "the gradients inside step(), after gradwatch's pre-step hook, so gradwatch can "
                        "neither see nor change the gradients it uses. Training goes on unchanged. Call "
                        "loss.backward() before optimizer.step() without a closure to watch this run."
                    )
                    return
                self.failsafe.guard(self._pre_step, k, optimizer)

        return pre_hook

    def _make_post_hook(self) -> Any:
        def post_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            try:  # also after monitoring stopped: the user's LR must come back
                self.driver.restore_lr(optimizer)
            except Exception as exc:
                self.failsafe.fail(exc)

        return post_hook

    def _see_output(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.failsafe.guard(self.driver.see_output, output)
        if not self.driver.wants_outputs or not self.failsafe.active:
            self._output_hook.remove()  # the first forward passes say all there is to learn

    def _pre_step(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        self._fired_since_update.add(k)
        if k in self._round or not self._round:
            self._round = set()
            found_inf = getattr(optimizer, "found_inf", None)  # a fused optimizer under GradScaler
            self.driver.before_optimizer_step(
                grad_scale=getattr(optimizer, "grad_scale", None),
                # The fused kernel will skip this step on its own: a scaler skip, not an explosion.
                skipped=found_inf is not None and float(found_inf) > 0,
            )
        self._round.add(k)
        if self.failsafe.active:
            self.driver.apply_lr(optimizer)

    def _before_scaler_update(self) -> None:
        """GradScaler.update: an optimizer that the scaler stepped but whose pre-hook did not fire
        had its step skipped (inf/NaN in the scaled gradients)."""
        if not self.failsafe.active:
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
            self.driver.note_scaler_skip()
            self._round = set()
