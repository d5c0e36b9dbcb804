"""PyTorch runner of the doctor benchmark: build a :class:`~benchmarks.doctor.cases.Setup`, the
factory the doctor gets, a full training run, and test accuracy."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

import gradwatch
from benchmarks.doctor.cases import Setup
from benchmarks.doctor.data import Dataset

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class SequenceNet(nn.Module):
    """One recurrent layer, a dense head on the last step's state."""

    def __init__(self, features: int, hidden: int, classes: int, activation: str) -> None:
        super().__init__()
        self.rnn = nn.RNN(features, hidden, nonlinearity=activation, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _init(layer: nn.Linear, setup: Setup) -> None:
    with torch.no_grad():
        if setup.init == "he":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        elif setup.init.startswith("normal:"):
            nn.init.normal_(layer.weight, std=float(setup.init.split(":")[1]))
        if layer.bias is not None and setup.init != "default":
            nn.init.zeros_(layer.bias)


def build(setup: Setup, data: Dataset, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer of a setup, seeded."""
    torch.manual_seed(seed)
    if setup.kind == "rnn":
        model: nn.Module = SequenceNet(data.x_train.shape[2], setup.width, data.classes, setup.activation)
        rnn = model.rnn  # type: ignore[union-attr]
        with torch.no_grad():
            if setup.recurrent_gain:
                nn.init.normal_(rnn.weight_hh_l0, std=setup.recurrent_gain / math.sqrt(setup.width))
            else:
                nn.init.orthogonal_(rnn.weight_hh_l0)
                nn.init.xavier_uniform_(rnn.weight_ih_l0)
                nn.init.zeros_(rnn.bias_hh_l0)
                nn.init.zeros_(rnn.bias_ih_l0)
    else:
        layers: list[nn.Module] = []
        width = data.x_train.shape[1]
        for _ in range(setup.depth):
            linear = nn.Linear(width, setup.width)
            _init(linear, setup)
            if setup.bias:
                with torch.no_grad():
                    linear.bias.fill_(setup.bias)
            layers += [linear, ACTIVATIONS[setup.activation]()]
            width = setup.width
        head = nn.Linear(width, data.classes)
        _init(head, setup)
        model = nn.Sequential(*layers, head)
    cls = torch.optim.Adam if setup.optimizer == "adam" else torch.optim.SGD
    return model, cls(model.parameters(), lr=setup.lr)


def _epochs(data: Dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    rng = np.random.RandomState(seed)
    for _ in itertools.count():
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            index = order[i:i + batch_size]
            yield x[index], y[index]


def factory(setup: Setup, data: Dataset, batch_size: int) -> Any:
    """What ``gradwatch doctor`` gets: ``(model, optimizer, batches, loss_fn)``."""
    model, optimizer = build(setup, data)
    return model, optimizer, _epochs(data, batch_size, seed=0), nn.CrossEntropyLoss()


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    return len(data.x_train) // batch_size


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, *, epochs: int, batch_size: int,
          clip: float | None = None, watch: bool = False) -> dict[str, Any]:
    """A full training run; returns seconds, test accuracy, final loss and (watched) the report."""
    loss_fn = nn.CrossEntropyLoss()
    handle = gradwatch.watch(model, optimizer, policy="observe") if watch else None
    model.train()
    start = time.perf_counter()
    loss = torch.tensor(math.nan)
    try:
        for x, y in itertools.islice(_epochs(data, batch_size, seed=1), epochs * steps_per_epoch(data, batch_size)):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if handle is not None:
                handle.record_loss(loss)
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        seconds = time.perf_counter() - start
        report = handle.report() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    return {"seconds": seconds, "accuracy": accuracy(model, data), "loss": float(loss.detach()), "report": report}


def accuracy(model: nn.Module, data: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x_test))
    model.train()
    if not torch.isfinite(logits).all():
        return 0.0
    return float((logits.argmax(1).numpy() == data.y_test).mean())


def setup_threads() -> None:
    torch.set_num_threads(1)
