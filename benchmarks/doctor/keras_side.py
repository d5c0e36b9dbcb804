"""Keras 3 runner of the doctor benchmark (the backend of this process): build a
:class:`~benchmarks.doctor.cases.Setup`, the factory the doctor gets, a full ``fit``, test accuracy."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from benchmarks.doctor.cases import Setup
from benchmarks.doctor.data import Dataset
from gradwatch import CheckSpec


def _kernel(setup: Setup, seed: int) -> Any:
    import keras

    if setup.init == "he":
        return keras.initializers.HeNormal(seed=seed)
    if setup.init.startswith("normal:"):
        return keras.initializers.RandomNormal(stddev=float(setup.init.split(":")[1]), seed=seed)
    return keras.initializers.GlorotUniform(seed=seed)


def build(setup: Setup, data: Dataset, seed: int = 0) -> Any:
    """The compiled model of a setup, seeded."""
    import keras

    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.Input(data.x_train.shape[1:])]
    if setup.kind == "rnn":
        recurrent = (keras.initializers.RandomNormal(stddev=setup.recurrent_gain / math.sqrt(setup.width), seed=seed)
                     if setup.recurrent_gain else keras.initializers.Orthogonal(seed=seed))
        layers.append(keras.layers.SimpleRNN(setup.width, activation=setup.activation, recurrent_initializer=recurrent,
                                             kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="rnn"))
    else:
        for i in range(setup.depth):
            layers.append(keras.layers.Dense(setup.width, activation=setup.activation, name=f"dense_{i}",
                                             kernel_initializer=_kernel(setup, seed + i),
                                             bias_initializer=keras.initializers.Constant(setup.bias)))
    layers.append(keras.layers.Dense(data.classes, name="head", kernel_initializer=_kernel(setup, seed + 99)))
    model = keras.Sequential(layers, name="model")
    kwargs: dict[str, Any] = {"learning_rate": setup.lr}
    if setup.clip:
        kwargs["global_clipnorm"] = setup.clip
    optimizer = keras.optimizers.Adam(**kwargs) if setup.optimizer == "adam" else keras.optimizers.SGD(**kwargs)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def factory(setup: Setup, data: Dataset, batch_size: int) -> Any:
    """What ``gradwatch doctor`` gets: the compiled model and the training arrays."""
    return CheckSpec(model=build(setup, data), x=data.x_train, y=data.y_train, batch_size=batch_size)


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    return math.ceil(len(data.x_train) / batch_size)


def train(model: Any, data: Dataset, *, epochs: int, batch_size: int, watch: bool = False) -> dict[str, Any]:
    """A full ``fit``; returns seconds, test accuracy, final loss and (watched) the report."""
    from gradwatch import GradWatch

    callback = GradWatch(policy="observe") if watch else None
    start = time.perf_counter()
    history = model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=batch_size, verbose=0,
                        callbacks=[callback] if callback is not None else [])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "accuracy": accuracy(model, data), "loss": float(history.history["loss"][-1]),
            "report": callback.report() if callback is not None else None}


def accuracy(model: Any, data: Dataset) -> float:
    logits = np.asarray(model.predict(data.x_test, verbose=0, batch_size=256))
    if not np.isfinite(logits).all():
        return 0.0
    return float((logits.argmax(1) == data.y_test).mean())


def setup_threads() -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        return
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
