"""gradwatch in a plain PyTorch loop: one call, and a run whose learning rate is too high survives.

Run: python examples/torch_loop.py   (CPU, a few seconds)
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = x[:, :1] * 2 + x[:, 1:2] ** 2 - 1
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)  # too high: unwatched, this diverges to NaN

    with gradwatch.watch(model, optimizer) as watch:  # policy="auto"
        for _ in range(120):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            watch.record_loss(loss)  # optional: enables the loss_spike detector; no host sync
            optimizer.step()

    report = watch.report()
    print(report.summary())
    print(f"final loss {loss.item():.4f}, learning rate factor x{watch.lr_factor:g}")


if __name__ == "__main__":
    main()
