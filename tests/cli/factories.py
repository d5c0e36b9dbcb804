"""Factories for the tests of ``gradwatch check``: real PyTorch and Keras setups that are healthy
or go wrong in one known way each, streams of synthetic statistics, and broken factories.

Frameworks are imported inside the factories, so this file imports without any of them.
"""

from __future__ import annotations

import itertools

from gradwatch import CheckSpec
from gradwatch.testing import exploding_stream, healthy, nan_at, vanishing_stream

# -- synthetic statistics (numpy only) --------------------------------------------------------------


def stats_healthy():
    return CheckSpec(stats=healthy(steps=200), steps=60)


def stats_exploding():
    return exploding_stream(onset=30, steps=200)


def stats_nan():
    return list(nan_at(step=10, steps=40))


def stats_vanishing():
    return CheckSpec(stats=vanishing_stream(steps=200))


def stats_layer_names():
    """Layer names that need escaping in HTML, XML and matplotlib ($ is mathtext)."""
    from gradwatch import Layout, StepStats

    names = ['<script>alert("x")</script>.weight', "a&b $x$ 'q'.weight", "héad\x01.weight"]
    layout = Layout.from_names(names, numel=[100, 100, 100])
    for step in range(40):
        grad = [0.1, 0.1, float("nan") if step == 20 else 0.1]
        yield StepStats(step=step, layout=layout, grad_norm=grad, param_norm=[1.0, 1.0, 1.0], loss=1.0)


# -- broken factories -------------------------------------------------------------------------------


def raises():
    raise RuntimeError("the data directory is missing")


def returns_number():
    return 42


def returns_nothing():
    pass


NOT_A_FUNCTION = 3


# -- PyTorch ------------------------------------------------------------------------------------------


def _torch_data(n_in: int = 16, n_out: int = 4, batch: int = 32, endless: bool = True):
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, n_in, generator=generator)
    w = torch.randn(n_in, n_out, generator=generator)
    y = (x @ w).argmax(1)

    def batches():
        for i in itertools.count():
            j = (i * batch) % 512
            yield x[j:j + batch], y[j:j + batch]

    return batches() if endless else [(x[j:j + batch], y[j:j + batch]) for j in range(0, 128, batch)]


def torch_healthy():
    """A ReLU MLP with Adam: healthy."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, optimizer, _torch_data(endless=False), nn.CrossEntropyLoss()


def torch_vanishing():
    """A deep sigmoid MLP: gradients vanish towards the input."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    layers: list[nn.Module] = []
    width = 32
    for i in range(12):
        layers += [nn.Linear(16 if i == 0 else width, width), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(width, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, optimizer, _torch_data(), nn.CrossEntropyLoss()


def torch_exploding():
    """A linear regression through two Linear layers with a learning rate past the edge of
    stability: the gradient norm grows step after step (then overflows to NaN)."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.15)
    data = ((x, x.sum(1, keepdim=True)) for x, _ in _torch_data())
    return CheckSpec(model=model, optimizer=optimizer, batches=data, loss_fn=nn.MSELoss(), steps=40)


class _SqrtWhere:
    """``torch.where(x > 0, x.sqrt(), 0)``: finite forward, NaN gradient for x < 0."""

    def __call__(self, x):
        import torch

        return torch.where(x > 0, x.sqrt(), torch.zeros_like(x))


def torch_nan():
    """A NaN gradient behind a finite loss (sqrt of negative numbers masked by where)."""
    import torch
    from torch import nn

    torch.set_num_threads(1)

    class SqrtWhere(nn.Module):
        def forward(self, x):
            return _SqrtWhere()(x)

    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), SqrtWhere(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, optimizer, _torch_data(), nn.CrossEntropyLoss()


def torch_wrong_optimizer():
    """The parts in the wrong order."""
    import torch
    from torch import nn

    model = nn.Linear(4, 2)
    return model, nn.MSELoss(), [(torch.zeros(2, 4), torch.zeros(2, 2))], torch.optim.SGD(model.parameters(), lr=0.1)


def torch_shape_mismatch():
    import torch
    from torch import nn

    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), [(torch.zeros(2, 5), torch.zeros(2, 2))], nn.MSELoss()


# -- Keras ----------------------------------------------------------------------------------------


def keras_healthy():
    """A compiled ReLU MLP with Adam, on arrays."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x @ rng.normal(size=(16, 4))).argmax(1)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, y


def keras_uncompiled():
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    return model, np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32")


def keras_vanishing():
    """A deep sigmoid MLP in Keras: gradients vanish towards the input."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x @ rng.normal(size=(16, 4))).argmax(1)
    layers = [keras.layers.Dense(32, activation="sigmoid", name=f"dense_{i}") for i in range(12)]
    model = keras.Sequential([keras.Input((16,)), *layers, keras.layers.Dense(4, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, y


def keras_pydataset():
    """A healthy MLP fed by a keras.utils.PyDataset of 4 batches (iterated over several epochs)."""
    import keras

    model, x, y = keras_healthy()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]

    return model, Batches()


def keras_generator():
    """A healthy MLP fed by an endless Python generator of (x, y) batches."""
    import itertools

    model, x, y = keras_healthy()

    def batches():
        for i in itertools.cycle(range(8)):
            yield x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]

    return model, batches()


def keras_tf_data_repeated():
    """A healthy MLP fed by an endless tf.data pipeline (TensorFlow backend)."""
    import tensorflow as tf

    model, x, y = keras_healthy()
    return model, tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()


def keras_tf_data():
    """A healthy MLP fed by a finite tf.data pipeline of 8 batches (TensorFlow backend)."""
    import tensorflow as tf

    model, x, y = keras_healthy()
    return model, tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
