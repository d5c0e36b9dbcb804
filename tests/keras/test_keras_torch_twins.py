"""The same run written twice, in Keras (on whichever backend ``KERAS_BACKEND`` selects) and in
plain PyTorch under ``gradwatch.watch``: the same layers with the same initial weights (copied from
the Keras model), the same batches in the same order, the same plain SGD. The two adapters must
find the same kinds at the same steps and take the same actions (issue 13's parity suite).

Layer names differ by framework (``dense_1`` against ``2``), so findings are compared by kind,
severity and step, and actions by kind and step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

pytest.importorskip("keras")
pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")
import keras  # noqa: E402
import torch  # noqa: E402
from _keras_helpers import JumpAt  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import GradWatch  # noqa: E402

ACTIVATIONS = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}


@dataclass
class Twin:
    """One run described once: data, layers, SGD schedule, what to break."""

    x: np.ndarray
    y: np.ndarray
    widths: tuple[int, ...]
    out: int
    activation: str
    lr: float
    batch: int
    epochs: int = 1
    classify: bool = False
    seed: int = 0
    init: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None  # edits the initial weights
    jump: tuple[int, float] | None = None  # (optimizer step, factor): the LR times factor from there on

    def keras_model(self) -> keras.Model:
        keras.utils.set_random_seed(self.seed)
        layers: list[Any] = [keras.Input((self.x.shape[1],))]
        layers += [keras.layers.Dense(w, activation=self.activation) for w in self.widths]
        layers += [keras.layers.Dense(self.out)]
        model = keras.Sequential(layers)
        if self.init is not None:
            model.set_weights(self.init([np.array(w) for w in model.get_weights()]))
        return model

    def torch_model(self, weights: list[np.ndarray]) -> torch.nn.Module:
        modules: list[torch.nn.Module] = []
        sizes = (self.x.shape[1], *self.widths, self.out)
        for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
            linear = torch.nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(weights[2 * i].T.copy()))
                linear.bias.copy_(torch.from_numpy(weights[2 * i + 1].copy()))
            modules.append(linear)
            if i < len(self.widths):
                modules.append(ACTIVATIONS[self.activation]())
        return torch.nn.Sequential(*modules)

    def schedule(self) -> Any:
        return JumpAt(self.lr, *self.jump) if self.jump else self.lr

    def lr_at(self, step: int) -> float:
        return self.lr * self.jump[1] if self.jump and step >= self.jump[0] else self.lr


def run_keras(twin: Twin, policy: str) -> tuple[Any, list[np.ndarray], float]:
    model = twin.keras_model()
    initial = [np.array(w) for w in model.get_weights()]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True) if twin.classify else "mse"
    model.compile(optimizer=keras.optimizers.SGD(twin.schedule()), loss=loss)
    cb = GradWatch(policy=policy)
    model.fit(twin.x, twin.y, epochs=twin.epochs, batch_size=twin.batch, shuffle=False, verbose=0, callbacks=[cb])
    final = float(model.evaluate(twin.x, twin.y, batch_size=len(twin.x), verbose=0))
    return cb.report(), initial, final


def run_torch(twin: Twin, initial: list[np.ndarray], policy: str) -> tuple[Any, float]:
    torch.manual_seed(twin.seed)
    model = twin.torch_model(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=twin.lr)
    x = torch.from_numpy(twin.x)
    y = torch.from_numpy(twin.y.astype("int64") if twin.classify else twin.y)
    loss_fn = torch.nn.CrossEntropyLoss() if twin.classify else torch.nn.MSELoss()
    step = 0
    with gradwatch.watch(model, optimizer, policy=policy) as watch:
        for _ in range(twin.epochs):
            for start in range(0, len(x), twin.batch):
                for group in optimizer.param_groups:  # the LR the Keras schedule gives this step
                    group["lr"] = twin.lr_at(step)
                optimizer.zero_grad()
                loss = loss_fn(model(x[start:start + twin.batch]), y[start:start + twin.batch])
                loss.backward()
                watch.record_loss(loss)
                optimizer.step()
                step += 1
        report = watch.report()
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    return report, final


def alarms(report: Any) -> list[tuple[str, int]]:
    """(kind, first step) of every warning or error."""
    return sorted((f.kind, f.step) for f in report.findings if f.severity in ("warning", "error"))


def actions(report: Any) -> list[tuple[str, int]]:
    return [(a.kind, a.step) for a in report.actions if a.kind != "recommend_batchnorm"]


def both(twin: Twin, policy: str = "auto") -> tuple[Any, float, Any, float]:
    k_report, initial, k_final = run_keras(twin, policy)
    t_report, t_final = run_torch(twin, initial, policy)
    return k_report, k_final, t_report, t_final


def assert_same(k_report: Any, t_report: Any) -> None:
    context = f"\nKeras:\n{k_report.summary()}\nPyTorch:\n{t_report.summary()}"
    assert alarms(k_report) == alarms(t_report), context
    assert actions(k_report) == actions(t_report), context


def digits(n: int = 512) -> tuple[np.ndarray, np.ndarray]:
    data = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))[:n]
    return (data.data[order] / 16.0).astype("float32"), data.target[order].astype("int32")


def diabetes() -> tuple[np.ndarray, np.ndarray]:
    data = datasets.load_diabetes()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    return x.astype("float32"), (data.target / data.target.std()).astype("float32")[:, None]


# -- the twins ----------------------------------------------------------------------------------


def test_a_healthy_classifier_with_a_short_last_batch_is_healthy_in_both():
    x, y = digits(500)  # batches of 64: the last one of each epoch holds 52 rows
    twin = Twin(x, y, (64, 64), 10, "relu", lr=0.1, batch=64, epochs=3, classify=True)
    k_report, k_final, t_report, t_final = both(twin)
    assert_same(k_report, t_report)
    assert k_report.healthy and t_report.healthy, k_report.summary() + t_report.summary()
    assert not actions(k_report)
    assert k_final == pytest.approx(t_final, rel=1e-3)


@pytest.mark.xfail(reason="parity gap (open, issue 13): Keras applies what it decides on batch k from batch k + 2 "
                   "(the asynchronous reader overlaps batch k + 1), so step 44 still runs on the jumped weights "
                   "(loss 4.5e7, clipped) before the rollback of step 43 lands; and "
                   "its snapshot holds step 40's jumped update (PyTorch restores step 40's weights)")
def test_an_lr_jump_is_found_and_rolled_back_at_the_same_step_in_both():
    x, y = diabetes()
    twin = Twin(x, y, (64, 64, 64), 1, "tanh", lr=0.02, batch=len(x), epochs=60, jump=(40, 100.0))
    k_report, k_final, t_report, t_final = both(twin)
    assert_same(k_report, t_report)
    kinds = [kind for kind, _ in actions(k_report)]
    assert {"lr_decay", "rollback"} <= set(kinds), k_report.summary()
    assert math.isfinite(k_final) and math.isfinite(t_final)
    assert k_final == pytest.approx(t_final, rel=0.05)


def test_weights_ten_times_too_large_from_step_0_are_found_in_both():
    x, y = diabetes()
    twin = Twin(x, y, (64, 64), 1, "relu", lr=1e-4, batch=32, init=lambda ws: [10 * w for w in ws])
    k_report, _, t_report, _ = both(twin, "observe")
    # the run diverges to NaN: how many steps that takes depends on float rounding (one step apart
    # on Keras's torch backend), the first finding does not
    first = min(alarms(k_report), key=lambda a: a[1])
    assert first == min(alarms(t_report), key=lambda a: a[1]), k_report.summary() + t_report.summary()
    assert first[0] == "exploding" and first[1] <= 6, k_report.summary()


def test_a_nan_input_is_skipped_at_the_same_step_in_both():
    x, y = digits(320)
    x[5 * 32 + 3, 10] = np.nan  # one value of batch 5
    twin = Twin(x, y, (32,), 10, "relu", lr=0.1, batch=32, epochs=1, classify=True)
    k_report, _, t_report, _ = both(twin)
    assert_same(k_report, t_report)
    assert ("nonfinite", 5) in alarms(k_report), k_report.summary()
    assert ("skip_step", 5) in actions(k_report), k_report.summary()


def test_a_deep_sigmoid_stack_vanishes_in_both():
    x, y = digits(512)
    twin = Twin(x, y, (32,) * 10, 10, "sigmoid", lr=0.1, batch=64, epochs=2, classify=True)
    k_report, _, t_report, _ = both(twin, "observe")
    assert_same(k_report, t_report)
    assert "vanishing" in {kind for kind, _ in alarms(k_report)}, k_report.summary()


def test_relus_biased_dead_are_found_in_both():
    """Every unit of the second hidden layer off: every weight before and after it gets zero gradient,
    and only the output bias learns. PyTorch held its unit streaks on such steps (it looked at the
    weights only); both now count them, as they count steps with any gradient at all."""
    x, y = digits(512)

    def dead_second_layer(ws: list[np.ndarray]) -> list[np.ndarray]:
        ws[3] = ws[3] - 20.0  # every unit of the second hidden layer starts (and stays) off
        return ws

    twin = Twin(x, y, (32, 32), 10, "relu", lr=0.05, batch=64, epochs=2, classify=True, init=dead_second_layer)
    k_report, _, t_report, _ = both(twin, "observe")
    assert_same(k_report, t_report)
    assert "dead_units" in {kind for kind, _ in alarms(k_report)}, k_report.summary()
