"""Factories for `gradwatch check`: each returns a training setup, built small and on synthetic data.

    gradwatch check examples/ci/models.py:build_mlp --steps 50 --junit report.xml --html report.html

A PyTorch factory returns ``(model, optimizer, batches, loss_fn)``; ``batches`` yields
``(inputs, targets)`` and may be endless (the check takes ``--steps``). A Keras factory returns a
compiled model and its data, ``(model, x, y)``.
"""

from __future__ import annotations

import itertools


def synthetic_batches(n_in: int = 20, n_classes: int = 5, batch_size: int = 64):
    """An endless stream of (inputs, labels) from a fixed random linear teacher."""
    import torch

    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(n_in, n_classes, generator=generator)
    for _ in itertools.count():
        x = torch.randn(batch_size, n_in, generator=generator)
        yield x, (x @ teacher).argmax(1)


def build_mlp():
    """The model under test: a ReLU MLP with Adam. Healthy."""
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Linear(20, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 5),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, optimizer, synthetic_batches(), nn.CrossEntropyLoss()


def build_deep_sigmoid_mlp():
    """What the check is there to catch: 12 sigmoid layers, gradients vanish towards the input."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    for i in range(12):
        layers += [nn.Linear(20 if i == 0 else 64, 64), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(64, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, optimizer, synthetic_batches(), nn.CrossEntropyLoss()


def build_keras_mlp():
    """The same MLP in Keras 3, compiled, on arrays."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 20)).astype("float32")
    y = (x @ rng.normal(size=(20, 5))).argmax(1)
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(5),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, y
