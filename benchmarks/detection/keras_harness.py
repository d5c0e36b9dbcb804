"""Running Keras 3 scenarios: ``model.fit`` unwatched with a plain-autodiff probe, and watched by
``gradwatch.GradWatch(policy="observe")``.

Every scenario trains for one epoch over data laid out step by step (``shuffle=False``), so the
batch of step ``t`` is rows ``t*B .. (t+1)*B`` and a corrupted batch happens exactly once. The probe
is a callback that, before each step, computes the loss and the gradient of that very batch with
the backend's own autodiff (``tf.GradientTape``, ``torch.autograd``, ``jax.grad``): nothing from
gradwatch. Dead units are read from the outputs of named layers on the batch.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from gradwatch import GradWatch

from .scoring import LabelCheck, Outcome, score
from .trace import GroupTrace, Trace

BACKEND = keras.backend.backend()


@dataclass
class KerasRun:
    """A compiled model and its data, one row block per step.

    Attributes:
        model: The compiled model.
        x: Inputs for every step, ``steps * batch_size`` rows.
        y: Targets, same layout.
        batch_size: Rows per step.
        eval_data: Clean ``(x, y)`` for the final loss.
    """

    model: Any
    x: np.ndarray
    y: np.ndarray
    batch_size: int
    eval_data: tuple[np.ndarray, np.ndarray]

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        lo = t * self.batch_size
        return self.x[lo:lo + self.batch_size], self.y[lo:lo + self.batch_size]

    def eval_loss(self) -> float:
        x, y = self.eval_data
        return float(self.model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)["loss"])


@dataclass(frozen=True)
class KerasScenario:
    """A labelled Keras scenario (see :class:`~benchmarks.detection.torch_harness.Scenario`)."""

    name: str
    label: str
    build: Callable[[], KerasRun]
    check: Callable[[Trace], LabelCheck]
    onset: int | None = None
    about: str = ""
    dead_layers: tuple[str, ...] = ()


def _loss_and_grads(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray | None]]:
    """The training loss of the batch and the gradient of every trainable variable, computed with
    the backend's autodiff on the model as it is (before the step)."""
    variables = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=pred, training=True)
        grads = tape.gradient(loss, [v.value for v in variables])
        # Embedding gradients come as IndexedSlices: densify (duplicate rows add up, as in the step).
        return float(loss), [None if g is None else np.asarray(tf.convert_to_tensor(g)) for g in grads]
    if BACKEND == "torch":
        import torch

        values = [v.value for v in variables]
        pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=y, y_pred=pred, training=True)
        grads = torch.autograd.grad(loss, values, allow_unused=True)
        return float(loss.detach()), [None if g is None else g.detach().cpu().numpy() for g in grads]
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_fn(tv: list[Any]) -> Any:
            pred, _ = model.stateless_call(tv, non_trainable, x, training=True)
            return model.compute_loss(x=x, y=y, y_pred=pred, training=True)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        return float(loss), [np.asarray(g) for g in grads]
    raise RuntimeError(f"No probe for KERAS_BACKEND={BACKEND!r}; use tensorflow, torch or jax.")


class KerasProbe(keras.callbacks.Callback):
    """Before each step: loss, gradient and parameter norms of that step's batch, and the share of
    units of ``dead_layers`` whose output is exactly zero on the whole batch."""

    def __init__(self, run: KerasRun, dead_layers: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.run = run
        self.step = 0
        self.trace = Trace([GroupTrace([v.path for v in run.model.trainable_variables])])
        self.dead_layers = dead_layers
        self.trace.dead = {name: [] for name in dead_layers}
        self._outputs = None
        if dead_layers:
            model = run.model
            self._outputs = keras.Model(model.inputs, [model.get_layer(n).output for n in dead_layers])

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        x, y = self.run.batch(self.step)
        self.step += 1
        loss, grads = _loss_and_grads(self.model, x, y)
        gt = self.trace.main
        gt.loss.append(loss)
        gt.grad_norm.append([math.nan if g is None else float(np.linalg.norm(g.astype(np.float64))) for g in grads])
        gt.has_grad.append([g is not None for g in grads])
        gt.param_norm.append([float(np.linalg.norm(np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64)))
                              for v in self.model.trainable_variables])
        gt.lr.append(math.nan)
        if self._outputs is not None:
            outs = self._outputs(x, training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for name, out in zip(self.dead_layers, outs):
                a = np.asarray(keras.ops.convert_to_numpy(out))
                units = a.reshape(-1, a.shape[-1])
                self.trace.dead[name].append(float(np.mean(np.all(units == 0, axis=0))))


def _weights(model: Any) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]


def run_reference(scenario: KerasScenario) -> tuple[Trace, list[np.ndarray]]:
    run = scenario.build()
    probe = KerasProbe(run, scenario.dead_layers)
    probe.trace.eval_before = run.eval_loss()
    run.model.fit(run.x, run.y, batch_size=run.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[probe])
    probe.trace.eval_after = run.eval_loss()
    return probe.trace, _weights(run.model)


def run_watched(scenario: KerasScenario, *, policy: str = "observe") -> tuple[Any, KerasRun]:
    run = scenario.build()
    cb = GradWatch(policy=policy, strict=True)
    run.model.fit(run.x, run.y, batch_size=run.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    return cb.report(), run


def detect(scenario: KerasScenario) -> Outcome:
    """Run a scenario unwatched with the probe (label check) and watched under ``observe``."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trace, reference = run_reference(scenario)
        try:
            check = scenario.check(trace)
        except Exception as exc:
            check = LabelCheck(False, f"label check raised {type(exc).__name__}: {exc}")
        report, run = run_watched(scenario)
    # The probe's own training-mode forward pass draws dropout masks and moves BatchNorm
    # statistics, so with those layers the probed run is not the unwatched run: not compared.
    stateful = any(isinstance(layer, (keras.layers.Dropout, keras.layers.BatchNormalization))
                   for layer in run.model._flatten_layers())
    identical = None if stateful else all(a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
                                          for a, b in zip(reference, _weights(run.model)))
    return score(
        framework=f"keras/{BACKEND}", name=scenario.name, label=scenario.label, about=scenario.about,
        onset=scenario.onset, check=check, findings=report.findings, identical=identical,
        seconds=time.perf_counter() - start,
    )


__all__ = ["BACKEND", "KerasProbe", "KerasRun", "KerasScenario", "detect", "run_reference", "run_watched"]
