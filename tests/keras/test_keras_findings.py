"""Each finding kind on a real Keras model, on every backend, and healthy models that stay silent."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")
import keras  # noqa: E402
from _keras_helpers import (  # noqa: E402
    BACKEND,
    classification_data,
    exploding_regression,
    mlp,
    record,
    regression_data,
)

from gradwatch import GradWatch  # noqa: E402

SPARSE_CE = "sparse_categorical_crossentropy"


def watch_fit(model, x, y, *, optimizer, loss, policy="observe", epochs=1, batch_size=16, **fit_kwargs):
    model.compile(optimizer=optimizer, loss=loss, **fit_kwargs.pop("compile", {}))
    cb = GradWatch(policy=policy, strict=True)
    steps = record(cb)
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[cb], **fit_kwargs)
    return cb.report(), steps, history


def kinds(report, severities=("warning", "error")):
    return {f.kind for f in report.findings if f.severity in severities}


def test_deep_sigmoid_mlp_vanishes():
    x, y = classification_data(256, 16, 4)
    model = mlp(16, (32,) * 12, 4, activation="sigmoid")
    report, steps, _ = watch_fit(model, x, y, optimizer=keras.optimizers.SGD(0.01),
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert kinds(report) == {"vanishing"}
    finding = next(f for f in report.findings if f.kind == "vanishing")
    assert finding.layers[0] == model.layers[0].name  # the first Dense layer, by its Keras name
    assert set(finding.evidence["insert_after"]) <= {layer.name for layer in model.layers}


def test_a_deep_tanh_stack_at_a_tiny_init_vanishes_although_every_kernel_gradient_is_at_one_floor():
    """Keras's zero biases: at a tiny init the forward signal shrinks layer by layer as the backward
    one does, so the kernels' gradients (activation x error) sit at one floor over most of the
    depth, and only the last layers learn. Judged against the best-conditioned later layer, not
    their median (itself at the floor)."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    model = mlp(4, (64,) * 10, 3, activation="tanh")
    for variable in model.trainable_variables:
        if len(variable.shape) >= 2:
            variable.assign(variable * 0.078)
    report, _, _ = watch_fit(model, x, y, optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
                             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), epochs=2)
    assert kinds(report) == {"vanishing"}, report.summary()
    finding = next(f for f in report.findings if f.kind == "vanishing")
    assert finding.layers[0] == model.layers[0].name


@pytest.mark.parametrize(("scale", "batch_size", "loss", "found"), [
    (10.0, 32, "mse", True),
    (10.0, 4, "mean_squared_error", True),  # pooled over seven batches of four rows
    (1.0, 32, "mse", False),
    (10.0, 32, "mae", False),  # no null level for an absolute error: not judged
])
def test_a_regression_net_with_weights_x10_at_init_is_reported_from_its_first_losses(scale, batch_size, loss, found):
    """The mean squared target of the first batches, measured in the step, is what a model whose
    outputs are zero scores; weights x10 at init score thousands of times that."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = ((x - x.mean(0)) / x.std(0)).astype("float32"), ((y - y.mean()) / y.std()).astype("float32")
    model = mlp(10, (64,), 1)
    for variable in model.trainable_variables:
        if len(variable.shape) >= 2:
            variable.assign(variable * scale)
    report, _, _ = watch_fit(model, x, y, optimizer=keras.optimizers.Adam(1e-3), loss=loss, batch_size=batch_size)
    hits = [f for f in report.findings if f.evidence.get("rule") == "loss_over_chance"]
    assert bool(hits) == found, report.summary()
    if found:
        assert hits[0].step <= 6 and hits[0].severity == "error" and "outputs zeros" in hits[0].message
        assert 0.5 < hits[0].evidence["null_loss"] < 2.0  # standardised targets


def test_too_large_learning_rate_explodes():
    model, x, y, lr, _ = exploding_regression()
    report, steps, _ = watch_fit(model, x, y, optimizer=keras.optimizers.SGD(lr), loss="mse",
                                 batch_size=64, shuffle=False)
    exploding = [f for f in report.findings if f.kind == "exploding" and f.severity in ("warning", "error")]
    assert exploding and exploding[0].step < 20, report.summary()
    assert steps[-1].global_norm > 1e10 * steps[0].global_norm  # observe left it alone


class NormFeature(keras.layers.Layer):
    """Appends each row's L2 norm: finite forward, NaN gradient for an all-zero row (sqrt at 0)."""

    def call(self, h):
        return keras.ops.concatenate([h, keras.ops.sqrt(keras.ops.sum(keras.ops.square(h), -1, keepdims=True))], -1)


def test_norm_of_zero_row_gives_nonfinite_gradients_with_a_finite_loss():
    x, y = regression_data(64, 8)
    # One all-zero row per batch. No bias before the norm and no ReLU after it: a ReLU at 0 would
    # zero the upstream gradient, which TensorFlow then keeps finite and PyTorch/JAX turn into NaN.
    x[::16] = 0.0
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(8, use_bias=False, name="project"),
        NormFeature(name="norm_feature"),
        keras.layers.Dense(8, activation="tanh", name="hidden"),
        keras.layers.Dense(1, name="head"),
    ])
    report, steps, history = watch_fit(model, x, y, optimizer=keras.optimizers.Adam(1e-3), loss="mse",
                                       policy="auto", shuffle=False)
    assert np.isfinite(history.history["loss"][-1])
    finding = next(f for f in report.findings if f.kind == "nonfinite")
    assert finding.evidence["origin"] == "project"
    assert finding.evidence["finite_layers"] == ["hidden", "head"]
    # auto skipped every poisoned step: the weights never saw the NaN
    assert report.action_counts.get("skip_step") == len(steps) == 4
    assert all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in model.weights)


def test_negative_bias_relu_has_dead_units():
    x, y = regression_data(256, 8)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu", bias_initializer=keras.initializers.Constant(-10.0), name="dead"),
        keras.layers.Dense(32, activation="relu", bias_initializer=keras.initializers.Constant(0.1), name="alive"),
        keras.layers.Dense(1),
    ])
    report, _, _ = watch_fit(model, x, y, optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    assert kinds(report) == {"dead_units"}
    finding = next(f for f in report.findings if f.kind == "dead_units")
    assert finding.layers == ("dead",)
    assert finding.evidence["dead_fraction"]["dead"] == 1.0


def test_units_are_followed_one_by_one_so_batches_of_one_sample_do_not_make_idle_relus_dead():
    """With a batch of one sample, a different half of a healthy ReLU layer is off on each batch:
    the share of zero units is ~50 % on every step, but no unit stays at zero for ten steps in a
    row. Each unit's streak is kept in the step (``StepStats.dead_fraction``), as in PyTorch."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = ((x - x.mean(0)) / x.std(0)).astype("float32"), ((y - y.mean()) / y.std()).astype("float32")
    model = mlp(10, (64,), 1)
    report, steps, _ = watch_fit(model, x, y, optimizer=keras.optimizers.Adam(1e-3), loss="mse", batch_size=1)
    assert "dead_units" not in kinds(report), report.summary()
    biases = [i for i, role in enumerate(steps[0].layout.roles) if role == "bias"]
    late = steps[-1]
    assert np.isfinite(late.dead_fraction[biases]).all()
    assert late.dead_fraction[biases[0]] < 0.5 <= max(s.zero_fraction[biases[0]] for s in steps[-20:])


def test_a_unit_that_comes_back_after_a_long_streak_raises_the_bar_for_its_layer():
    """The run of tests/torch (test_torch_building_blocks.py), in Keras: batches of one sample, two
    ReLU units fire on one sample in twelve, two never do, one always does. Once the rare units came
    back from a streak of eleven, only units off for longer count as dead: 2 of 5."""
    from gradwatch.stats import UNIT_STREAK

    x = np.array([[1.0 if t % 12 == 11 else 0.2] for t in range(48)], dtype="float32")
    y = np.full((48, 1), 5.0, dtype="float32")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(5, activation="relu", name="hidden"),
                              keras.layers.Dense(1, kernel_initializer="ones", name="head")])
    model.layers[0].set_weights([np.array([[1.0, 1.0, 0.0, 0.0, 0.0]], dtype="float32"),
                                 np.array([-0.5, -0.5, -50.0, -50.0, 1.0], dtype="float32")])
    report, steps, _ = watch_fit(model, x, y, optimizer=keras.optimizers.SGD(0.0), loss="mse", batch_size=1,
                                 shuffle=False)
    bias = steps[0].layout.names.index(next(n for n in steps[0].layout.names if "hidden" in n and "bias" in n))
    dead = [s.dead_fraction[bias] for s in steps]
    assert len(dead) == 48
    assert dead[UNIT_STREAK - 1] == pytest.approx(4 / 5)
    assert dead[11] == pytest.approx(2 / 5)
    assert max(dead[12:]) == pytest.approx(2 / 5) and min(dead[12:]) == pytest.approx(2 / 5)


# -- healthy models stay silent -----------------------------------------------------------------


def assert_silent(report):
    assert report.healthy, report.summary()
    assert kinds(report, ("info", "warning", "error")) == set(), report.summary()
    assert not report.action_counts, report.summary()


TORCH_COMPILE = pytest.mark.skipif(
    BACKEND == "torch",
    reason="jit_compile=True means torch.compile on the torch backend: ~90 s of compilation on this CPU "
    "(it passes); XLA (TensorFlow) and jax.jit cover compiled steps here",
)


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=TORCH_COMPILE)])
def test_relu_mlp_with_adam_is_silent(jit_compile):
    x, y = classification_data(512, 16, 4)
    report, steps, _ = watch_fit(mlp(16, (32, 32, 32), 4), x, y, optimizer=keras.optimizers.Adam(1e-3),
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                 policy="auto", epochs=2, compile={"jit_compile": jit_compile})
    assert len(steps) == 64
    assert_silent(report)


def test_cnn_with_batchnorm_is_silent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])
    report, steps, _ = watch_fit(model, x, y, optimizer=keras.optimizers.Adam(1e-3),
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                 policy="auto", epochs=2)
    assert_silent(report)
    roles = dict(zip(steps[0].layout.names, steps[0].layout.roles))
    assert sorted(set(roles.values())) == ["bias", "norm", "weight"]


def test_lstm_with_global_clipnorm_is_silent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6, 4)).astype("float32")
    y = x[:, :, 0].sum(axis=1, keepdims=True).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6, 4)), keras.layers.LSTM(8, name="lstm"), keras.layers.Dense(1)])
    report, steps, _ = watch_fit(model, x, y, optimizer=keras.optimizers.Adam(1e-2, global_clipnorm=1.0),
                                 loss="mse", policy="auto", epochs=2)
    assert_silent(report)
    assert steps[0].layout.layers[:3] == ("lstm", "lstm", "lstm")  # the cell's variables belong to the LSTM
    assert steps[0].global_norm > 1.0  # measured before the optimizer's own clipping


def test_converging_logistic_regression_is_silent():
    x, y = classification_data(512, 8, 2)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, activation="sigmoid")])
    report, steps, history = watch_fit(model, x, y.astype("float32"), optimizer=keras.optimizers.SGD(0.5),
                                       loss="binary_crossentropy", policy="auto", epochs=4)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert_silent(report)


def test_frozen_layers_are_left_out_and_silent():
    x, y = classification_data(256, 16, 4)
    model = mlp(16, (32, 32, 32), 4)
    model.layers[0].trainable = False
    report, steps, _ = watch_fit(model, x, y, optimizer=keras.optimizers.Adam(1e-3),
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), policy="auto")
    assert_silent(report)
    assert model.layers[0].name not in steps[0].layout.layers
    assert len(steps[0].layout) == 6
