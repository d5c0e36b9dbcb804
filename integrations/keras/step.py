"""The in-graph half of the Keras adapter: measure and steer every optimizer step.

All three Keras trainers hand the gradients to the optimizer's ``apply``: TensorFlow and PyTorch
through ``apply_gradients``/``apply`` in ``train_step``, JAX through ``stateless_apply``, which runs
``apply`` inside a ``StatelessScope`` (docs/design.md, "Where to measure", point 2). A
:class:`StepProbe` replaces ``apply`` on the optimizer instance (the inner one of a
``LossScaleOptimizer``, where gradients are already unscaled) by a function that, inside the
compiled step (``tf.function``, XLA, ``jax.jit``):

1. reduces the gradients to per-variable norms, reads non-finiteness off those norms (a NaN/Inf
   element makes its tensor's norm non-finite), takes parameter norms and the share of exactly-zero
   bias gradients (a unit whose bias gradient is exactly zero got no signal on the whole batch);
2. carries out the standing orders of :class:`gradwatch.Controls`, kept in a variable because a
   Python attribute is frozen at trace time: skip a non-finite step (weights, optimizer state and
   ``iterations`` unchanged), clip the global norm, scale the learning rate (the rate itself, not
   the gradients, which would be wrong for Adam; while the factor is 1 the optimizer reads the
   user's own learning rate untouched, see :attr:`StepProbe.lr_in_program`);
3. writes one row of statistics into a small ring of rows, read by the callback on the host.

The ring, the step counter and the controls are tracked as variables of the optimizer for the
duration of ``fit``: on JAX only optimizer variables are threaded through ``stateless_apply``, any
other assignment is dropped. They are hidden from the optimizer's checkpoints (``save_own_variables``)
so checkpoints stay loadable without gradwatch, and untracked again when training ends.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from gradwatch.policy import Controls
from gradwatch.stats import UNIT_STREAK, Layout

from . import distributed as strategy
from .batches import BatchTap
from .host import ProbeReader, controls_vector
from .layout import keras_layout
from .neutral import optimizer_copies

HEAD = ("step", "global_norm", "lr", "skipped", "clip_scale", "loss", "has_loss", "lr_factor", "target_square",
        "target_rows")
"""The first columns of a row; then ``grad_norm``, ``param_norm``, ``zero_fraction`` and
``has_grad``, one entry per trainable variable each. ``loss`` is the batch's own loss (not the
epoch's running mean), ``has_loss`` 1 when the train step handed one to the loss tracker,
``lr_factor`` the learning-rate factor the step ran with (``lr`` includes it), ``target_square``
the batch's mean squared target and ``target_rows`` its rows, for a mean squared error (else NaN
and 0: :meth:`BatchTap.target`)."""
(COL_STEP, COL_GLOBAL, COL_LR, COL_SKIPPED, COL_SCALE, COL_LOSS, COL_HAS_LOSS, COL_LR_FACTOR, COL_TARGET_SQUARE,
 COL_TARGET_ROWS) = range(len(HEAD))
BLOCKS = ("grad_norm", "param_norm", "zero_fraction", "has_grad", "dead_fraction")


def base_optimizer(optimizer: Any) -> Any:
    """The optimizer that sees unscaled gradients: the inner one of a ``LossScaleOptimizer``."""
    import keras

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


class _ScaledLearningRate:
    """Stands in for ``optimizer._learning_rate`` during one ``apply``: the user's rate (float,
    variable or schedule, evaluated as Keras would) times the gradwatch factor. A plain callable,
    so the optimizer's ``learning_rate`` property calls it."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self) -> Any:
        return self.value


class StepProbe(ProbeReader):
    """Patch one optimizer so that each of its steps is measured and steered in-graph.

    Args:
        model: The Keras model being trained.
        optimizer: ``model.optimizer`` (a ``LossScaleOptimizer`` is looked through).
        ring: Rows kept between two reads by the host. Defaults to 16.
        remedies: Apply the controls (skip, clip, LR factor) in the step. False for the observe
            policy, whose steps are then computed exactly as without gradwatch. Defaults to True.
        strict: Raise an internal error met while tracing the step instead of training on
            unmeasured. Defaults to False.
        tap: Where the batch's loss comes from and where the skip flag goes
            (:class:`~gradwatch.integrations.keras.batches.BatchTap`). Defaults to None (no loss).
    """

    def __init__(
        self, model: Any, optimizer: Any, *, ring: int = 16, remedies: bool = True, strict: bool = False,
        tap: BatchTap | None = None,
    ) -> None:
        import keras

        self.keras = keras
        self.backend = keras.backend.backend()
        self.model = model
        self.optimizer = optimizer
        self.target = base_optimizer(optimizer)
        self.ring = int(ring)
        self.steps_per_execution = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        self.remedies = remedies
        self.strict = strict
        self.tap = tap
        self.clip_in_program = False
        """XLA steps (``jax.jit``, TensorFlow with ``jit_compile``): the clipping is compiled in
        only while a clip level is in force (:meth:`select_program`)."""
        self.lr_in_program = False
        """The step runs the optimizer with gradwatch's learning rate (the user's times the
        factor in the controls); set while the factor is not 1 (:meth:`select_program`). Else the
        optimizer reads its own learning rate, untouched: multiplying by 1.0 is exact, but one
        more multiplication (by a variable that holds 1) changes how Grappler and XLA rewrite the
        arithmetic that reads the rate, and so its rounding (weight decay's
        ``var - var * wd * lr`` with a ``LearningRateSchedule``: one unit in the last place, on
        TensorFlow graph and XLA steps and under ``jax.jit``, that a diverging run grows)."""
        self._programs: dict[tuple[bool, bool], Any] = {}
        if tap is not None and self.backend == "jax":
            tap.write_loss = self._write_loss_jax
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.installed = False
        self.ready = False
        self._previous: dict[str, Any] = {}
        self.owned: tuple = ()
        self.ring_var: Any = None
        self.count_var: Any = None
        self.controls_var: Any = None
        self.variables: list[Any] = []
        self.layout: Layout | None = None
        self.n = 0

    # -- install / remove ----------------------------------------------------------------------

    def install(self, controls: Controls, count: int) -> None:
        """Patch the optimizer; create and track the variables now if it is built, else in the
        first (traced) step, as Keras builds an optimizer whose model is built at trace time.

        Args:
            controls: The standing orders to start with.
            count: The step counter to continue from.
        """
        self._controls, self._count = controls, count
        target, outer = self.target, self.optimizer
        self._previous = {
            "apply": target.__dict__.get("apply"),
            "save_own_variables": outer.__dict__.get("save_own_variables"),
            "load_own_variables": outer.__dict__.get("load_own_variables"),
        }
        self._original_apply = target.apply
        original_save, original_load = outer.save_own_variables, outer.load_own_variables

        def apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
            return self._apply(grads, trainable_variables)

        def save_own_variables(store: Any) -> Any:
            with self._hidden():
                return original_save(store)

        def load_own_variables(store: Any) -> Any:
            with self._hidden():
                return original_load(store)

        if self.tap is not None:
            self.tap.install()
        apply._gradwatch_probe = self  # type: ignore[attr-defined]
        object.__setattr__(target, "apply", apply)
        object.__setattr__(outer, "save_own_variables", save_own_variables)
        object.__setattr__(outer, "load_own_variables", load_own_variables)
        self.installed = True
        if target.built:
            self._prepare()

    def _prepare(self) -> None:
        """Read the layout off the built optimizer; create and track our variables."""
        keras = self.keras
        self.variables = list(self.target._trainable_variables)
        self.layout = keras_layout(self.model, self.variables)
        self.n = len(self.variables)
        self.width = len(HEAD) + len(BLOCKS) * self.n
        self.ring_var = keras.Variable(
            np.full((self.ring, self.width), np.nan, dtype=np.float32), dtype="float32",
            trainable=False, name="gradwatch_stats",
        )
        self.count_var = keras.Variable(np.int32(self._count), dtype="int32", trainable=False, name="gradwatch_count")
        self.controls_var = keras.Variable(
            controls_vector(self._controls), dtype="float32", trainable=False, name="gradwatch_controls"
        )
        # Every unit's zero-gradient streak (a unit: one entry of a bias), followed one by one as the
        # PyTorch adapter does: StepStats.dead_fraction.
        self.unit_spans: dict[int, tuple[int, int]] = {}
        offset = 0
        for i, v in enumerate(self.variables):
            if self.layout.roles[i] == "bias":
                size = int(np.prod(v.shape))
                self.unit_spans[i] = (offset, size)
                offset += size
        # After the units, per followed tensor the longest streak one of its units came back from:
        # a unit counts as dead only past it (as in the PyTorch adapter).
        self.longest_at = {i: offset + k for k, i in enumerate(self.unit_spans)}
        self.streak_var = keras.Variable(np.zeros(max(offset + len(self.unit_spans), 1), dtype=np.float32),
                                         dtype="float32", trainable=False, name="gradwatch_unit_streaks")
        self.owned = (self.ring_var, self.count_var, self.controls_var, self.streak_var)
        for variable in self.owned:
            self.target._track_variable(variable)
        outer_vars = self.optimizer.variables
        self.positions = [next(i for i, v in enumerate(outer_vars) if v is mine) for mine in self.owned]
        self.ready = True

    def remove(self) -> None:
        """Undo :meth:`install`: restore the optimizer's methods and untrack the variables."""
        if not self.installed:
            return
        self.installed = False
        for owner, name in ((self.target, "apply"), (self.optimizer, "save_own_variables"),
                            (self.optimizer, "load_own_variables")):
            previous = self._previous.get(name)
            if previous is None:
                owner.__dict__.pop(name, None)
            else:
                object.__setattr__(owner, name, previous)
        for variable in self.owned:
            self.target._untrack_variable(variable)
        if self.tap is not None:
            self.tap.remove()

    def _hidden(self) -> Any:
        """A context in which the optimizer does not track our variables (for its checkpoints)."""
        probe = self

        class Hidden:
            def __enter__(self) -> None:
                for variable in probe.owned:
                    probe.target._untrack_variable(variable)

            def __exit__(self, *exc: object) -> None:
                for variable in probe.owned:
                    probe.target._track_variable(variable)

        return Hidden()

    # -- the compiled step ---------------------------------------------------------------------

    def _apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None) -> Any:
        original = self._original_apply
        if self.error is not None:
            return original(grads, trainable_variables)
        try:
            if not self.ready:
                target = self.target
                if not target.built:
                    with self.keras.name_scope(target.name, caller=target):
                        target.build(list(trainable_variables or target._trainable_variables))
                    target.built = True
                self._prepare()
            replicas = strategy.replicas_in_sync(self.backend)
            if replicas > 1:
                # MirroredStrategy: measure and steer the replicas' summed gradients, identically
                # on each replica; each hands Keras its share, which Keras sums back.
                plan = self._measure(strategy.sum_over_replicas(grads), trainable_variables)
                plan["grads"] = strategy.share(plan["grads"], replicas)
            else:
                plan = self._measure(list(grads), trainable_variables)
        except Exception as exc:  # gradwatch's own failure: train on, unmeasured
            if self.strict:
                raise
            self.error = exc
            return original(grads, trainable_variables)
        if not self.remedies:
            return original(self._handover(grads, replicas), trainable_variables)
        return self._steer(plan, trainable_variables)

    def _handover(self, grads: Sequence[Any], replicas: int = 1) -> list[Any]:
        """The gradients for the optimizer: on TensorFlow, copies that Grappler rewrites as it
        would unwatched (:mod:`~gradwatch.integrations.keras.neutral`)."""
        if self.backend != "tensorflow" or replicas > 1:
            return list(grads)
        return optimizer_copies(grads)

    def _norms(self, tensors: list[Any]) -> list[Any]:
        """L2 norm of each tensor, in float32, fused where the backend allows."""
        if not tensors:
            return []
        if self.backend == "torch":
            import torch

            return list(torch._foreach_norm([t if t.dtype == torch.float32 else t.float() for t in tensors]))
        ops = self.keras.ops
        if self.backend == "tensorflow":
            import tensorflow as tf

            # L2Loss is one fused pass (sum of squares / 2): ~25% faster than square + sum on CPU.
            return [tf.sqrt(2.0 * tf.raw_ops.L2Loss(t=tf.cast(self._densify(t), tf.float32))) for t in tensors]
        return [ops.sqrt(ops.sum(ops.square(ops.cast(self._densify(t), "float32")))) for t in tensors]

    def _densify(self, g: Any) -> Any:
        if self.backend == "tensorflow":
            import tensorflow as tf

            if isinstance(g, tf.IndexedSlices):
                # Repeated indices add up in the dense gradient: sum them before taking the norm.
                unique, position = tf.unique(g.indices)
                return tf.math.unsorted_segment_sum(g.values, position, tf.shape(unique)[0])
        return g

    def _scale(self, g: Any, factor: Any) -> Any:
        ops = self.keras.ops
        if self.backend == "tensorflow":
            import tensorflow as tf

            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(g.values * tf.cast(factor, g.values.dtype), g.indices, g.dense_shape)
        return ops.multiply(g, ops.cast(factor, g.dtype))

    def _present(self, grads: list[Any], trainable_variables: Sequence[Any] | None) -> dict[int, Any]:
        """The gradients that exist, by the index of their variable in the optimizer's list."""
        target = self.target
        tvars = list(trainable_variables) if trainable_variables is not None else list(target._trainable_variables)
        if len(tvars) != len(grads):
            raise ValueError(f"{len(grads)} gradients for {len(tvars)} variables.")
        return {target._get_variable_index(v): g for g, v in zip(grads, tvars) if g is not None}

    def _measure(self, grads: list[Any], trainable_variables: Sequence[Any] | None) -> dict[str, Any]:
        by_index = self._present(grads, trainable_variables)
        assert self.layout is not None  # set by _prepare, before any step is measured
        if self.backend == "torch":
            return self._measure_torch(grads, by_index)
        ops = self.keras.ops
        target = self.target
        present = sorted(by_index)
        grad_norms = dict(zip(present, self._norms([by_index[i] for i in present])))
        param_norms = self._norms([v.value for v in self.variables])
        zero = ops.zeros((), dtype="float32")
        nan = ops.cast(ops.convert_to_tensor(math.nan), "float32")
        grad_vec = ops.stack([grad_norms.get(i, zero) for i in range(self.n)])
        param_vec = ops.stack(param_norms)
        zero_fraction = []
        zeros: dict[int, Any] = {}
        for i in range(self.n):
            g = by_index.get(i)
            if g is not None and self.layout.roles[i] == "bias" and self._densify(g) is g:
                zeros[i] = ops.cast(ops.equal(ops.reshape(g, (-1,)), 0), "float32")
                zero_fraction.append(ops.mean(zeros[i]))
            else:
                zero_fraction.append(nan)
        has_grad = ops.convert_to_tensor(
            np.array([1.0 if i in by_index else 0.0 for i in range(self.n)], dtype=np.float32)
        )
        finite = ops.all(ops.isfinite(grad_vec))
        global_norm = ops.sqrt(ops.sum(ops.square(grad_vec)))
        streaks, dead_fraction = self._unit_streaks(zeros, global_norm, nan)
        controls = self.controls_var.value
        skip = ops.logical_and(controls[0] > 0.5, ops.logical_not(finite)) if self.remedies else ops.convert_to_tensor(False)
        clip = controls[1]
        do_clip = ops.logical_and(finite, global_norm > clip)
        scale = ops.where(do_clip, ops.divide(clip, ops.maximum(global_norm, 1e-30)), ops.ones((), "float32"))
        if not self.remedies:
            scale = ops.ones((), "float32")
        rate = ops.convert_to_tensor(target._get_current_learning_rate())
        factor = ops.ones((), "float32")
        if self.remedies:
            rate = ops.multiply(rate, ops.cast(controls[2], rate.dtype))
            factor = ops.cast(controls[2], "float32")
        lr = ops.cast(rate, "float32")
        count = self.count_var.value
        loss = self.tap.loss() if self.tap is not None else None
        has_loss = ops.ones((), "float32") if loss is not None else ops.zeros((), "float32")
        loss = ops.cast(loss, "float32") if loss is not None else nan
        target = self.tap.target() if self.tap is not None else None
        square, rows = (nan, ops.zeros((), "float32")) if target is None else target
        head = ops.stack([
            ops.cast(count, "float32"), global_norm, lr, ops.cast(skip, "float32"), scale, loss, has_loss, factor,
            square, rows,
        ])
        row = ops.concatenate([head, grad_vec, param_vec, ops.stack(zero_fraction), has_grad, dead_fraction])
        slot = ops.mod(count, self.ring)
        if strategy.first_replica():  # one row per step under MirroredStrategy
            with self.lock:
                updated = ops.slice_update(self.ring_var.value, [slot, 0], ops.expand_dims(row, 0))
                self.ring_var.assign(updated)
                self.count_var.assign(count + 1)
                if streaks is not None:
                    self.streak_var.assign(streaks)
        if self.remedies and self.tap is not None:
            self.tap.note_skip(skip)  # PyTorch notes the flag once it is on the host (_steer)
        return {"grads": grads, "skip": skip, "scale": scale, "rate": rate, "do_clip": do_clip}

    def _unit_streaks(self, zeros: dict[int, Any], global_norm: Any, nan: Any) -> tuple[Any, Any]:
        """Each unit's zero-gradient streak after this step (unchanged on a step whose whole
        gradient is zero or non-finite: converged or broken, not evidence about units), and per
        tensor the share of its dead units (NaN for tensors not followed): a streak of
        :data:`UNIT_STREAK` or more, and longer than any streak a unit of the same tensor came
        back from (with batches of a sample or two, a healthy unit is off ten steps in a row
        every so often)."""
        ops = self.keras.ops
        if not self.unit_spans:
            return None, ops.stack([nan] * self.n)
        old = self.streak_var.value
        counts = global_norm > 0
        parts, tails, dead = [], [], [nan] * self.n
        for i, (offset, size) in self.unit_spans.items():
            before = ops.slice(old, [offset], [size])
            longest = ops.slice(old, [self.longest_at[i]], [1])
            zero = zeros.get(i)
            if zero is None or zero.shape[0] != size:
                parts.append(before)
                tails.append(longest)
                continue
            after = ops.where(counts, (before + 1.0) * zero, before)
            back = ops.max(before * (1.0 - zero), keepdims=True)
            longest = ops.where(counts, ops.maximum(longest, back), longest)
            parts.append(after)
            tails.append(longest)
            dead[i] = ops.mean(ops.cast(after >= ops.maximum(longest + 1.0, float(UNIT_STREAK)), "float32"))
        streaks = ops.concatenate(parts + tails)
        return streaks, ops.stack(dead)

    def _write_loss_jax(self, before: Sequence[Any], after: Sequence[Any], loss: Any) -> list[Any]:
        """JAX: the loss tracker is updated after ``stateless_apply``: write the batch's loss into
        the row of the new optimizer state, when ``apply`` ran for this batch (a
        ``LossScaleOptimizer`` may have skipped it)."""
        ops = self.keras.ops
        out = list(after)
        if not self.ready:
            return out
        ring_at, count_at = self.positions[0], self.positions[1]
        count = after[count_at]
        ran = ops.greater(count, before[count_at])
        slot = ops.mod(count - 1, self.ring)
        ring = after[ring_at]
        old = ops.slice(ring, [slot, COL_LOSS], [1, 2])
        new = ops.reshape(ops.stack([ops.cast(loss, "float32"), ops.ones((), "float32")]), (1, 2))
        out[ring_at] = ops.slice_update(ring, [slot, COL_LOSS], ops.where(ran, new, old))
        return out

    def _measure_torch(self, grads: list[Any], by_index: dict[int, Any]) -> dict[str, Any]:
        from .torch_backend import measure_torch

        return measure_torch(self, grads, by_index)

    def _steer_tensorflow(self, plan: dict[str, Any], trainable_variables: Sequence[Any] | None) -> None:
        """TensorFlow on one device: ``skip`` and ``clip`` as graph-level conds (no pass over the
        gradients when they do not apply). The unclipped branch hands the optimizer copies of the
        gradients made inside it, so that on a step gradwatch leaves alone Grappler meets the
        same graph from the gradient to the update as unwatched (bit for bit the same step)."""
        ops = self.keras.ops
        target = self.target
        grads = plan["grads"]

        def run(scaled: list[Any]) -> None:
            # One replica: Keras's all-reduce is an identity (an IdentityN op). Grappler removes
            # it in the step's own graph, but not inside a cond branch, where it would keep the
            # gradient's last op from being rewritten with the update as it is unwatched.
            previous = target.__dict__.get("_all_reduce_sum_gradients")
            object.__setattr__(target, "_all_reduce_sum_gradients", list)
            try:
                with self._rate_in_force(plan["rate"]):
                    self._original_apply(scaled, trainable_variables)
            finally:
                if previous is None:
                    target.__dict__.pop("_all_reduce_sum_gradients", None)
                else:
                    object.__setattr__(target, "_all_reduce_sum_gradients", previous)

        def clipped() -> None:
            run([None if g is None else self._scale(g, plan["scale"]) for g in grads])

        def plain() -> None:
            run(optimizer_copies(grads))

        ops.cond(plan["skip"], lambda: None, lambda: ops.cond(plan["do_clip"], clipped, plain))

    def _xla(self, plan: dict[str, Any]) -> bool:
        """The step being traced is compiled by XLA (``jax.jit``, or TensorFlow's ``jit_compile``)."""
        if self.backend == "jax":
            return _is_traced(plan["skip"])
        if self.backend == "tensorflow":
            import tensorflow as tf

            return self.xla_program and not tf.executing_eagerly()
        return False

    def _steer_xla(self, plan: dict[str, Any], trainable_variables: Sequence[Any] | None) -> None:
        """XLA: the optimizer reads the gradients as they come unless a clip level is in force
        (the multiplication is compiled in only then: :meth:`select_program`), and a skipped step
        is undone by a cond that selects the state as it was. Anything more between the
        gradients and the update (a multiplication by 1, a select fused into it) changes how XLA
        fuses the step, and with it the order of some sums (BatchNormalization's ``gamma``
        gradient): one unit in the last place, that a diverging run grows."""
        ops = self.keras.ops
        target = self.target
        grads = list(plan["grads"])
        if self.clip_in_program:
            grads = [None if g is None else self._scale(g, plan["scale"]) for g in grads]
        state = list(target._trainable_variables) + [
            v for v in target.variables if not any(v is mine for mine in self.owned)
        ]
        # TensorFlow: an explicit read here (``convert_to_tensor`` of a variable is the variable
        # itself, read where it is used: after the update, which the skip would then keep).
        read = (lambda v: v.value.read_value()) if self.backend == "tensorflow" else ops.convert_to_tensor
        before = [read(v) for v in state]
        with self._rate_in_force(plan["rate"]):
            self._original_apply(grads, trainable_variables)
        after = [read(v) for v in state]
        kept = ops.cond(plan["skip"], lambda: before, lambda: after)
        for variable, value in zip(state, kept):
            variable.assign(value)

    @contextlib.contextmanager
    def _rate_in_force(self, rate: Any) -> Iterator[None]:
        """The learning rate the optimizer reads during one ``apply``: gradwatch's ``rate`` (the
        user's times the factor) while :attr:`lr_in_program`, else the user's own, untouched."""
        if not self.lr_in_program:
            yield
            return
        target = self.target
        user_rate = target._learning_rate
        object.__setattr__(target, "_learning_rate", _ScaledLearningRate(rate))
        try:
            yield
        finally:
            object.__setattr__(target, "_learning_rate", user_rate)

    def _program_key(self) -> tuple[bool, bool]:
        return (self.clip_in_program and self.xla_program, self.lr_in_program)

    def select_program(self, clip: bool, scale_lr: bool) -> bool:
        """Compile in only the remedies in force: under XLA the clipping while a clip level is in
        force, in any traced step the learning-rate factor while it is not 1
        (:attr:`lr_in_program`). A traced train function (``tf.function``, XLA, ``jax.jit``,
        ``torch.compile``) is swapped for the one compiled with them, traced on first use; an
        eager step reads the flags on its next call. Called between steps when the controls
        change.

        Args:
            clip: A clip level is in force.
            scale_lr: The learning-rate factor in force is not 1.

        Returns:
            True when the train function changed.
        """
        before = self._program_key()
        self.clip_in_program, self.lr_in_program = clip, scale_lr
        after = self._program_key()
        if not self.traced_program or after == before:
            return False
        model = self.model
        self._programs[before] = model.train_function
        cached = self._programs.get(after)
        if cached is not None:
            model.train_function = cached
        else:
            self.retrace()
        return True

    def retrace(self) -> None:
        """``model.make_train_function(force=True)``, traced anew on JAX too: ``jax.jit`` keeps
        one trace per function and argument shapes, and the model's ``train_step``, a bound
        method, compares equal to the one it traced before, so the new train function would run
        the old trace (without the probe, or with the remedies compiled in as they were then).
        A function of its own makes the new train function trace the step on its first call."""
        model = self.model
        if self.backend != "jax":
            model.make_train_function(force=True)
            return
        bound = model.train_step
        previous = model.__dict__.get("train_step")

        def train_step(state: Any, data: Any) -> Any:
            return bound(state, data)

        object.__setattr__(model, "train_step", train_step)
        try:
            model.make_train_function(force=True)
        finally:
            if previous is None:
                model.__dict__.pop("train_step", None)
            else:
                object.__setattr__(model, "train_step", previous)

    @property
    def traced_program(self) -> bool:
        """The train function is traced once and then runs as compiled (``tf.function``, XLA,
        ``jax.jit``, ``torch.compile``): Python attributes are read at trace time only."""
        if getattr(self.model, "run_eagerly", False):
            return False
        return self.backend == "tensorflow" or bool(getattr(self.model, "jit_compile", False))

    @property
    def xla_program(self) -> bool:
        """The train function is compiled by XLA (``jit_compile``, the default on JAX)."""
        if self.backend not in ("jax", "tensorflow"):
            return False
        return bool(getattr(self.model, "jit_compile", False)) and not getattr(self.model, "run_eagerly", False)

    def _steer(self, plan: dict[str, Any], trainable_variables: Sequence[Any] | None) -> Any:
        ops = self.keras.ops
        if self.backend == "torch":
            import torch

            # Eager: read the two flags in one transfer and do only the work they call for.
            skip, clip = torch.stack([plan["skip"], plan["do_clip"]]).tolist()
            if self.tap is not None:
                self.tap.note_skip(bool(skip))
            if skip:
                return None
            scaled = plan["grads"]
            if clip:
                scaled = list(scaled)
                present = [i for i, g in enumerate(scaled) if g is not None]
                for i, g in zip(present, torch._foreach_mul([scaled[i] for i in present], plan["scale"])):
                    scaled[i] = g
        elif self._xla(plan) and strategy.replicas_in_sync(self.backend) <= 1:
            return self._steer_xla(plan, trainable_variables)
        elif self.backend == "tensorflow":
            if strategy.replicas_in_sync(self.backend) <= 1:
                return self._steer_tensorflow(plan, trainable_variables)
            present = [i for i, g in enumerate(plan["grads"]) if g is not None]
            kept = [plan["grads"][i] for i in present]
            clipped = ops.cond(plan["do_clip"], lambda: [self._scale(g, plan["scale"]) for g in kept], lambda: kept)
            scaled = list(plan["grads"])
            for i, g in zip(present, clipped):
                scaled[i] = g
        else:  # JAX without jit: eager, op by op
            do_clip = bool(plan["do_clip"])
            scaled = [g if g is None or not do_clip else self._scale(g, plan["scale"]) for g in plan["grads"]]

        def run() -> None:
            with self._rate_in_force(plan["rate"]):
                self._original_apply(scaled, trainable_variables)

        if self.backend == "jax":
            # jit_compile=False: eager, op by op; a compiled cond would round differently.
            if not bool(plan["skip"]):
                run()
            return None
        if self.backend == "torch":
            run()
            return None

        # TensorFlow under MirroredStrategy: a cond around Keras's merge_call must be taken
        # across replicas.
        def run_replica(grads: Any, variables: Any, rate: Any) -> None:
            with self._rate_in_force(rate):
                self._original_apply(grads, variables)

        strategy.apply_unless(plan["skip"], run_replica, scaled, trainable_variables, plan["rate"])
        return None


def _is_traced(value: Any) -> bool:
    """True for a JAX tracer (inside ``jax.jit``), False for a concrete (eager) array."""
    import jax

    return isinstance(value, jax.core.Tracer)


def probe_of(optimizer: Any) -> StepProbe | None:
    """The probe installed on an optimizer (or its inner optimizer), if any."""
    apply: Callable | None = base_optimizer(optimizer).__dict__.get("apply")
    return getattr(apply, "_gradwatch_probe", None)
