"""Tiny PyTorch models and synthetic data for the scenarios (CPU, a few ms per step at most)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def regression(seed: int, n: int = 512, d_in: int = 10) -> Batch:
    """A smooth nonlinear target of 10 Gaussian features."""
    g = generator(seed)
    x = torch.randn(n, d_in, generator=g)
    y = x[:, :1] * 2 + torch.sin(x[:, 1:2] * 2) + x[:, 2:3] * x[:, 3:4] - 0.5
    return x, y


def classification(seed: int, n: int = 512, d_in: int = 10, classes: int = 4) -> Batch:
    """Labels from a random linear map of Gaussian features (learnable, not trivially)."""
    g = generator(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, classes, generator=g)
    return x, (x @ w + 0.3 * torch.randn(n, classes, generator=g)).argmax(1)


def images(seed: int, n: int = 256, size: int = 12, classes: int = 4) -> Batch:
    """Single-channel images whose class is which quadrant is brightest."""
    g = generator(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    h = size // 2
    for c, (r, s) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
        x[y == c, :, r:r + h, s:s + h] += 1.0
    return x, y


def tokens(seed: int, n: int = 256, length: int = 8, vocab: int = 24) -> Batch:
    """Token sequences; the label says whether the first token is larger than the last."""
    g = generator(seed)
    t = torch.randint(0, vocab, (n, length), generator=g)
    return t, (t[:, 0] > t[:, -1]).long()


def sequences(seed: int, n: int = 256, length: int = 12) -> Batch:
    """Random walks; the target is a scaled sum of the first feature."""
    g = generator(seed)
    x = torch.randn(n, length, 3, generator=g)
    return x, x[:, :, :1].sum(1) * 0.3


def cycle(data: Batch, size: int, transform: Callable[[int, Batch], Batch] | None = None) -> Callable[[int], Batch]:
    """``batch(i)``: the i-th mini-batch cycling through ``data``; ``transform(i, batch)`` may
    corrupt chosen batches."""
    x, y = data
    count = len(x) // size

    def batch(i: int) -> Batch:
        lo = (i % count) * size
        b = (x[lo:lo + size], y[lo:lo + size])
        return transform(i, b) if transform is not None else b

    return batch


def mlp(seed: int, *, d_in: int = 10, width: int = 32, depth: int = 3, d_out: int = 1,
        act: Callable[[], nn.Module] = nn.ReLU, bias: bool = True, dropout: float = 0.0) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units; layer ``k`` is module ``str(2k)`` (or ``3k``
    with dropout), its activation the next module."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=bias), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = width
    layers.append(nn.Linear(d, d_out, bias=bias))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, pooling, linear head (``batchnorm=False`` drops the BN layers)."""

    def __init__(self, seed: int, *, batchnorm: bool = True, act: Callable[[], nn.Module] = nn.ReLU,
                 depth: int = 2, channels: int = 8) -> None:
        torch.manual_seed(seed)
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for _ in range(depth):
            layers.append(nn.Conv2d(c, channels, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(act())
            c = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class TinyTransformer(nn.Module):
    """Embedding, learned positions, two pre-norm encoder layers, mean-pool head."""

    def __init__(self, seed: int, *, vocab: int = 24, d: int = 32, dropout: float = 0.0) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(t) + self.pos).mean(1))


class QKVAttention(nn.Module):
    """Token classifier with hand-written self-attention: separate ``q_proj``, ``k_proj``,
    ``v_proj`` and ``out_proj`` Linear layers (the layout of Hugging Face BERT/LLaMA blocks), pre-norm,
    then a GELU feed-forward block."""

    def __init__(self, seed: int, *, vocab: int = 24, d: int = 32, heads: int = 4) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        self.ln1 = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.embed(t) + self.pos
        b, n, d = h.shape
        a = self.ln1(h)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(split(self.q_proj(a)), split(self.k_proj(a)), split(self.v_proj(a)))
        h = h + self.out_proj(att.transpose(1, 2).reshape(b, n, d))
        h = h + self.ff(self.ln2(h))
        return self.head(h.mean(1))


class ResidualMLP(nn.Module):
    """Pre-norm residual blocks (LayerNorm, Linear, GELU, Linear)."""

    def __init__(self, seed: int, *, depth: int = 12, d: int = 32) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class LSTMRegressor(nn.Module):
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.lstm = nn.LSTM(3, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class LinearRNN(nn.Module):
    """An Elman RNN with ReLU whose recurrent matrix has spectral radius ``radius``: above 1 the
    backward pass through time multiplies the gradient by it at each of the 12 steps."""

    def __init__(self, seed: int, *, radius: float = 1.6, hidden: int = 16) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.rnn = nn.RNN(3, hidden, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
            self.rnn.weight_hh_l0.copy_(q * radius)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class NormFeatureNet(nn.Module):
    """Bias-free tanh layers, then a feature that divides by the L2 norm of layer ``at``'s output.

    ``sqrt(sum h^2)`` of an exactly-zero row (an all-zero input row: bias-free tanh layers keep it
    zero) is 0 in the forward pass, and its backward is ``h / 0 = NaN``: a finite loss with NaN
    gradients in layers ``0..at`` and finite ones after (docs/design.md, "Where to measure", point 3).
    """

    def __init__(self, seed: int, *, depth: int = 4, at: int = 1, width: int = 32) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.at = at
        self.layers = nn.ModuleList(nn.Linear(10 if i == 0 else width, width, bias=False) for i in range(depth))
        self.head = nn.Linear(width + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        norm = None
        for i, layer in enumerate(self.layers):
            h = torch.tanh(layer(h))
            if i == self.at:
                norm = torch.sqrt((h * h).sum(1, keepdim=True))
        assert norm is not None
        return self.head(torch.cat([h, norm], 1))


class Generator(nn.Module):
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2),
                                 nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SparseBag(nn.Module):
    """A sparse-gradient embedding bag (``sparse=True``) and a dense classifier on top."""

    def __init__(self, seed: int, *, vocab: int = 1000, d: int = 16) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.embed = nn.Embedding(vocab, d, sparse=True)
        self.body = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(t).mean(1))
