"""Healthy real models stay silent under ``auto`` and end bit-for-bit equal to the unwatched run."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from gw_torch_models import mlp, regression_data, same_params  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402


def classification_data(seed: int = 2, n: int = 128, d_in: int = 10, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, classes, generator=g)
    return x, (x @ w).argmax(1)


def run_pair(make, loop, steps: int, **watch_kwargs):
    """Run ``loop`` unwatched and watched from the same seed; return (plain, watched, report)."""
    plain_model, plain_opt, plain_extra = make()
    loop(plain_model, plain_opt, plain_extra, None, steps)
    model, opt, extra = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GradwatchWarning, nothing else either
        w = gradwatch.watch(model, opt, **watch_kwargs)
        loop(model, opt, extra, w, steps)
        report = w.report()
        w.remove()
    return plain_model, model, report


def assert_silent(report, steps: int) -> None:
    assert report.healthy, report.summary()
    assert report.findings == [], report.summary()
    assert report.actions == [], report.summary()
    assert report.steps_measured == steps


def supervised_loop(loss_fn, data):
    def loop(model, opt, extra, w, steps):
        x, y = data
        scheduler = extra.get("scheduler") if extra else None
        for t in range(steps):
            lo = (t * 32) % len(x)
            xb, yb = x[lo:lo + 32], y[lo:lo + 32]
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if w is not None:
                w.record_loss(loss)
            opt.step()
            if scheduler is not None:
                scheduler.step()
    return loop


def test_mlp_relu_adam():
    def make():
        model = mlp(seed=0, depth=4, width=64, d_out=3)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), {}

    loop = supervised_loop(nn.functional.cross_entropy, classification_data())
    plain, watched, report = run_pair(make, loop, 150)
    assert same_params(plain, watched)
    assert_silent(report, 150)
    assert report.history["loss"][-1] < report.history["loss"][0]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_small_cnn_with_batchnorm():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 1, 12, 12, generator=g)
    y = (x[:, 0, :6].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :6].mean((1, 2)) > 0).long()

    def make():
        torch.manual_seed(1)
        model = SmallCNN()
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), {}

    plain, watched, report = run_pair(make, supervised_loop(nn.functional.cross_entropy, (x, y)), 80)
    assert same_params(plain, watched)
    assert_silent(report, 80)
    assert [layer["layer"] for layer in report.layers][:2] == ["features.0", "features.1"]


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 24, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


def test_small_transformer_adamw_with_warmup():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 24, (128, 8), generator=g)
    labels = (tokens[:, 0] > tokens[:, -1]).long()

    def make():
        torch.manual_seed(2)
        model = TinyTransformer()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20))
        return model, opt, {"scheduler": warmup}

    plain, watched, report = run_pair(make, supervised_loop(nn.functional.cross_entropy, (tokens, labels)), 80)
    assert same_params(plain, watched)
    assert_silent(report, 80)


class LSTMRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_lstm():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(96, 12, 3, generator=g)
    y = x[:, :, :1].cumsum(1)[:, -1] * 0.3

    def make():
        torch.manual_seed(3)
        model = LSTMRegressor()
        return model, torch.optim.Adam(model.parameters(), lr=5e-3), {}

    plain, watched, report = run_pair(make, supervised_loop(nn.functional.mse_loss, (x, y)), 60)
    assert same_params(plain, watched)
    assert_silent(report, 60)


def test_frozen_backbone_fine_tune():
    x, y = classification_data(seed=6)

    def make():
        model = mlp(seed=4, depth=4, width=32, d_out=3)
        for p in model[:6].parameters():
            p.requires_grad_(False)
        # The optimizer holds every parameter; the frozen ones never get a gradient.
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), {}

    plain, watched, report = run_pair(make, supervised_loop(nn.functional.cross_entropy, (x, y)), 100)
    assert same_params(plain, watched)
    assert_silent(report, 100)
    frozen = [layer for layer in report.layers if layer["layer"] in ("0", "2", "4")]
    assert frozen and all(layer["grad_norm"] != layer["grad_norm"] for layer in frozen)  # NaN: no grad


class BranchyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 2)
        self.aux_head = nn.Linear(32, 5)  # unused in forward: its grads stay None

    def forward(self, tokens):
        return self.head(self.body(self.embed(tokens).mean(1)))


def test_unused_branch_and_embedding_rows_not_looked_up():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 60, (128, 6), generator=g)  # 940 of 1000 rows are never looked up
    labels = (tokens.float().mean(1) > 30).long()

    def make():
        torch.manual_seed(5)
        model = BranchyModel()
        return model, torch.optim.Adam(model.parameters(), lr=3e-3), {}

    plain, watched, report = run_pair(make, supervised_loop(nn.functional.cross_entropy, (tokens, labels)), 100)
    assert same_params(plain, watched)
    assert_silent(report, 100)


def test_convex_model_that_converges():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(256, 5, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 0.7

    def make():
        torch.manual_seed(6)
        model = nn.Linear(5, 1)
        return model, torch.optim.SGD(model.parameters(), lr=0.1), {}

    def loop(model, opt, extra, w, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if w is not None:
                w.record_loss(loss)
            opt.step()

    plain, watched, report = run_pair(make, loop, 300)
    assert same_params(plain, watched)
    assert_silent(report, 300)
    # The gradients shrank by orders of magnitude (from ~10 at step 0): converging, not vanishing.
    assert report.history["global_norm"][-1] < 1e-4


class ResidualMLP(nn.Module):
    def __init__(self, depth: int = 12, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def test_deep_residual_with_layernorm():
    data = regression_data(seed=9, n=128)

    def make():
        torch.manual_seed(7)
        model = ResidualMLP()
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), {}

    plain, watched, report = run_pair(make, supervised_loop(nn.functional.mse_loss, data), 60)
    assert same_params(plain, watched)
    assert_silent(report, 60)


def test_autocast_with_grad_scaler():
    x, y = classification_data(seed=10)

    def make():
        model = mlp(seed=8, depth=3, width=32, d_out=3)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        return model, opt, {"scaler": torch.amp.GradScaler("cpu", init_scale=2.0**10)}

    def loop(model, opt, extra, w, steps):
        scaler = extra["scaler"]
        for t in range(steps):
            lo = (t * 32) % len(x)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x[lo:lo + 32]), y[lo:lo + 32])
            scaler.scale(loss).backward()
            if w is not None:
                w.record_loss(loss)
            scaler.step(opt)
            scaler.update()

    plain_model, plain_opt, plain_extra = make()
    loop(plain_model, plain_opt, plain_extra, None, 80)
    model, opt, extra = make()
    with gradwatch.watch(model, opt, scaler=extra["scaler"]) as w:
        loop(model, opt, extra, w, 80)
    report = w.report()
    assert same_params(plain_model, model)
    assert_silent(report, 80)
    assert report.skipped_steps == 0
    # The pre-hook sees unscaled gradients: the norms are those of an unscaled loss.
    assert 1e-3 < report.history["global_norm"][0] < 50
