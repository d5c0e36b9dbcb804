"""Small models, data and probes shared by the Keras tests (imported after importorskip)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gradwatch import Policy
from gradwatch.policy import Decision, PolicyState

BACKEND = keras.backend.backend()


def numpy_of(variables: Any) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Bit-for-bit equality of two lists of arrays (NaN == NaN)."""
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


def record(cb: Any) -> list:
    """Keep every StepStats the callback hands to its monitor (the monitor still judges them)."""
    seen: list = []
    observe = cb.monitor.observe

    def recording(stats: Any, **kwargs: Any) -> Any:
        seen.append(stats)
        return observe(stats, **kwargs)

    cb.monitor.observe = recording
    return seen


def regression_data(n: int = 128, features: int = 8, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, features)) * scale).astype("float32")
    y = (x @ rng.normal(size=(features, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def classification_data(n: int = 128, features: int = 8, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(features, classes)), axis=1).astype("int32")
    return x, y


def mlp(features: int = 8, widths: tuple = (16, 16), out: int = 1, activation: str = "relu", seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((features,))]
    layers += [keras.layers.Dense(w, activation=activation) for w in widths]
    layers += [keras.layers.Dense(out)]
    return keras.Sequential(layers)


class JumpAt(keras.optimizers.schedules.LearningRateSchedule):
    """``base`` until optimizer step ``at``, ``base * factor`` from there on (a mistyped LR)."""

    def __init__(self, base: float, at: int | None, factor: float) -> None:
        self.base, self.at, self.factor = base, at, factor

    def __call__(self, step):
        if self.at is None:
            return keras.ops.cast(self.base, "float32")
        jumped = keras.ops.greater_equal(keras.ops.cast(step, "int32"), self.at)
        return keras.ops.where(jumped, self.base * self.factor, self.base)

    def get_config(self):
        return {"base": self.base, "at": self.at, "factor": self.factor}


class FixedControls(Policy):
    """A policy whose standing orders never change: to test how the step carries them out."""

    name = "fixed"

    def __init__(self, *, skip: bool = False, clip_norm: float = float("inf"), lr_factor: float = 1.0) -> None:
        self.skip, self.clip_norm, self.lr_factor = skip, clip_norm, lr_factor

    def init(self) -> PolicyState:
        return PolicyState(skip_nonfinite=self.skip, clip_norm=self.clip_norm, lr_factor=self.lr_factor)

    def decide(self, findings, stats, state, *, can_rollback=False, immediate=True):
        return Decision(step=stats.step, controls=state.controls), state


def exploding_regression() -> tuple[keras.Model, np.ndarray, np.ndarray, float, tuple[np.ndarray, np.ndarray]]:
    """Full-batch gradient descent on a linear regression with a learning rate 1.5x the stability
    limit: the gradient norm doubles every step. Returns the model, 60 copies of the batch, the
    learning rate and the batch itself."""
    x, y = regression_data(64, 8, scale=3.0)
    with_bias = np.concatenate([x, np.ones((64, 1), "float32")], 1)
    curvature = 2 / 64 * np.linalg.eigvalsh(with_bias.T @ with_bias).max()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    return model, np.tile(x, (60, 1)), np.tile(y, (60, 1)), float(3.0 / curvature), (x, y)
