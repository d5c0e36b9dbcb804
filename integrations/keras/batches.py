"""Around each training batch: the batch's own loss for the step's row, and a skipped batch kept
out of the loss and metrics that ``fit`` displays.

Keras logs the running mean of the loss over the epoch, not the loss of a batch, so gradwatch
takes the batch's loss where Keras hands it to the loss tracker (``model._loss_tracker``, the
``Mean`` behind the ``loss`` log; the standard train steps of all three backends call its
``update_state`` with the unscaled batch loss). It stays on the device and goes into the step's
row of statistics, read with the rest (no host sync of its own):

* TensorFlow and PyTorch update the tracker before the optimizer's ``apply``: the probe writes
  the loss into the row inside ``apply``;
* JAX updates it after ``stateless_apply``: the wrapped ``train_step`` writes the loss into the
  row of the new optimizer state it returns (only when ``apply`` ran for this batch).

When gradwatch skips a batch (non-finite gradients under ``policy="auto"``), the weights and the
optimizer state are left as if the batch had not been there; so are the metrics: every metric
variable (the loss tracker included) is put back to its value before the batch, so that the
progress bar and ``History`` do not read ``nan`` for the rest of the epoch because of a batch that
did not train; and so are the model's floating-point non-trainable variables (BatchNormalization's
moving statistics, which a NaN in the batch's input would otherwise poison for good). In a healthy step nothing changes: the values are selected back unchanged (bit for
bit the metrics of an unwatched run).

A train step that does not use the loss tracker (a custom ``train_step``) leaves the loss unknown
(``StepStats.loss=None``): ``loss_spike`` then does not run.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["BatchTap"]


class BatchTap:
    """Patch one model's ``train_step``, loss tracker and ``compute_metrics`` for one ``fit``.

    Args:
        model: The Keras model.
        backend: ``keras.backend.backend()``.
        exclude_skipped: Put the metrics back on a batch gradwatch skips (``policy="auto"``).
            Defaults to True.
    """

    def __init__(self, model: Any, backend: str, *, exclude_skipped: bool = True) -> None:
        self.model = model
        self.backend = backend
        self.exclude_skipped = exclude_skipped
        self.local = threading.local()
        self.targets = False
        """Measure each batch's mean squared target (:meth:`target`): set for a mean squared error
        (``StepStats.null_loss``)."""
        self.write_loss: Any = None
        """JAX: ``(optimizer_variables_before, optimizer_variables_after, loss) -> variables``,
        set by the probe; writes the loss into the new state's row."""
        self._patched: list[tuple[Any, str, Any]] = []

    # -- install / remove ----------------------------------------------------------------------

    def install(self) -> None:
        """Wrap ``train_step``, the loss tracker's ``update_state`` and ``compute_metrics``."""
        model = self.model
        tap = self
        original_step = model.train_step

        def train_step(*args: Any, **kwargs: Any) -> Any:
            return tap._train_step(original_step, args, kwargs)

        self._set(model, "train_step", train_step)
        tracker = getattr(model, "_loss_tracker", None)
        if tracker is not None:
            original_update = tracker.update_state

            def update_state(values: Any, sample_weight: Any = None, **kwargs: Any) -> Any:
                tap._note_loss(values)
                return original_update(values, sample_weight=sample_weight, **kwargs)

            self._set(tracker, "update_state", update_state)
        if self.exclude_skipped:
            original_metrics = model.compute_metrics

            def compute_metrics(*args: Any, **kwargs: Any) -> Any:
                return tap._compute_metrics(original_metrics, args, kwargs)

            self._set(model, "compute_metrics", compute_metrics)

    def remove(self) -> None:
        """Undo :meth:`install` (safe to call twice)."""
        for owner, name, previous in reversed(self._patched):
            if previous is None:
                owner.__dict__.pop(name, None)
            else:
                object.__setattr__(owner, name, previous)
        self._patched = []

    def _set(self, owner: Any, name: str, function: Any) -> None:
        self._patched.append((owner, name, owner.__dict__.get(name)))
        object.__setattr__(owner, name, function)

    # -- what the step reads -------------------------------------------------------------------

    @property
    def _state(self) -> Any:
        return getattr(self.local, "state", None)

    def loss(self) -> Any:
        """The loss noted for the batch being traced on this thread, or None."""
        state = self._state
        if state is None or not self._same_graph(state):
            return None
        return state.get("loss")

    def target(self) -> tuple[Any, Any] | None:
        """The batch's mean squared target and its rows (float32 scalars), while :attr:`targets`
        and the batch has one target tensor; else None."""
        state = self._state
        if state is None or not self._same_graph(state):
            return None
        return state.get("target")

    def note_skip(self, skip: Any) -> None:
        """The step's skip flag (a boolean tensor, or a Python bool on PyTorch), for the metrics."""
        state = self._state
        if state is not None and self._same_graph(state):
            state["skip"] = skip

    # -- the wrappers ----------------------------------------------------------------------------

    def _train_step(self, original: Any, args: tuple, kwargs: dict) -> Any:
        state: dict[str, Any] = {"graph": self._graph()}
        if self.exclude_skipped:
            state["before"] = self._metric_values(args)
            state["kept"] = self._kept_values(args)
        if self.targets:
            state["target"] = self._target_of(args)
        previous, self.local.state = self._state, state
        try:
            out = original(*args, **kwargs)
            if self.backend == "jax" and self.write_loss is not None and state.get("loss") is not None:
                logs, new_state = out
                optimizer_variables = self.write_loss(args[0][2], new_state[2], state["loss"])
                out = (logs, (new_state[0], new_state[1], optimizer_variables, new_state[3]))
            if state.get("kept") and state.get("skip") is not None and self._same_graph(state):
                out = self._put_back(state, args, out)
            return out
        finally:
            self.local.state = previous

    def _note_loss(self, values: Any) -> None:
        state = self._state
        if state is None or "loss" in state:  # not training, or a second update in one step
            return
        import keras

        if self.backend == "torch":
            import torch

            if isinstance(values, torch.Tensor):
                values = values.detach()
        elif self.backend == "tensorflow":
            from .neutral import tail_copy

            values = tail_copy(values)  # read a copy: the tracker's own arithmetic is left alone
        state["loss"] = keras.ops.cast(keras.ops.mean(values), "float32")

    def _compute_metrics(self, original: Any, args: tuple, kwargs: dict) -> Any:
        state = self._state
        skip = None if state is None else state.get("skip")
        before = None if state is None else state.get("before")
        if skip is None or before is None or not self._same_graph(state):
            return original(*args, **kwargs)
        model = self.model
        if self.backend == "torch":
            if not skip:
                return original(*args, **kwargs)
            for variable, old in zip(model.metrics_variables, before):  # the batch never was
                variable.assign(old)
            return model.get_metrics_result()
        original(*args, **kwargs)
        import keras

        ops = keras.ops
        for variable, old in zip(model.metrics_variables, before):
            variable.assign(ops.where(skip, old, variable.value))
        return model.get_metrics_result()

    # -- inside --------------------------------------------------------------------------------

    def _metric_values(self, args: tuple) -> list[Any] | None:
        """Every metric variable's value at the start of the batch."""
        model = self.model
        if self.backend == "jax":
            return list(args[0][3]) if args and len(args[0]) == 4 else None
        if self.backend == "torch":
            return [v.value.clone() for v in model.metrics_variables]
        # An explicit read, here: on TensorFlow ``v.value`` is the variable itself (and so is
        # ``keras.ops.convert_to_tensor(v)``), read only where it is used, after the update.
        return [v.value.read_value() for v in model.metrics_variables]

    def _target_of(self, args: tuple) -> tuple[Any, Any] | None:
        import keras

        data = args[1] if self.backend == "jax" else (args[0] if args else None)
        if data is None:
            return None
        try:
            _, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        except Exception:  # not the (x, y, sample_weight) of a standard train step
            return None
        if y is None or isinstance(y, (list, tuple, dict)) or not hasattr(y, "shape") or len(y.shape) == 0:
            return None
        ops = keras.ops
        if self.backend == "torch":
            import torch

            if isinstance(y, torch.Tensor):
                y = y.detach()
        y = ops.cast(y, "float32")
        return ops.mean(ops.square(y)), ops.cast(ops.shape(y)[0], "float32")

    def _kept(self) -> list[int]:
        """Indices, in ``model.non_trainable_variables``, of the floating-point ones: the state the
        forward pass moves (BatchNormalization's moving mean and variance). A skipped batch's NaN
        would stay in them and make every later prediction NaN. (A dropout seed is an integer
        state and moves on as in an unwatched run.)"""
        return [i for i, v in enumerate(self.model.non_trainable_variables)
                if "float" in str(getattr(v, "dtype", ""))]

    def _kept_values(self, args: tuple) -> list[Any] | None:
        """The kept non-trainable variables' values at the start of the batch."""
        kept = self._kept()
        if not kept:
            return None
        if self.backend == "jax":
            if not (args and len(args[0]) == 4):
                return None
            values = list(args[0][1])
            return [values[i] for i in kept]
        variables = self.model.non_trainable_variables
        if self.backend == "torch":
            return [variables[i].value.clone() for i in kept]
        return [variables[i].value.read_value() for i in kept]

    def _put_back(self, state: dict[str, Any], args: tuple, out: Any) -> Any:
        """A batch gradwatch skipped never was: its moving statistics are put back too (as the
        PyTorch adapter puts BatchNorm's buffers back). A healthy batch's are selected unchanged."""
        import keras

        ops = keras.ops
        skip, kept, before = state["skip"], self._kept(), state["kept"]
        variables = self.model.non_trainable_variables
        if self.backend == "torch":
            if skip:
                for i, old in zip(kept, before):
                    variables[i].assign(old)
            return out
        # A cond, not a select: a select fused into the moving-average update changes how XLA
        # fuses it (one unit in the last place of the variance on a healthy step).
        if self.backend == "jax":
            logs, new_state = out
            values = list(new_state[1])
            after = [values[i] for i in kept]
            chosen = ops.cond(skip, lambda: list(before), lambda: after)
            for i, value in zip(kept, chosen):
                values[i] = value
            return logs, (new_state[0], values, new_state[2], new_state[3])
        after = [variables[i].value.read_value() for i in kept]
        chosen = ops.cond(skip, lambda: list(before), lambda: after)
        for i, value in zip(kept, chosen):
            variables[i].assign(value)
        return out

    def _graph(self) -> Any:
        if self.backend != "tensorflow":
            return None
        import tensorflow as tf

        return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()

    def _same_graph(self, state: dict[str, Any]) -> bool:
        """TensorFlow: the tensor belongs to the graph being built (not an inner ``cond``'s)."""
        return self.backend != "tensorflow" or state.get("graph") is self._graph()
