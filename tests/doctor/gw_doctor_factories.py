"""Setups for the doctor's tests: real PyTorch and Keras models, each healthy or wrong in one known
way. Frameworks are imported inside the factories, so this file imports without them."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def _arrays(n: int = 512, d: int = 16, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d).astype("float32")
    return x, (x @ rng.randn(d, k)).argmax(1).astype("int64")


def torch_batches(n: int = 512, d: int = 16, k: int = 4, batch: int = 32, seq: int = 0) -> Any:
    import torch

    x, y = _arrays(n, d * max(seq, 1), k)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if seq:
        xt = xt.reshape(n, seq, d)

    def endless() -> Any:
        for i in itertools.count():
            j = (i * batch) % n
            yield xt[j:j + batch], yt[j:j + batch]

    return endless()


def torch_mlp(depth: int = 6, activation: str = "sigmoid", *, std: float | None = None, bias: float = 0.0,
              optimizer: str = "sgd", lr: float = 0.1, width: int = 32) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    acts = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
    layers: list[nn.Module] = []
    d = 16
    for _ in range(depth):
        linear = nn.Linear(d, width)
        if std is not None:
            nn.init.normal_(linear.weight, std=std)
        if bias:
            nn.init.constant_(linear.bias, bias)
        layers += [linear, acts[activation]()]
        d = width
    model = nn.Sequential(*layers, nn.Linear(d, 4))
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    return model, opt, torch_batches(), nn.CrossEntropyLoss()


def torch_sigmoid() -> Any:
    return torch_mlp(8, "sigmoid")


def torch_healthy() -> Any:
    return torch_mlp(2, "relu", optimizer="adam", lr=1e-3, width=64)


def torch_lr_too_high() -> Any:
    return torch_mlp(2, "relu", optimizer="sgd", lr=10.0, width=64)


def torch_lr_too_low() -> Any:
    return torch_mlp(2, "relu", optimizer="sgd", lr=1e-6, width=64)


def torch_dead() -> Any:
    return torch_mlp(3, "relu", bias=-4.0, lr=0.05, width=64)


def torch_tiny_init_tanh() -> Any:
    return torch_mlp(5, "tanh", std=0.01)


class FunctionalTanh:
    """A module whose activations are called inside forward(): measured, not swappable."""

    @staticmethod
    def build() -> Any:
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32)
                self.fc4, self.fc5, self.out = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
                for m in (self.fc1, self.fc2, self.fc3, self.fc4, self.fc5):
                    nn.init.normal_(m.weight, std=0.01)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = torch.tanh(self.fc1(x))
                x = torch.tanh(self.fc2(x))
                x = torch.tanh(self.fc3(x))
                x = torch.tanh(self.fc4(x))
                x = torch.tanh(self.fc5(x))
                return self.out(x)

        torch.manual_seed(0)
        model = Net()
        return model, torch.optim.SGD(model.parameters(), lr=0.1), torch_batches(), nn.CrossEntropyLoss()


def torch_functional_tanh() -> Any:
    return FunctionalTanh.build()


def torch_rnn(gain: float = 5.0) -> Any:
    import torch
    from torch import nn

    class SequenceNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(8, 32, nonlinearity="relu", batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = SequenceNet()
    with torch.no_grad():
        nn.init.normal_(model.rnn.weight_hh_l0, std=gain / 32 ** 0.5)  # type: ignore[arg-type]
    return model, torch.optim.SGD(model.parameters(), lr=0.02), torch_batches(d=8, seq=8), nn.CrossEntropyLoss()


def torch_conv() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 4))
    x, y = _arrays(256, 16, 4)
    xt, yt = torch.from_numpy(x).reshape(256, 1, 4, 4), torch.from_numpy(y)
    batches = [(xt[i:i + 32], yt[i:i + 32]) for i in range(0, 256, 32)]
    return model, torch.optim.SGD(model.parameters(), lr=0.1), batches, nn.CrossEntropyLoss()


# -- Keras ---------------------------------------------------------------------------------------


def keras_mlp(depth: int = 6, activation: str = "sigmoid", *, optimizer: str = "sgd", lr: float = 0.1,
              functional: bool = False, split_activation: bool = False) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    x, y = _arrays()
    if functional:
        inputs = keras.Input((16,))
        h = inputs
        for i in range(depth):
            if split_activation:
                h = keras.layers.Dense(32, name=f"dense_{i}")(h)
                h = keras.layers.Activation(activation, name=f"act_{i}")(h)
            else:
                h = keras.layers.Dense(32, activation=activation, name=f"dense_{i}")(h)
        model = keras.Model(inputs, keras.layers.Dense(4, name="head")(h))
    else:
        model = keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(32, activation=activation, name=f"dense_{i}")
                                                          for i in range(depth)] + [keras.layers.Dense(4, name="head")])
    opt = keras.optimizers.Adam(lr) if optimizer == "adam" else keras.optimizers.SGD(lr)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model, x, y


def keras_sigmoid() -> Any:
    return keras_mlp(8, "sigmoid")


def keras_healthy() -> Any:
    return keras_mlp(2, "relu", optimizer="adam", lr=1e-3)


def keras_functional_sigmoid() -> Any:
    return keras_mlp(8, "sigmoid", functional=True, split_activation=True)


def keras_subclassed() -> Any:
    import keras

    class Net(keras.Model):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.hidden = [keras.layers.Dense(32, activation="sigmoid") for _ in range(6)]
            self.head = keras.layers.Dense(4)

        def call(self, x: Any) -> Any:
            for layer in self.hidden:
                x = layer(x)
            return self.head(x)

    keras.utils.set_random_seed(0)
    x, y = _arrays()
    model = Net()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, y
