"""``gradwatch demo``, part two: the doctor on one vanishing and one exploding PyTorch model.

1. A 10-layer sigmoid MLP trained with SGD: the gradients vanish; the doctor names the sigmoid
   stack, the missing normalisation and plain SGD across five decades of gradient norms, tries the
   repairs those call for on copies, and shows the one that works as a change of the layers.
2. A ReLU MLP with SGD at LR 10: the loss diverges within a few steps; the doctor names the LR
   (from how far the first steps moved the weights) and the unclipped norm, and ranks the LR cut,
   Adam and clipping.

Synthetic data, CPU, a few seconds each.
"""

from __future__ import annotations

import itertools
from typing import Any

from gradwatch.errors import require

require("torch", "torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradwatch.doctor import run_doctor  # noqa: E402

WIDTH = 100


def _batches(seed: int = 0, n: int = 512, d: int = 16, k: int = 4, batch: int = 32) -> Any:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g)).argmax(1)
    for i in itertools.count():
        j = (i * batch) % n
        yield x[j:j + batch], y[j:j + batch]


def vanishing_setup() -> Any:
    """10 x (Linear + Sigmoid), SGD at LR 0.1."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = 16
    for _ in range(10):
        layers += [nn.Linear(d, 32), nn.Sigmoid()]
        d = 32
    model = nn.Sequential(*layers, nn.Linear(d, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), _batches(), nn.CrossEntropyLoss()


def exploding_setup() -> Any:
    """2 x (Linear + ReLU), SGD at LR 10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    return model, torch.optim.SGD(model.parameters(), lr=10.0), _batches(1), nn.CrossEntropyLoss()


def _show(title: str, factory: Any) -> None:
    print("=" * WIDTH)
    print(title)
    print("=" * WIDTH)
    result = run_doctor(factory, steps=40, max_trials=5)
    print(result.summary())
    print()


def main() -> int:
    """Run both; returns the exit code (0)."""
    _show("4. gradwatch doctor on the deep sigmoid MLP: causes, repairs tried on copies, the change that works",
          vanishing_setup)
    _show("5. gradwatch doctor on an MLP whose SGD learning rate (10) makes it diverge", exploding_setup)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
