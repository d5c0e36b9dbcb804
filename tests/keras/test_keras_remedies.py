"""Remedies inside the compiled step: skip, clip, learning-rate factor, and a rescued divergence."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("keras")
import keras  # noqa: E402
from _keras_helpers import (  # noqa: E402
    BACKEND,
    FixedControls,
    classification_data,
    exploding_regression,
    mlp,
    numpy_of,
    record,
    regression_data,
    same,
)

from gradwatch import GradWatch  # noqa: E402

CE = "sparse_categorical_crossentropy"


def train(x, y, *, optimizer, callbacks=(), epochs=1, batch_size=16, jit_compile="auto", widths=(16, 16)):
    model = mlp(8, widths, 3)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


def state_of(model):
    return numpy_of(model.weights), numpy_of(model.optimizer.variables)


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    BACKEND == "torch", reason="torch.compile takes ~90 s to compile on this CPU"))])
def test_healthy_run_under_auto_is_bit_for_bit_the_unwatched_run(jit_compile):
    x, y = classification_data(128, 8, 3)
    plain = train(x, y, optimizer=keras.optimizers.Adam(1e-3), epochs=2, jit_compile=jit_compile)
    cb = GradWatch()
    watched = train(x, y, optimizer=keras.optimizers.Adam(1e-3), epochs=2, jit_compile=jit_compile, callbacks=[cb])
    assert cb.report().healthy and cb.report().steps_measured == 16
    weights, slots = state_of(watched)
    plain_weights, plain_slots = state_of(plain)
    assert same(weights, plain_weights)
    assert same(slots, plain_slots)  # gradwatch's own variables are gone from the optimizer


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    BACKEND == "torch", reason="torch.compile takes ~90 s to compile on this CPU"))])
def test_skipped_step_leaves_weights_and_optimizer_state_as_if_the_batch_never_was(jit_compile):
    """Also compiled by XLA, where TensorFlow once kept the NaN update it meant to skip (the state
    before the update was read after it)."""
    x, y = classification_data(48, 8, 3)
    poisoned = x.copy()
    poisoned[20, 3] = np.nan  # batch 1 of 3
    cb = GradWatch(strict=True)
    steps = record(cb)
    watched = train(poisoned, y, optimizer=keras.optimizers.Adam(1e-2), callbacks=[cb], jit_compile=jit_compile)
    keep = np.r_[0:16, 32:48]
    reference = train(x[keep], y[keep], optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile)
    weights, slots = state_of(watched)
    ref_weights, ref_slots = state_of(reference)
    assert same(weights, ref_weights)
    assert same(slots, ref_slots)  # moments and iterations included
    assert [s.finite for s in steps] == [True, False, True]
    assert cb.report().action_counts["skip_step"] == 1


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    BACKEND == "torch", reason="torch.compile takes ~90 s to compile on this CPU"))])
def test_a_skipped_batch_leaves_batch_normalization_statistics_as_if_it_never_was(jit_compile):
    """A NaN in the input reaches BatchNormalization's moving mean and variance in the forward
    pass, before any gradient is judged: skipping the update alone would leave them NaN, and every
    later prediction with them."""
    x, y = classification_data(48, 8, 3)
    poisoned = x.copy()
    poisoned[20, 3] = np.nan  # batch 1 of 3

    def fit(data, labels, callbacks=()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.BatchNormalization(), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data, labels, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=list(callbacks))
        return model

    cb = GradWatch(strict=True)
    watched = fit(poisoned, y, [cb])
    keep = np.r_[0:16, 32:48]
    reference = fit(x[keep], y[keep])
    assert cb.report().action_counts["skip_step"] == 1
    moving = numpy_of(watched.non_trainable_variables)
    assert all(np.isfinite(v).all() for v in moving)
    assert same(moving, numpy_of(reference.non_trainable_variables))
    assert same(numpy_of(watched.weights), numpy_of(reference.weights))
    assert np.isfinite(watched.predict(x, verbose=0)).all()


def test_observe_never_changes_training_even_when_it_breaks():
    x, y = classification_data(48, 8, 3)
    x[20, 3] = np.nan
    plain = train(x, y, optimizer=keras.optimizers.Adam(1e-2))
    cb = GradWatch(policy="observe")
    watched = train(x, y, optimizer=keras.optimizers.Adam(1e-2), callbacks=[cb])
    assert same(state_of(watched)[0], state_of(plain)[0])
    assert not np.isfinite(state_of(plain)[0][0]).all()
    assert {f.kind for f in cb.report().findings} == {"nonfinite"}
    assert not cb.report().action_counts


def test_clip_by_global_norm_matches_keras_global_clipnorm():
    x, y = classification_data(48, 8, 3)
    cb = GradWatch(policy=FixedControls(clip_norm=0.05), strict=True)
    steps = record(cb)
    watched = train(x, y, optimizer=keras.optimizers.SGD(0.5), callbacks=[cb])
    reference = train(x, y, optimizer=keras.optimizers.SGD(0.5, global_clipnorm=0.05))
    for a, b in zip(state_of(watched)[0], state_of(reference)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert all(s.global_norm > 0.05 for s in steps)  # measured before clipping


@pytest.mark.parametrize("make_optimizer", [
    pytest.param(lambda lr: keras.optimizers.SGD(lr), id="sgd"),
    pytest.param(lambda lr: keras.optimizers.Adam(lr), id="adam"),
    pytest.param(lambda lr: keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=2, decay_rate=0.5)), id="adam-schedule"),
])
def test_learning_rate_factor_scales_the_rate_not_the_gradients(make_optimizer):
    x, y = classification_data(48, 8, 3)
    cb = GradWatch(policy=FixedControls(lr_factor=0.25), strict=True)
    steps = record(cb)
    watched = train(x, y, optimizer=make_optimizer(0.04), callbacks=[cb])
    reference = train(x, y, optimizer=make_optimizer(0.01))
    unscaled = train(x, y, optimizer=make_optimizer(0.04))
    for a, b in zip(state_of(watched)[0], state_of(reference)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(state_of(watched)[0][0], state_of(unscaled)[0][0])
    assert steps[0].lr == pytest.approx(0.01)
    # The user's own learning rate (variable or schedule) is left as it was.
    assert float(keras.ops.convert_to_numpy(watched.optimizer.learning_rate)) == pytest.approx(
        float(keras.ops.convert_to_numpy(unscaled.optimizer.learning_rate)))


def test_auto_rescues_a_diverging_fit():
    model, x, y, lr, (x1, y1) = exploding_regression()
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    model.fit(x, y, batch_size=64, shuffle=False, verbose=0)
    plain_loss = model.evaluate(x1, y1, verbose=0)

    model, *_ = exploding_regression()
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    cb = GradWatch(strict=True)
    model.fit(x, y, batch_size=64, shuffle=False, verbose=0, callbacks=[cb])
    rescued_loss = model.evaluate(x1, y1, verbose=0)
    report = cb.report()
    assert not math.isfinite(plain_loss) or plain_loss > 1e20
    assert math.isfinite(rescued_loss) and rescued_loss < 1e-6 * (plain_loss if math.isfinite(plain_loss) else 1e30)
    assert report.action_counts.get("clip", 0) > 0 and report.action_counts.get("lr_decay", 0) >= 1
    assert cb.monitor.controls.lr_factor < 1.0


def test_mixed_float16_measures_unscaled_gradients_and_counts_loss_scale_skips():
    x, y = regression_data(128, 8)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
        # A loss scale of 2**40 overflows float16 at first: the optimizer halves it and skips.
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), initial_scale=2.0**40)
        model.compile(optimizer=optimizer, loss="mse")
        cb = GradWatch(strict=True)
        steps = record(cb)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    finally:
        keras.config.set_dtype_policy(previous)
    report = cb.report()
    inner_steps = int(keras.ops.convert_to_numpy(optimizer.inner_optimizer.iterations))
    assert report.skipped_steps == 16 - inner_steps > 0
    assert len(steps) == inner_steps
    assert all(s.finite and s.global_norm < 1e3 for s in steps)  # unscaled
    assert report.healthy, report.summary()
