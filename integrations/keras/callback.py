"""The ``GradWatch`` Keras callback: hands each measured step to the monitor, writes its controls
back into the step's variables. See :mod:`gradwatch.integrations.keras`."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from typing import Any, cast

import numpy as np

from gradwatch.detectors.exploding import NULL_ROWS, NULL_STEPS
from gradwatch.errors import require
from gradwatch.failsafe import FailSafe
from gradwatch.monitor import Monitor
from gradwatch.options import check_every, check_rollback_every
from gradwatch.policy import AutoPolicy, ObservePolicy, Policy
from gradwatch.report import Report
from gradwatch.sinks import Sink, resolve_sinks
from gradwatch.stats import StepStats

require("keras", "keras")

import keras  # noqa: E402

from .batches import BatchTap  # noqa: E402
from .rollback import KerasRollbacks, KerasSnapshot, resolve_rollback_every  # noqa: E402
from .step import (  # noqa: E402
    BLOCKS,
    COL_HAS_LOSS,
    COL_LOSS,
    COL_LR,
    COL_LR_FACTOR,
    COL_SKIPPED,
    COL_STEP,
    COL_TARGET_ROWS,
    COL_TARGET_SQUARE,
    HEAD,
    StepProbe,
    probe_of,
)

STATE_VERSION = 1


def _build_optimizer(model: Any) -> bool:
    """Build the optimizer of a built model now, as ``fit`` does under a distribution strategy
    (TensorFlow otherwise builds it inside the first traced step, and gradwatch's variables
    created there too would make ``tf.function`` trace the step a second time). Returns whether
    the optimizer is built (False for a model that its first step builds)."""
    optimizer = model.optimizer
    if optimizer.built:
        return True
    if not model.built or not model.trainable_variables:
        return False
    with keras.name_scope(optimizer.name, caller=optimizer):
        optimizer.build(model.trainable_variables)
    return True

__all__ = ["GradWatch"]


class GradWatch(keras.callbacks.Callback):
    """Watch the gradients of ``model.fit``, diagnose them and apply remedies in the step.

    Args:
        policy: ``"auto"`` (skip non-finite steps, clip exploding norms, decay the learning rate,
            recommend BatchNormalization), ``"observe"`` (never changes training) or a
            :class:`gradwatch.Policy`. Defaults to ``"auto"``.
        every: Measure every ``every``-th optimizer step. The statistics are computed in the step
            either way (the remedies need them); only measured steps are read by the host, so
            other batches keep Keras' asynchronous dispatch. Defaults to 1.
        strict: Raise gradwatch's own internal errors instead of warning once and stopping.
            Defaults to False.
        sinks: Where else this run's numbers, findings and actions go:
            :class:`gradwatch.sinks.Sink` objects or file paths (JSON Lines), attached to this
            callback's monitor only. Defaults to None.
        monitor: A :class:`gradwatch.Monitor` to use instead of a new one (its policy, detectors
            and history are used; ``policy``, ``history`` and ``detectors`` are then ignored).
            Defaults to None.
        history: Steps of per-layer history kept for the report. Defaults to 256.
        detectors: The detectors to run. Defaults to the built-ins plus those of plugins.
        rollback_every: Keep a host copy of the weights, the optimizer's slots and
            BatchNormalization's moving statistics, taken before the fit's first step and
            after N healthy measured steps in a row, that ``auto`` restores when the weights turn
            non-finite, an LR jump wrecked them or the step size runs away (a newer copy replaces
            it once the next measured step, run on the copied weights, is read healthy: two host
            copies until then). Defaults to
            ``"auto"``: every 20 under a policy that rolls back, while the copy (counted as three
            times the weights) fits in 1 GiB; None: never.

    The shared options (``policy``, ``every``, ``strict``, ``sinks``, ``monitor``,
    ``rollback_every``) mean what they mean for every adapter (docs/api.md). ``history`` and
    ``detectors`` are Keras's own so that :meth:`get_config` can save them; a parameter-norm
    schedule does not apply (they are computed inside the compiled step).

    Under ``policy="auto"``, from gradwatch's first action in a fit on, the batch and epoch logs
    (progress bar, ``History``) also carry what it is doing: ``gw_skipped`` (batches skipped this
    epoch), ``gw_clip`` (the clip level in force, 0 for none), ``gw_lr_factor`` (the
    learning-rate factor in force) and, with snapshots, ``gw_rollbacks`` (rollbacks this epoch).
    A run gradwatch leaves alone logs only ``grad_norm``.

    Raises:
        ValueError: for ``every < 1``, a bad ``rollback_every`` or an unknown policy.

    Attributes:
        monitor: The :class:`gradwatch.Monitor` doing the judging.
    """

    def __init__(
        self,
        policy: str | Policy | None = "auto",
        every: int = 1,
        strict: bool = False,
        *,
        sinks: Any = None,
        monitor: Monitor | None = None,
        history: int = 256,
        detectors: list | None = None,
        rollback_every: int | str | None = "auto",
    ) -> None:
        super().__init__()
        self.policy_arg = policy
        self.every = check_every(every)
        self.rollback_every = check_rollback_every(rollback_every)
        self.strict = bool(strict)
        self.monitor = monitor if monitor is not None else Monitor(
            policy=policy, detectors=detectors, history=history, framework=f"keras/{keras.backend.backend()}"
        )
        self.history = self.monitor.history
        self.sinks: list[Sink] = [s.attach(self.monitor) for s in resolve_sinks(sinks)]
        # strict: the reader is stopped before the error is raised, so that nothing waits for it.
        self.failsafe = FailSafe(strict=strict, owner="GradWatch")
        self._lock = threading.Lock()
        self._probe: StepProbe | None = None
        self._count = 0
        """Optimizer steps counted by the probe so far (continues across fits)."""
        self._next_step = 0
        """The first step not yet handed to the monitor."""
        self._batches = 0
        """Training batches run so far (continues across fits)."""
        self._started = 0
        self._done = 0
        """Batches whose statistics have been read (the reader may lag behind under async dispatch)."""
        self._epoch_base = 0
        self._fit_batches0 = 0
        self._fit_count0 = 0
        self._loss_scale_skips = 0
        self._due: deque[int] = deque()
        """Batch counts after executions with a measured step (main thread only)."""
        self._decisions: deque[tuple[int, Any]] = deque()
        """(batches read, controls) whenever the monitor's controls changed, oldest first."""
        self._written: Any = None
        self._epoch_norms: list[float] = []
        self._rollbacks = KerasRollbacks(None, None)
        self._skipped_epoch = 0
        self._rollbacks_epoch = 0
        self._chance_loss: float | None = None
        self._null: NullPool | None = None
        self._acted = False

    @property
    def async_safe(self) -> bool:
        """Batches not measured need no host sync, so Keras may dispatch callbacks asynchronously."""
        return True

    # -- Keras hooks ---------------------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.failsafe.active:
            return
        try:
            model = self._model
            optimizer = model.optimizer
            stale = probe_of(optimizer)
            if stale is not None:  # left behind by a fit that raised before on_train_end
                stale.remove()
            _build_optimizer(model)
            steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
            remedies = not isinstance(self.monitor.policy, ObservePolicy)
            tap = BatchTap(
                model, keras.backend.backend(),
                exclude_skipped=remedies and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer),
            )
            tap.targets = is_squared_error(model)
            self._probe = StepProbe(
                model, optimizer, ring=max(16, 4 * steps_per_execution), remedies=remedies,
                strict=self.strict, tap=tap,
            )
            self._probe.install(self.monitor.controls, self._count)
            probe = self._probe
            probe.clip_in_program = math.isfinite(self.monitor.controls.clip_norm)
            probe.lr_in_program = self.monitor.controls.lr_factor != 1.0
            every = resolve_rollback_every(self.rollback_every, self.monitor.policy, model.trainable_variables)
            self._rollbacks = KerasRollbacks(every, lambda: KerasSnapshot(model, probe.target, probe.owned))
            self._chance_loss = chance_loss_of(model)
            self._null = NullPool() if tap.targets else None
            self._written = self.monitor.controls
            self._acted = False
            self._decisions.clear()
            self._due.clear()
            self._fit_batches0, self._fit_count0, self._loss_scale_skips = self._batches, self._count, 0
            self._started = self._done = self._batches
            # The train function was traced before this hook; trace it again with the probe in.
            probe.retrace()
        except Exception as exc:
            self.failsafe.fail(exc)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_base = self._batches
        self._epoch_norms = []
        self._skipped_epoch = self._rollbacks_epoch = 0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        # Runs on the thread that runs fit, between two steps: the only safe place to write.
        probe = self._probe
        if probe is None or not self.failsafe.active:
            return
        started = self._epoch_base + int(batch)
        # Controls decided on execution k take effect from execution k + 2, the same on every
        # backend and whatever the timing of the asynchronous reader: a run is reproducible
        # while the reader of execution k overlaps the device running execution k + 1.
        decided_by = started - probe.steps_per_execution
        previous, self._started = self._started, started
        if probe.remedies and started > previous and (started - 1) // self.every != (previous - 1) // self.every:
            self._due.append(started)  # the execution that just ended has a measured step
        read_through = -1
        while self._due and self._due[0] <= decided_by:
            read_through = self._due.popleft()
        self._keep_up(started, probe, read_through)
        controls = None
        while self._decisions and self._decisions[0][0] <= decided_by:
            controls = self._decisions.popleft()[1]
        try:
            if started == self._fit_batches0 and self._rollbacks.active:
                self._keep_initial_copy(started)
            done = self._rollbacks.at_boundary(
                started, decided_by, lambda n: self._keep_up(started, probe, n)
            )
            if done == "restored":
                self._rollbacks_epoch += 1
            if controls is not None and controls != self._written:
                probe.write_controls(controls)
                probe.select_program(math.isfinite(controls.clip_norm), controls.lr_factor != 1.0)
                self._written = controls
        except Exception as exc:
            self.failsafe.fail(exc)

    def _keep_initial_copy(self, started: int) -> None:
        """The first snapshot of the fit, before its first step, optimizer slots included (the
        optimizer is built by ``on_train_begin`` where the model is)."""
        if not self._model.optimizer.built:
            return  # a model built by its first step: the first copy comes after it
        self._rollbacks.begin(started)

    def _keep_up(self, started: int, probe: StepProbe, read_through: int) -> None:
        """Wait for the asynchronous reader: until it has read ``read_through`` batches, and while
        it lags so far behind that the ring would overwrite rows it has not read."""
        room = probe.ring - 2 * probe.steps_per_execution
        deadline = time.monotonic() + 60.0
        while (
            (self._done < read_through or started - self._done > room)
            and self.failsafe.active
            and time.monotonic() < deadline
        ):
            time.sleep(0.0002)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self.failsafe.active or self._probe is None:
            return
        with self._lock:
            try:
                if self._probe.error is not None:
                    raise self._probe.error
                total = self._epoch_base + int(batch) + 1
                previous = self._batches
                if total <= previous:
                    return
                self._batches = total
                try:
                    if (total - 1) // self.every != (previous - 1) // self.every:
                        self._consume(logs)  # else no measured step among these steps: no host sync
                    if logs is not None:
                        self._log_actions(logs)
                finally:
                    self._done = max(self._done, total)
            except Exception as exc:
                self.failsafe.fail(exc)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or self._probe is None:
            return
        finite = [x for x in self._epoch_norms if math.isfinite(x)]
        if finite:
            logs["grad_norm"] = float(np.mean(finite))
        self._log_actions(logs)

    def _log_actions(self, logs: dict) -> None:
        """What gradwatch is doing, for the progress bar and ``History`` (``policy="auto"``)."""
        probe = self._probe
        if probe is None or not probe.remedies or not self.failsafe.active:
            return
        controls = self._written
        if not self._acted:
            # Quiet while gradwatch has changed nothing in this fit; from its first action on,
            # the keys stay for the rest of the fit.
            self._acted = (self._skipped_epoch > 0 or self._rollbacks_epoch > 0
                           or math.isfinite(controls.clip_norm) or controls.lr_factor != 1.0)
            if not self._acted:
                return
        logs["gw_skipped"] = self._skipped_epoch
        logs["gw_clip"] = float(controls.clip_norm) if math.isfinite(controls.clip_norm) else 0.0
        logs["gw_lr_factor"] = float(controls.lr_factor)
        if self._rollbacks.active:
            logs["gw_rollbacks"] = self._rollbacks_epoch

    def on_train_end(self, logs: dict | None = None) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        try:
            if self.failsafe.active:
                count, _ = probe.read()
                self._note_loss_scale_skips(count)
                self._count = count
        except Exception as exc:
            self.failsafe.fail(exc)
        finally:
            probe.remove()
            self._rollbacks.forget()
            # The traced step holds the probe: the next fit must trace a clean one.
            self._model.train_function = None
        try:
            self.monitor.finish()
        except Exception as exc:
            self.failsafe.fail(exc)
        for sink in self.sinks:
            sink.close()

    # -- reading the step ----------------------------------------------------------------------

    def _consume(self, logs: dict | None) -> None:
        probe = self._probe
        assert probe is not None
        count, ring = probe.read()
        self._note_loss_scale_skips(count)
        start = max(self._next_step, count - probe.ring)
        newest = None
        for step in range(start, count):
            row = ring[step % probe.ring]
            if int(row[COL_STEP]) != step:
                continue
            if row[COL_SKIPPED] > 0.5:
                self._skipped_epoch += 1
            if step % self.every:
                continue
            stats = self._stats(row, probe)
            # Keyed by the batch count through this step (not by this call: calls may run out of
            # order), so what it decides takes effect at the same step whatever the timing.
            key = self._fit_batches0 + step + 1 - self._fit_count0
            self._rollbacks.judge_first(stats.finite and not stats.params_nonfinite.any())
            decision = self._observe(stats, row, probe, can_rollback=self._rollbacks.can_rollback(key - 1))
            newest = stats
            self._rollbacks.record(key, decision.healthy_after(stats), decision.rollback)
            controls = self.monitor.controls
            if controls != (self._decisions[-1][1] if self._decisions else self._written):
                self._decisions.append((key, controls))
        self._next_step = max(self._next_step, count)
        self._count = count
        if newest is not None:
            norm = float(newest.global_norm)
            self._epoch_norms.append(norm)
            if logs is not None:
                logs["grad_norm"] = norm

    def _observe(self, stats: StepStats, row: np.ndarray, probe: StepProbe, *, can_rollback: bool) -> Any:
        """``monitor.observe`` of a step that already ran (``immediate=False``).

        ``stats.lr`` is the LR the step ran with; the policy reads it as the user's scheduled LR
        times the factor it has in force now (as in PyTorch, where a decision takes effect on
        the very next step). Here a decision takes effect two executions later, so a step that
        was running when the factor changed ran with the previous one; read as it is, it would
        look as if the user's LR had jumped by the inverse of the change (measured: a second
        decay and a second rollback for nothing after a step-size explosion, and an LR hold
        that flips on and off after an LR jump). For such a step, and for the policy only,
        ``lr`` is the scheduled LR times the factor in force; plugins, sinks and the report see
        the LR the step ran with.
        """
        monitor = self.monitor
        ran_with, in_force = float(row[COL_LR_FACTOR]), float(monitor.controls.lr_factor)
        if not probe.remedies or stats.lr is None or not math.isfinite(stats.lr) or not ran_with > 0 \
                or ran_with == in_force:
            return monitor.observe(stats, immediate=False, can_rollback=can_rollback)
        policy = monitor.policy
        monitor.policy = cast(Policy, _AtLr(policy, stats.lr / ran_with * in_force))
        try:
            return monitor.observe(stats, immediate=False, can_rollback=can_rollback)
        finally:
            monitor.policy = policy

    def _stats(self, row: np.ndarray, probe: StepProbe) -> StepStats:
        assert probe.layout is not None
        n, o = probe.n, len(HEAD)
        blocks = {name: row[o + i * n: o + (i + 1) * n] for i, name in enumerate(BLOCKS)}
        stats = StepStats(
            step=int(row[COL_STEP]),
            layout=probe.layout,
            grad_norm=blocks["grad_norm"].astype(np.float64),
            param_norm=blocks["param_norm"].astype(np.float64),
            zero_fraction=blocks["zero_fraction"].astype(np.float64),
            dead_fraction=blocks["dead_fraction"].astype(np.float64),
            has_grad=blocks["has_grad"] > 0.5,
            loss=float(row[COL_LOSS]) if row[COL_HAS_LOSS] > 0.5 else None,
            lr=float(row[COL_LR]),
        )
        if self._chance_loss is not None and hasattr(stats, "chance_loss"):
            stats.chance_loss = self._chance_loss
        if self._null is not None:
            stats.null_loss = self._null.see(float(row[COL_TARGET_SQUARE]), float(row[COL_TARGET_ROWS]))
        return stats

    def _note_loss_scale_skips(self, count: int) -> None:
        """Steps the ``LossScaleOptimizer`` skipped never reach the inner optimizer's ``apply``:
        they are the batches run minus the steps counted."""
        model = self._model
        if model is None or not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            return
        skipped = (self._batches - self._fit_batches0) - (count - self._fit_count0)
        while self._loss_scale_skips < skipped:
            self._loss_scale_skips += 1
            self.monitor.note_skipped(count, "loss_scale")

    # -- results and state ---------------------------------------------------------------------

    def report(self) -> Report:
        """The :class:`gradwatch.Report` of everything watched so far."""
        return self.monitor.report()

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-friendly (``from_config`` rebuilds the callback).

        Raises:
            ValueError: for a custom policy object, which cannot be serialised.
        """
        policy = self.monitor.policy
        if isinstance(policy, AutoPolicy):
            policy_config: Any = policy.describe()
        elif isinstance(policy, ObservePolicy):
            policy_config = "observe"
        else:
            raise ValueError(
                f"GradWatch.get_config supports the 'auto' and 'observe' policies; received a custom "
                f"{type(policy).__name__}. Rebuild the callback with that policy instead."
            )
        return {"policy": policy_config, "every": self.every, "strict": self.strict, "history": self.history,
                "rollback_every": self.rollback_every}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradWatch:
        """Rebuild a callback from :meth:`get_config` output."""
        config = dict(config)
        policy = config.pop("policy", "auto")
        if isinstance(policy, dict):
            params = {k: v for k, v in policy.items() if k != "name"}
            policy = AutoPolicy(**params)
        return cls(policy=policy, **config)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue watching a resumed run: plain Python, JSON-safe.

        Save it next to the model checkpoint (``json.dump(cb.state_dict(), f)``) and hand it to
        :meth:`load_state_dict` of a new callback before resuming ``fit``.

        Returns:
            The state.
        """
        return {
            "version": STATE_VERSION,
            "monitor": self.monitor.state_dict(),
            "count": self._count,
            "next_step": self._next_step,
            "batches": self._batches,
            "loss_scale_skips": self._loss_scale_skips,
            "healthy_since_snapshot": self._rollbacks.healthy_run,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the step count, the detectors' windows and the
        remedies in force (clip level, learning-rate factor) continue where they were.

        Raises:
            ValueError: if the state is not a GradWatch state of this version.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Not a GradWatch state of version {STATE_VERSION}: received {type(state).__name__} "
                f"with version {state.get('version') if isinstance(state, dict) else None!r}."
            )
        self.monitor.load_state_dict(state["monitor"])
        self._count = int(state["count"])
        self._next_step = int(state["next_step"])
        self._batches = self._done = int(state["batches"])
        self._loss_scale_skips = int(state["loss_scale_skips"])
        self._rollbacks.healthy_run = int(state.get("healthy_since_snapshot", 0))
        self._decisions.clear()
        self._decisions.append((self._batches, self.monitor.controls))


class _AtLr:
    """The monitor's policy, deciding on a step as if it had run at ``lr`` (see
    ``GradWatch._observe``); everything else is the policy's own."""

    def __init__(self, policy: Policy, lr: float) -> None:
        self._policy, self._lr = policy, lr

    def decide(self, findings: Any, stats: StepStats, state: Any, **kwargs: Any) -> Any:
        return self._policy.decide(findings, dataclasses.replace(stats, lr=self._lr), state, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


CROSS_ENTROPIES = {
    "sparse_categorical_crossentropy": "categorical", "categorical_crossentropy": "categorical",
    "SparseCategoricalCrossentropy": "categorical", "CategoricalCrossentropy": "categorical",
    "binary_crossentropy": "binary", "BinaryCrossentropy": "binary",
}


SQUARED_ERRORS = {"mse", "mean_squared_error", "MeanSquaredError"}


def compiled_loss_name(model: Any, *, functions: bool = False) -> str | None:
    """The name of the model's one compiled loss: the string it was compiled with, the loss
    class's name, or the function a ``LossFunctionWrapper`` wraps (with ``functions``, also a
    plain function's own name); None for several losses or none."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, (list, tuple, dict)) or loss is None:
        return None
    if isinstance(loss, str):
        return loss
    name = getattr(loss, "__name__", type(loss).__name__) if functions else type(loss).__name__
    if name == "LossFunctionWrapper":
        name = getattr(getattr(loss, "fn", None), "__name__", name)
    return name


def is_squared_error(model: Any) -> bool:
    """The compiled loss is one mean squared error (``StepStats.null_loss`` applies)."""
    return compiled_loss_name(model, functions=True) in SQUARED_ERRORS


class NullPool:
    """The mean squared target of the run's first batches (``StepStats.null_loss``), pooled over
    ``NULL_ROWS`` rows or ``NULL_STEPS`` steps, whichever comes first; None until then, and for
    good when the batches carried no target."""

    def __init__(self) -> None:
        self.value: float | None = None
        self._total = 0.0
        self._rows = 0.0
        self._steps = 0
        self._done = False

    def see(self, square: float, rows: float) -> float | None:
        """One measured step's mean squared target and rows; returns the level once known."""
        if self._done:
            return self.value
        self._steps += 1
        if math.isfinite(square) and rows > 0:
            self._total += square * rows
            self._rows += rows
        if self._rows >= NULL_ROWS or self._steps >= NULL_STEPS:
            self._done = True
            level = self._total / self._rows if self._rows > 0 else math.nan
            self.value = level if math.isfinite(level) and level > 0 else None
        return self.value


def chance_loss_of(model: Any) -> float | None:
    """The loss of a model that has learnt nothing, from the compiled loss: ``ln C`` for a
    C-class cross-entropy (C from the model's output width), ``ln 2`` for a binary one; None for
    anything else (several losses, a regression loss, a custom one).

    Args:
        model: The compiled Keras model.

    Returns:
        The chance level, or None.
    """
    name = compiled_loss_name(model)
    kind = CROSS_ENTROPIES.get(name) if name is not None else None
    if kind == "binary":
        return math.log(2.0)
    if kind != "categorical":
        return None
    try:
        classes = int(model.outputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return math.log(classes) if classes >= 2 else None
