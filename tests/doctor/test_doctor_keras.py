"""The doctor on real Keras 3 models (the default backend of this process, CPU, small): describe,
causes, each repair rewritten from the layer configs (Sequential and functional), trials, the
subclassed model that cannot be rewritten."""

from __future__ import annotations

import math

import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("gradwatch.integrations.keras")

import gw_doctor_factories as f  # noqa: E402

from gradwatch.check import as_spec  # noqa: E402
from gradwatch.doctor import (  # noqa: E402
    Candidate,
    ClipNorm,
    InsertNorm,
    Reinit,
    ScaleLR,
    SwapActivation,
    SwitchOptimizer,
    run_doctor,
)
from gradwatch.integrations.keras.doctor import KerasDoctor  # noqa: E402

STEPS = 20
HIDDEN = tuple(f"dense_{i}" for i in range(7))


def adapter(setup, steps: int = STEPS) -> KerasDoctor:
    doctor = KerasDoctor(as_spec(setup), seed=0, steps=steps)
    doctor.describe()
    return doctor


def test_describe_sequential():
    d = adapter(f.keras_sigmoid()).description
    assert [layer.name for layer in d.weight_layers] == [*HIDDEN, "dense_7", "head"]
    first = d.layer("dense_0")
    assert (first.activation, first.activation_site, first.fan_in, first.fan_out) == ("sigmoid", "fused", 16, 32)
    assert 0 < first.slope <= 1 and math.isfinite(first.saturation)
    assert d.layer("head").output and (d.optimizer, d.adaptive, d.rewritable) == ("SGD", False, True)
    assert d.lr == pytest.approx(0.1)


def test_describe_functional_with_activation_layers():
    d = adapter(f.keras_functional_sigmoid()).description
    layer = d.layer("dense_3")
    assert (layer.activation, layer.activation_site) == ("sigmoid", "module:act_3")
    assert math.isfinite(layer.slope)


def test_rewrites_are_what_the_snippet_says():
    doctor = adapter(f.keras_sigmoid())
    swap = doctor.build(Candidate("c", (SwapActivation(HIDDEN, "relu", "he"),)))
    dense = swap.get_layer("dense_0")
    assert keras.activations.serialize(dense.activation) == "relu"
    assert type(dense.kernel_initializer).__name__ == "HeNormal"
    norm = doctor.build(Candidate("c", (InsertNorm(("dense_0", "dense_1")),)))
    names = [layer.name for layer in norm.layers]
    assert names[:6] == ["dense_0", "dense_0_bn", "dense_0_act", "dense_1", "dense_1_bn", "dense_1_act"]
    assert keras.activations.serialize(norm.get_layer("dense_0").activation) == "linear"
    assert type(norm.get_layer("dense_0_bn")).__name__ == "BatchNormalization"
    trial = doctor.trial(Candidate("c", (InsertNorm(("dense_0",)),)), steps=STEPS)
    assert "- keras.layers.Dense(32, activation='sigmoid', name='dense_0')" in trial.snippet
    assert "+ keras.layers.Dense(32, name='dense_0')" in trial.snippet
    assert "+ keras.layers.BatchNormalization(name='dense_0_bn')" in trial.snippet
    assert "+ keras.layers.Activation(activation='sigmoid', name='dense_0_act')" in trial.snippet
    assert len(trial.losses) == STEPS and all(math.isfinite(v) for v in trial.losses)
    assert "dense_0_bn" in {layer["layer"] for layer in trial.report.layers}


def test_unchanged_layers_keep_the_initial_weights():
    model, x, y = f.keras_sigmoid()
    initial = model.get_layer("dense_3").get_weights()[0]
    doctor = adapter((model, x, y))
    copy = doctor.build(Candidate("c", (Reinit(("dense_0",), "he"),)))
    assert (copy.get_layer("dense_3").get_weights()[0] == initial).all()
    assert not (copy.get_layer("dense_0").get_weights()[0] == model.get_layer("dense_0").get_weights()[0]).all()
    assert (model.get_layer("dense_3").get_weights()[0] == initial).all()  # the factory's model is untouched


def test_functional_rewrite_swaps_activation_layers_and_inserts_norms():
    doctor = adapter(f.keras_functional_sigmoid())
    model = doctor.build(Candidate("c", (SwapActivation(("dense_0",), "selu", "lecun"), InsertNorm(("dense_1",)))))
    assert type(model.get_layer("act_0")).__name__ == "Activation"
    assert keras.activations.serialize(model.get_layer("act_0").activation) == "selu"
    assert type(model.get_layer("dense_1_bn")).__name__ == "BatchNormalization"
    assert model(f._arrays(4)[0]).shape == (4, 4)


def test_optimizer_changes():
    doctor = adapter(f.keras_sigmoid())
    lr = doctor.build(Candidate("c", (ScaleLR(0.1),))).optimizer
    assert float(keras.ops.convert_to_numpy(lr.learning_rate)) == pytest.approx(0.01)
    clip = doctor.build(Candidate("c", (ClipNorm(2.0),))).optimizer
    assert clip.global_clipnorm == pytest.approx(2.0)
    adam = doctor.build(Candidate("c", (SwitchOptimizer("adam", 1e-3),))).optimizer
    assert type(adam).__name__ == "Adam"


def test_subclassed_models_cannot_be_rewritten():
    doctor = adapter(f.keras_subclassed())
    assert not doctor.description.rewritable
    reason, code = doctor.applicable(Candidate("c", (InsertNorm(("dense",)),)))
    assert "subclassed keras.Model" in reason and "BatchNorm after dense" in code
    assert doctor.applicable(Candidate("lr", (ScaleLR(0.1),))) == ("", "")


def test_doctor_repairs_the_deep_sigmoid_stack():
    result = run_doctor(f.keras_sigmoid, steps=30, max_trials=2, pairs=False)
    assert {"saturating_activation", "no_normalisation"} <= {c.kind for c in result.causes}
    best = result.best
    assert best is not None and best.healthy and best.final_loss < result.baseline.final_loss
    assert isinstance(best.model, keras.Model) and best.model is not result.baseline.model


def test_healthy_keras_model_has_nothing_to_repair():
    result = run_doctor(f.keras_healthy, steps=20)
    assert result.nothing_to_repair and len(result.trials) == 1
