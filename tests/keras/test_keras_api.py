"""The callback's API: import, config, state, checkpoints, steps_per_execution, every, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("keras")
import keras  # noqa: E402
from _keras_helpers import (  # noqa: E402
    BACKEND,
    classification_data,
    exploding_regression,
    mlp,
    numpy_of,
    record,
    same,
)

import gradwatch  # noqa: E402
from gradwatch import AutoPolicy, GradWatch, GradwatchWarning, Report  # noqa: E402
from gradwatch.integrations import keras as keras_adapter  # noqa: E402

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled_mlp(**compile_kwargs):
    model = mlp(8, (16, 16), 3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=CE, **compile_kwargs)
    return model


def test_import_is_lazy_and_the_callback_is_a_keras_callback():
    code = "import gradwatch, sys; print('keras' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert gradwatch.GradWatch is keras_adapter.GradWatch
    cb = GradWatch()
    assert isinstance(cb, keras.callbacks.Callback)
    assert isinstance(cb.monitor, gradwatch.Monitor) and cb.monitor.policy.name == "auto"
    assert isinstance(cb.report(), Report)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_every_must_be_a_positive_integer(every):
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        GradWatch(every=every)


def test_get_config_round_trips():
    cb = GradWatch(policy=AutoPolicy(decay_factor=0.25, cooldown=3), every=4, strict=True, history=32)
    config = json.loads(json.dumps(cb.get_config()))
    again = GradWatch.from_config(config)
    assert again.get_config() == cb.get_config()
    assert again.monitor.policy.decay_factor == 0.25 and again.every == 4 and again.strict
    assert GradWatch.from_config(GradWatch(policy="observe").get_config()).monitor.policy.name == "observe"


def test_state_dict_resumes_exactly(tmp_path):
    """A run watched by one callback equals a run whose callback was saved and restored between
    two fits (with remedies in force: a clip level and a decayed learning rate)."""
    def run(resume):
        keras.backend.clear_session()  # the same layer names in both runs
        model, x, y, lr, _ = exploding_regression()
        model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
        cb = GradWatch(strict=True)
        model.fit(x[:1920], y[:1920], batch_size=64, shuffle=False, verbose=0, callbacks=[cb])
        if resume:
            path = tmp_path / "gradwatch.json"
            path.write_text(json.dumps(cb.state_dict()))
            cb = GradWatch(strict=True)
            cb.load_state_dict(json.loads(path.read_text()))
        model.fit(x[1920:], y[1920:], batch_size=64, shuffle=False, verbose=0, callbacks=[cb])
        return cb, numpy_of(model.weights)

    straight, weights = run(resume=False)
    resumed, resumed_weights = run(resume=True)
    assert straight.monitor.controls.lr_factor < 1.0
    a, b = json.loads(json.dumps(resumed.state_dict())), json.loads(json.dumps(straight.state_dict()))
    for key in a["monitor"]:
        assert a["monitor"][key] == b["monitor"][key], key
    assert a == b
    assert same(resumed_weights, weights)


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="GradWatch state"):
        GradWatch().load_state_dict({"version": 99})


def test_checkpoints_written_during_fit_load_without_gradwatch(tmp_path):
    x, y = classification_data(64, 8, 3)
    model = compiled_mlp()
    path = tmp_path / "model.keras"
    model.fit(x, y, batch_size=16, verbose=0,
              callbacks=[GradWatch(), keras.callbacks.ModelCheckpoint(str(path))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.models.load_model(str(path))
    assert not [w for w in caught if "variables" in str(w.message)]
    assert same(numpy_of(loaded.optimizer.variables), numpy_of(model.optimizer.variables))
    assert not any("gradwatch" in v.path for v in model.optimizer.variables)


def test_fit_twice_and_callback_created_after_compile_count_steps_on():
    x, y = classification_data(64, 8, 3)
    model = compiled_mlp()
    model.fit(x, y, batch_size=16, verbose=0)  # traced once without gradwatch
    cb = GradWatch(strict=True)
    steps = record(cb)
    model.fit(x, y, batch_size=16, verbose=0, callbacks=[cb])
    model.fit(x, y, batch_size=16, verbose=0, callbacks=[cb])
    model.fit(x, y, batch_size=16, verbose=0)  # and once more without: a clean trace
    assert [s.step for s in steps] == list(range(8))
    assert cb.report().steps_measured == 8 and cb.report().healthy


@pytest.mark.skipif(BACKEND == "torch", reason="Keras supports steps_per_execution=1 only on the torch backend")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_steps_per_execution_measures_every_step(jit_compile):
    x, y = classification_data(48, 8, 3)
    reference_cb = GradWatch(strict=True)
    reference = record(reference_cb)
    compiled_mlp(jit_compile=jit_compile).fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[reference_cb])
    cb = GradWatch(strict=True)
    steps = record(cb)
    compiled_mlp(jit_compile=jit_compile, steps_per_execution=3).fit(
        x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[cb])
    assert [s.step for s in steps] == list(range(6))
    np.testing.assert_allclose([s.grad_norm for s in steps], [s.grad_norm for s in reference], rtol=1e-5)


def test_every_measures_one_step_in_n_and_logs_grad_norm():
    x, y = classification_data(160, 8, 3)
    cb = GradWatch(every=3, strict=True)
    steps = record(cb)
    history = compiled_mlp().fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    assert [s.step for s in steps] == [0, 3, 6, 9, 12, 15, 18]
    assert len(history.history["grad_norm"]) == 2
    assert history.history["grad_norm"][0] > 0


def test_functional_and_subclassed_models_name_their_layers():
    x, y = classification_data(32, 8, 3)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, activation="relu", name="encoder")(inputs)
    functional = keras.Model(inputs, keras.layers.Dense(3, name="classifier")(hidden))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.encoder = keras.layers.Dense(8, activation="relu", name="sub_encoder")
            self.classifier = keras.layers.Dense(3, name="sub_classifier")

        def call(self, inputs):
            return self.classifier(self.encoder(inputs))

    for model, names in ((functional, ("encoder", "classifier")), (Subclassed(), ("sub_encoder", "sub_classifier"))):
        model.compile(optimizer="adam", loss=CE)
        cb = GradWatch(strict=True)
        steps = record(cb)
        model.fit(x, y, batch_size=16, verbose=0, callbacks=[cb])
        assert steps[0].layout.layer_names() == names


def test_an_internal_error_warns_once_and_training_goes_on():
    x, y = classification_data(64, 8, 3)
    cb = GradWatch()

    def broken(stats, **kwargs):
        raise RuntimeError("boom")

    cb.monitor.observe = broken
    model = compiled_mlp()
    with pytest.warns(GradwatchWarning, match="boom") as caught:
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    assert len([w for w in caught if issubclass(w.category, GradwatchWarning)]) == 1
    assert all(np.isfinite(w).all() for w in numpy_of(model.weights))

    strict = GradWatch(strict=True)
    strict.monitor.observe = broken
    with pytest.raises(RuntimeError, match="boom"):
        compiled_mlp().fit(x, y, batch_size=16, verbose=0, callbacks=[strict])


def test_origin_example_mnist_shaped_with_batchnorm_is_healthy():
    """The Keras example gradwatch grew out of, with the callback added."""
    rng = np.random.default_rng(0)
    x_train = rng.random((512, 784), dtype=np.float32)
    y_train = keras.utils.to_categorical(rng.integers(0, 10, 512), 10)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(128),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Dense(128),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="categorical_crossentropy", metrics=["accuracy"])
    cb = GradWatch()
    history = model.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    report = cb.report()
    assert report.healthy and not report.findings, report.summary()
    assert report.steps_measured == 32
    assert set(history.history) == {"loss", "accuracy", "grad_norm"}
    assert [layer["layer"] for layer in report.layers][:2] == [model.layers[0].name, model.layers[1].name]
