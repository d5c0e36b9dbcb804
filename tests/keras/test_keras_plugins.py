"""A ``gradwatch_select_actions`` plugin's decision reaches the compiled Keras step: the Monitor
owns the final controls and the callback writes those (not the policy's) into the step's
variables, on every backend (run once per ``KERAS_BACKEND``)."""

from __future__ import annotations

import dataclasses

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
