"""Keras on 2 CPU devices, run in a subprocess (the devices must be set up before the framework
starts): ``python gw_keras_dist_script.py mirrored|jax_data_parallel``. Prints one JSON line:
per scenario, the single-device run and the distributed run on the same global batches.

* ``mirrored``: TensorFlow, ``tf.distribute.MirroredStrategy`` over 2 logical CPU devices.
* ``jax_data_parallel``: JAX, ``keras.distribution.DataParallel`` over 2 host devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=2``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MODE = sys.argv[1] if len(sys.argv) > 1 else "mirrored"
os.environ["KERAS_BACKEND"] = "tensorflow" if MODE == "mirrored" else "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["GRADWATCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
if MODE != "mirrored":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

if MODE == "mirrored":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from gradwatch import GradWatch  # noqa: E402

_STRATEGY: list[Any] = []


def mirrored_strategy() -> Any:
    """One MirroredStrategy for the whole process: TensorFlow's collective instance keys clash
    between strategies created one after another over the same devices."""
    if not _STRATEGY:
        import tensorflow as tf

        _STRATEGY.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        assert _STRATEGY[0].num_replicas_in_sync == 2
    return _STRATEGY[0]


def build(*, act: str = "tanh", width: int = 8, depth: int = 1, lr: float = 0.05) -> Any:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,))] + [keras.layers.Dense(width, activation=act) for _ in range(depth)]
    model = keras.Sequential(layers + [keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def data(nan_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, :1] * 2 + x[:, 1:2] ** 2 - 1).astype("float32")
    if nan_row is not None:
        x[nan_row, 0] = np.nan
    return x, y


def run(distributed: bool, policy: str, model_kwargs: dict[str, Any], nan_row: int | None, epochs: int) -> dict[str, Any]:
    if distributed and MODE == "mirrored":
        strategy = mirrored_strategy()
        with strategy.scope():
            model = build(**model_kwargs)
    elif distributed:
        import jax

        assert len(jax.devices()) == 2, jax.devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        try:
            model = build(**model_kwargs)
        finally:
            keras.distribution.set_distribution(None)
    else:
        model = build(**model_kwargs)
    x, y = data(nan_row)
    callback = GradWatch(policy=policy)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback])
    report = callback.report()
    return {
        "global_norm": report.history["global_norm"],
        "layer_grad_norm": report.history["layer_grad_norm"],
        "measured": report.steps_measured,
        "actions": [[a.step, a.kind] for a in report.actions],
        "kinds": sorted(report.finding_counts),
        "weights": [np.asarray(keras.ops.convert_to_numpy(w)).reshape(-1).tolist() for w in model.weights],
    }


SCENARIOS: dict[str, tuple[str, dict[str, Any], int | None, int]] = {
    "norms": ("observe", {}, None, 2),
    # Row 28 falls in the second replica's half of the second global batch (rows 16-31).
    "nan_one_replica": ("auto", {}, 28, 2),
    "explode": ("auto", {"width": 32, "depth": 4, "lr": 0.5}, None, 8),
}

if __name__ == "__main__":
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SCENARIOS)
    out = {}
    for name in names:
        policy, kwargs, nan_row, epochs = SCENARIOS[name]
        out[name] = {
            "single": run(False, policy, kwargs, nan_row, epochs),
            "distributed": run(True, policy, kwargs, nan_row, epochs),
        }
    print("GRADWATCH_RESULT " + json.dumps(out))
