"""gradwatch in Keras 3 ``model.fit``: one callback, any backend; a healthy run stays silent.

Run: KERAS_BACKEND=torch python examples/keras_fit.py   (or tensorflow / jax; CPU, seconds)
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradwatch  # noqa: E402


def main() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 10)).astype("float32")
    y = (x[:, :1] * 2 + x[:, 1:2] ** 2 - 1).astype("float32")
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(64, activation="tanh", name="dense_1"),
        keras.layers.Dense(64, activation="tanh", name="dense_2"),
        keras.layers.Dense(1, name="head"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.2), loss="mse")

    watch = gradwatch.GradWatch()  # policy="auto"
    history = model.fit(x, y, batch_size=256, epochs=60, callbacks=[watch], verbose=0)

    print(watch.monitor.report().summary())
    print(f"final loss {history.history['loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
