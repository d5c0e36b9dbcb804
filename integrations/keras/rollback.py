"""Rollback snapshots for Keras: host-side copies of the weights, the optimizer's slots and
BatchNormalization's moving statistics, taken and restored between two steps.

The rule is PyTorch's (``integrations/torch/remedies.py``, ``Rollbacks``): one snapshot, taken on
the first healthy measured step (in Keras: before the fit's first step, see below) and again after
``rollback_every`` healthy measured steps in a row (finite gradients and parameters, no finding of
severity warning or error, no action), restored
when the monitor's decision says ``rollback``. ``rollback_every="auto"`` keeps snapshots every
:data:`ROLLBACK_EVERY` steps under a policy that rolls back, while one copy of the weights and of
an Adam-like optimizer state (counted as three times the weights) fits in
:data:`ROLLBACK_BUDGET_BYTES`; beyond that it keeps none, and says so once (INFO).

What is different in Keras is *when*. The compiled step runs ahead of the host: the row of step
``k`` is read while step ``k + 1`` runs, and the decision on ``k`` takes effect at the start of
step ``k + 2`` (with ``steps_per_execution=n``: of the second execution after the one holding
``k``). Snapshots and restores happen there too, on the thread that runs ``fit``, between two
executions, at a step fixed by the step numbers alone, whatever the timing of Keras's asynchronous
callbacks, so a run with rollbacks is reproducible:

* the first snapshot of a fit is taken before its first step, of the state the fit starts
  from (the weights that step's gradient is computed on, as PyTorch's first snapshot is): a run
  whose step size wrecks it within its first steps, before any measured step could be judged
  healthy, goes back to where it started. It is dropped when it holds a NaN or an Inf, or when
  the first measured step's gradients or weights are non-finite (then the first copy is taken as
  below, once steps read healthy);
* a snapshot that falls due on step ``s`` is taken at the start of the first execution that the
  decision on ``s`` reaches, once every measured step up to it has been read and found healthy
  too (the copy holds the weights after them); a step that is not healthy drops it;
* that copy holds the update of the last step run, which no gradient has judged yet (in PyTorch
  the copy is of the weights the healthy gradient was measured on). So, but for the first one,
  a copy is *pending* until the next measured step, whose gradient is computed on the copied
  weights, is read: healthy, it becomes the snapshot a rollback restores; not, it is dropped and
  the previous snapshot stays (an LR jump one step before a copy falls due does not get into it);
* a rollback decided on step ``k`` restores the copy at the start of the execution the decision
  reaches (steps ``k`` and ``k + 1`` are undone: the copy was taken before either).

The snapshot is of the weights the optimizer updates, every optimizer variable but the iteration
counter (momentum, Adam's moments...; the counter keeps going, as a PyTorch scheduler does, so a
learning-rate schedule is not rewound and an LR jump it makes stays held) and the moving mean and
variance of every trainable ``BatchNormalization`` layer. Memory: one host copy of each, two
while a new copy is pending.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from gradwatch.options import ROLLBACK_BUDGET_BYTES, ROLLBACK_EVERY
from gradwatch.options import resolve_rollback_every as resolve_options_rollback

_LOG = logging.getLogger("gradwatch")

__all__ = ["ROLLBACK_BUDGET_BYTES", "ROLLBACK_EVERY", "KerasRollbacks", "KerasSnapshot", "resolve_rollback_every"]


def resolve_rollback_every(rollback_every: int | str | None, policy: Any, weights: list[Any]) -> int | None:
    """:func:`gradwatch.options.resolve_rollback_every` for a Keras model's trainable variables."""
    size = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in weights)
    return resolve_options_rollback(rollback_every, policy, size)


class KerasSnapshot:
    """One host copy of a model's training state; call :meth:`take` and :meth:`restore` between
    two steps, on the thread that runs ``fit``.

    Args:
        model: The Keras model.
        optimizer: The optimizer whose slots are saved (the inner one of a ``LossScaleOptimizer``).
        exclude: Optimizer variables to leave out (gradwatch's own).
    """

    def __init__(self, model: Any, optimizer: Any, exclude: tuple = ()) -> None:
        import keras

        self.model = model
        self.optimizer = optimizer
        self.exclude = exclude
        self.variables: list[Any] = []
        moving = [
            v for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for v in (layer.moving_mean, layer.moving_variance)
        ]
        counter = optimizer.iterations
        slots = [v for v in optimizer.variables if v is not counter and not any(v is e for e in exclude)]
        self.variables = list(optimizer._trainable_variables) + slots + moving
        self.values: list[np.ndarray] = []
        self.boundary = -1
        """The batch count before which the copy was taken (-1: none)."""

    @property
    def taken(self) -> bool:
        return self.boundary >= 0

    def take(self, boundary: int) -> None:
        """Copy the state as it is now (between two steps).

        Args:
            boundary: Training batches run so far (the copy is of the state before the next).
        """
        current = self._current()
        if len(self.values) == len(current):
            for saved, value in zip(self.values, current):
                np.copyto(saved, value)
        else:
            self.values = [np.array(v, copy=True) for v in current]
        self.boundary = int(boundary)

    def restore(self) -> None:
        """Write the copy back into the variables (the next step starts from it).

        Raises:
            RuntimeError: if no copy was taken.
        """
        if not self.taken:
            raise RuntimeError("KerasSnapshot.restore() called before take(): nothing to restore.")
        model = self.model
        if getattr(model, "_jax_state", None):
            model.jax_state_sync()  # the variables are detached during fit: bring them back first
        for variable, value in zip(self.variables, self.values):
            variable.assign(value)

    def clear(self) -> None:
        """Free the copy."""
        self.values = []
        self.boundary = -1

    def _current(self) -> list[Any]:
        """The variables' values as numpy (JAX during fit: from the newest state)."""
        import keras

        model = self.model
        state = getattr(model, "_jax_state", None)
        if state and not getattr(model, "_jax_state_synced", True):
            by_id = {}
            for name, refs in (("trainable_variables", model.trainable_variables),
                               ("non_trainable_variables", model.non_trainable_variables),
                               ("optimizer_variables", model.optimizer.variables)):
                for ref, value in zip(refs, state.get(name) or ()):
                    by_id[id(ref)] = value
            return [np.asarray(by_id[id(v)]) if id(v) in by_id else np.asarray(keras.ops.convert_to_numpy(v.value))
                    for v in self.variables]
        return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in self.variables]


class KerasRollbacks:
    """When to take and restore the :class:`KerasSnapshot` (see the module docstring).

    The reader (the thread that hands steps to the monitor, possibly Keras's callback worker)
    records each measured step's health and each rollback, keyed by the number of training
    batches run through that step; the thread that runs ``fit`` acts on them at the start of
    each execution (:meth:`at_boundary`), on the records up to a batch count that depends on the
    step numbers alone.

    Args:
        every: Healthy measured steps in a row between snapshots (None: never).
        snapshot: Builds the :class:`KerasSnapshot` on first use.
    """

    def __init__(self, every: int | None, snapshot: Any) -> None:
        from collections import deque

        self.every = every
        self._make_snapshot = snapshot
        self.snapshot: KerasSnapshot | None = None
        """The copy a rollback restores (its weights were judged healthy)."""
        self.pending: KerasSnapshot | None = None
        """A newer copy, waiting for the gradient of the step after it (see the module docstring)."""
        self._spare: KerasSnapshot | None = None
        self.healthy_run = 0
        self.first_boundary: int | None = None
        """The batch count before which the first snapshot of this fit was taken."""
        self.restored = 0
        self.unjudged = False
        """The copy taken by :meth:`begin` waits for :meth:`judge_first`."""
        self._health: deque[tuple[int, bool]] = deque()
        self._restores: deque[int] = deque()
        self._wanted = False
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.every is not None

    # -- the reader ----------------------------------------------------------------------------

    def can_rollback(self, batch: int) -> bool:
        """A snapshot taken before training batch ``batch`` (0-based, counted over fits) exists."""
        return self.first_boundary is not None and self.first_boundary <= batch

    def record(self, key: int, healthy: bool, rollback: bool) -> None:
        """One measured step: ``key`` is the number of batches run through it."""
        if not self.active:
            return
        with self._lock:
            self._health.append((key, healthy))
            if rollback:
                self._restores.append(key)

    # -- the thread that runs fit --------------------------------------------------------------

    def begin(self, started: int) -> bool:
        """Copy the training state as the fit starts, before its first step: the first snapshot
        of the fit (see the module docstring), until :meth:`judge_first` drops it. Kept only when
        every value in it is finite.

        Args:
            started: Training batches run so far (the fit's first batch is the next one).

        Returns:
            True when the copy was kept.
        """
        if not self.active or self.snapshot is not None:
            return False
        copy = self._make_snapshot()
        copy.take(started)
        if not all(np.isfinite(v).all() for v in copy.values if v.dtype.kind in "fc"):
            copy.clear()
            return False
        with self._lock:
            self.snapshot, self.first_boundary, self.unjudged = copy, int(started), True
        return True

    def judge_first(self, weights_ok: bool) -> None:
        """The first measured step of the fit was read (call before the monitor decides on it):
        the copy taken by :meth:`begin` holds the weights its gradient was computed on. Judged
        by the gradient alone (finite gradients and weights), not by its findings: what a finding
        on that step says is wrong (an update too large, a loss far above chance) is not in the
        copy, which no update has touched. Not ok: the copy is dropped, and the first copy is
        taken as without it."""
        if not self.unjudged:
            return
        with self._lock:
            self.unjudged = False
            if not weights_ok and self.snapshot is not None:
                self.snapshot.clear()
                self.first_boundary = None

    def at_boundary(self, started: int, decided_by: int, wait_for: Any) -> str | None:
        """Carry out what the records up to ``decided_by`` call for, before batch ``started``.

        Args:
            started: Training batches run so far (the next execution starts with this one).
            decided_by: Records keyed up to this count are read (see the module docstring).
            wait_for: ``wait_for(n)`` returns once the records of the first ``n`` batches are read.

        Returns:
            ``"restored"``, ``"taken"`` or None.
        """
        if not self.active:
            return None
        restore = False
        with self._lock:
            while self._restores and self._restores[0] <= decided_by:
                self._restores.popleft()
                restore = True
            due = []
            while self._health and self._health[0][0] <= decided_by:
                due.append(self._health.popleft())
        for key, healthy in due:
            pending = self.pending
            if pending is not None and key > pending.boundary:
                # The first measured step run on the pending copy's weights judges them.
                if healthy:
                    self._spare, self.snapshot = self.snapshot, pending
                self.pending = None
            if not healthy:
                self.healthy_run, self._wanted = 0, False
                continue
            self.healthy_run += 1
            assert self.every is not None
            if self.snapshot is None or not self.snapshot.taken or self.healthy_run >= self.every:
                self._wanted = True
        if restore and self.snapshot is not None and self.snapshot.taken:
            self._drop_pending()
            self.snapshot.restore()
            self.restored += 1
            self._wanted = False
            return "restored"
        if not self._wanted:
            return None
        # The copy holds the weights after every step run so far: those not judged yet must be
        # healthy too. One wait, on the steps that fall due.
        wait_for(started)
        with self._lock:
            trailing = [healthy for key, healthy in self._health if key <= started]
        if not all(trailing):
            self._wanted = False
            return None
        if self.snapshot is None or not self.snapshot.taken:
            # The first copy of the fit is kept at once (as PyTorch keeps its first one whatever
            # was found): a run broken early has nothing better to go back to.
            if self.snapshot is None:
                self.snapshot = self._make_snapshot()
            self.snapshot.take(started)
        else:
            self._drop_pending()
            copy, self._spare = self._spare, None
            self.pending = copy if copy is not None else self._make_snapshot()
            self.pending.take(started)
        if self.first_boundary is None:
            self.first_boundary = started
        self.healthy_run, self._wanted = 0, False
        return "taken"

    def _drop_pending(self) -> None:
        if self.pending is not None:
            self._spare, self.pending = self.pending, None

    def forget(self) -> None:
        """Drop the snapshot and the pending records (the fit ended)."""
        for copy in (self.snapshot, self.pending, self._spare):
            if copy is not None:
                copy.clear()
        self.snapshot = self.pending = self._spare = None
        self.first_boundary, self.unjudged = None, False
        with self._lock:
            self._health.clear()
            self._restores.clear()
        self._wanted = False
