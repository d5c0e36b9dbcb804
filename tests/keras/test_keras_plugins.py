"""A ``gradwatch_select_actions`` plugin's decision reaches the compiled Keras step: the Monitor
owns the final controls and the callback writes those (not the policy's) into the step's
variables, on every backend (run once per ``KERAS_BACKEND``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("keras")
import keras  # noqa: E402
from _keras_helpers import mlp, regression_data  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import GradWatch  # noqa: E402
from gradwatch.plugins import Hooks, make_plugin_manager  # noqa: E402

LR, FACTOR = 0.01, 0.25


class QuarterTheLR:
    """Every decision runs the learning rate at a quarter of the schedule."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    @gradwatch.hookimpl
    def gradwatch_select_actions(self, findings, stats, decision, monitor):
        return dataclasses.replace(
            decision, lr_factor=FACTOR, controls=dataclasses.replace(decision.controls, lr_factor=FACTOR)
        )

    @gradwatch.hookimpl
    def gradwatch_on_step(self, stats, decision, monitor):
        self.lrs[stats.step] = stats.lr


@pytest.mark.parametrize("jit", [False, True])
def test_a_plugins_lr_factor_reaches_the_compiled_step(jit):
    if jit and keras.backend.backend() == "torch":
        pytest.skip("jit_compile on the torch backend is torch.compile: ~90 s on this CPU")
    plugin = QuarterTheLR()
    manager = make_plugin_manager(autoload=False)
    manager.register(plugin)
    cb = GradWatch(monitor=gradwatch.Monitor(hooks=Hooks(manager)), strict=True)
    x, y = regression_data(128)
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=jit)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    assert cb.monitor.controls.lr_factor == FACTOR
    steps = sorted(plugin.lrs)
    assert steps == list(range(8))
    # Controls decided on step k are in force from step k + 2 (docs/keras.md, "when controls take effect").
    assert [plugin.lrs[s] for s in steps[:2]] == [pytest.approx(LR)] * 2
    assert [plugin.lrs[s] for s in steps[2:]] == [pytest.approx(LR * FACTOR)] * 6


class QuarterFromStep2(keras.optimizers.schedules.LearningRateSchedule):
    """The rate :class:`QuarterTheLR` makes of ``SGD(LR)``: LR for steps 0 and 1, then LR * FACTOR."""

    def __call__(self, step):
        return keras.ops.where(keras.ops.less(step, 2), LR, LR * FACTOR)


class ClipAt:
    """Every decision puts a clip level in force, far below the gradients' norms."""

    @gradwatch.hookimpl
    def gradwatch_select_actions(self, findings, stats, decision, monitor):
        return dataclasses.replace(decision, controls=dataclasses.replace(decision.controls, clip_norm=0.01))


def watched_by(plugin):
    manager = make_plugin_manager(autoload=False)
    manager.register(plugin)
    return GradWatch(monitor=gradwatch.Monitor(hooks=Hooks(manager)), strict=True)


def fitted(model, optimizer, jit, callbacks=(), fits=1):
    x, y = regression_data(128)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    for _ in range(fits):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=list(callbacks))
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


JIT = [False, pytest.param(True, marks=pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="jit_compile on the torch backend is torch.compile: ~90 s on this CPU"))]


@pytest.mark.parametrize("fits", [1, 2])
@pytest.mark.parametrize("jit", JIT)
def test_a_factor_decided_during_fit_scales_the_updates_of_the_compiled_step(jit, fits):
    # The step is traced with the factor left out while it is 1: the decision that changes it
    # must bring in a step that applies it (not only report it in ``stats.lr``), and so must the
    # next fit, which starts with the factor in force (jax.jit would rerun an older trace).
    cb = watched_by(QuarterTheLR())
    watched = fitted(mlp(), keras.optimizers.SGD(LR), jit, [cb], fits=fits)
    expected = fitted(mlp(), keras.optimizers.SGD(QuarterFromStep2()), jit, fits=fits)
    unscaled = fitted(mlp(), keras.optimizers.SGD(LR), jit, fits=fits)
    for a, b in zip(watched, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(watched[0], unscaled[0], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="XLA: TensorFlow's jit_compile and jax.jit")
def test_a_clip_level_decided_during_fit_reaches_the_xla_step():
    # Under XLA the clipping is compiled in only once a clip level is in force: the XLA step
    # must then clip as the step without XLA does.
    compiled = fitted(mlp(), keras.optimizers.SGD(LR), True, [watched_by(ClipAt())])
    stepwise = fitted(mlp(), keras.optimizers.SGD(LR), False, [watched_by(ClipAt())])
    unclipped = fitted(mlp(), keras.optimizers.SGD(LR), True)
    for a, b in zip(compiled, stepwise):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(compiled[0], unclipped[0], rtol=1e-4, atol=1e-6)
