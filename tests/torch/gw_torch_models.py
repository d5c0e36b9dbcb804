"""Small real PyTorch models and loops for the adapter tests (CPU, seconds each)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

torch.set_num_threads(1)


def mlp(seed: int = 0, *, act: type[nn.Module] = nn.ReLU, depth: int = 3, width: int = 32,
        d_in: int = 10, d_out: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def regression_data(seed: int = 1, n: int = 256, d_in: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = x[:, :1] * 2 + x[:, 1:2] ** 2 - 1
    return x, y


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, watch=None,
          data: tuple[torch.Tensor, torch.Tensor] | None = None,
          loss_fn: Callable = nn.functional.mse_loss, scheduler=None,
          before_step: Callable[[int], None] | None = None) -> list[float]:
    """A plain training loop; returns the losses."""
    x, y = data if data is not None else regression_data()
    losses = []
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if watch is not None:
            watch.record_loss(loss)
        if before_step is not None:
            before_step(t)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def first_nonfinite(losses: list[float]) -> int | None:
    return next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_params(a: nn.Module, b: nn.Module) -> bool:
    """Bit-for-bit equal parameters (NaN included)."""
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(bits(p), bits(q)) for p, q in zip(pa, pb))
