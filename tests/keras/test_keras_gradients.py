"""The callback sees the real training gradients: the ones the optimizer applies on each batch."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")
import keras  # noqa: E402
from _keras_helpers import BACKEND, classification_data, numpy_of, record  # noqa: E402

from gradwatch import GradWatch  # noqa: E402


def reference_gradients(model, loss_fn, x, y):
    """The framework's own autodiff of the compiled loss on one batch, with the current weights."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return [np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)]
    if BACKEND == "torch":
        for v in model.trainable_variables:
            v.value.grad = None
        loss = loss_fn(y, model(x, training=True))
        loss.backward()
        return [v.value.grad.detach().cpu().numpy() for v in model.trainable_variables]
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable):
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, y_pred)

        return [np.asarray(g) for g in jax.grad(loss_of)([v.value for v in model.trainable_variables])]
    pytest.skip(f"no reference autodiff written for backend {BACKEND!r}")


def test_norms_equal_the_frameworks_own_gradients_batch_by_batch():
    x, y = classification_data(48, 8, 3)
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="tanh", name="first"),
        keras.layers.Dense(3, name="head"),
    ])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_fn)
    cb = GradWatch(policy="observe", strict=True)
    steps = record(cb)
    expected = []
    for batch in range(3):
        xb, yb = x[16 * batch: 16 * (batch + 1)], y[16 * batch: 16 * (batch + 1)]
        expected.append([np.linalg.norm(g) for g in reference_gradients(model, loss_fn, xb, yb)])
        params = [np.linalg.norm(w) for w in numpy_of(model.trainable_variables)]
        model.fit(xb, yb, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        np.testing.assert_allclose(steps[-1].param_norm, params, rtol=1e-5)
    assert [s.step for s in steps] == [0, 1, 2]  # one count across the three fits
    for stats, norms in zip(steps, expected):
        np.testing.assert_allclose(stats.grad_norm, norms, rtol=1e-5)
        assert stats.layout.layers == ("first", "first", "head", "head")
        assert stats.layout.roles == ("weight", "bias", "weight", "bias")
    assert steps[0].lr == pytest.approx(0.1)


def test_one_fit_with_several_batches_reports_each_batch():
    x, y = classification_data(48, 8, 3)
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_fn)
    # Replay the same three SGD steps by hand on a copy to get the reference gradients.
    keras.utils.set_random_seed(3)
    twin = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    twin.set_weights(model.get_weights())
    expected = []
    for batch in range(3):
        xb, yb = x[16 * batch: 16 * (batch + 1)], y[16 * batch: 16 * (batch + 1)]
        grads = reference_gradients(twin, loss_fn, xb, yb)
        expected.append([np.linalg.norm(g) for g in grads])
        twin.set_weights([w - 0.1 * g for w, g in zip(twin.get_weights(), grads)])
    cb = GradWatch(policy="observe", strict=True)
    steps = record(cb)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    np.testing.assert_allclose([s.grad_norm for s in steps], expected, rtol=1e-4)
