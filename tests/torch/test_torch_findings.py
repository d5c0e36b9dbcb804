"""Each finding kind on a real PyTorch model, and what ``auto`` does about it."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from gw_torch_models import first_nonfinite, mlp, regression_data, same_params, train  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402


def sigmoid_mlp(depth: int = 10, width: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    d = 10
    for i in range(depth):
        mods[f"fc{i + 1}"] = nn.Linear(d, width)
        mods[f"act{i + 1}"] = nn.Sigmoid()
        d = width
    mods["out"] = nn.Linear(d, 3)
    return nn.Sequential(mods)


def classes(seed: int = 2, n: int = 128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, (x @ torch.randn(10, 3, generator=g)).argmax(1)


def test_vanishing_in_a_deep_sigmoid_mlp_recommends_batchnorm_by_module_path():
    model = sigmoid_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as w:
        train(model, opt, 30, watch=w, data=classes(), loss_fn=nn.functional.cross_entropy)
    report = w.report()
    vanishing = [f for f in report.findings if f.kind == "vanishing"]
    assert vanishing and vanishing[0].severity == "warning"
    assert vanishing[0].layers[0] == "fc1" and set(vanishing[0].layers) <= {f"fc{i}" for i in range(1, 6)}
    recs = [a for a in report.actions if a.kind == "recommend_batchnorm"]
    assert len(recs) == 1 and recs[0].params["insert_after"][0] == "fc1"
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())  # advice only
    # Nothing else was done: the run is the unwatched run.
    plain = sigmoid_mlp()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    train(plain, plain_opt, 30, data=classes(), loss_fn=nn.functional.cross_entropy)
    assert same_params(plain, model) and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dead_units_name_the_layer_whose_relus_never_fire():
    model = mlp(seed=1, depth=3, width=32)
    with torch.no_grad():
        model[2].bias[:28].fill_(-50.0)  # 28 of the 32 ReLUs of the second hidden layer never fire
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt) as w:
        train(model, opt, 20, watch=w)
    dead = [f for f in w.report().findings if f.kind == "dead_units"]
    # most of the layer is gone (>= 80%): a warning from the first window on, whatever the loss does
    assert len(dead) == 1 and dead[0].severity == "warning" and dead[0].step == 9
    assert dead[0].layers == ("2",)
    assert dead[0].evidence["dead_fraction"]["2"] == 0.875
    assert w.report().actions == []


def test_loss_spike_on_a_corrupted_batch():
    model = mlp(seed=2, depth=2, width=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = regression_data(n=128)
    bad_y = y * 30.0
    with gradwatch.watch(model, opt, policy="observe") as w:
        for t in range(60):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), bad_y if t == 45 else y)
            loss.backward()
            w.record_loss(loss)
            opt.step()
    spikes = [f for f in w.report().findings if f.kind == "loss_spike"]
    assert [f.step for f in spikes] == [45]


class NormalisedFirstLayer(nn.Module):
    """``h / ||h||`` written as ``where(n > 0, h / sqrt(n), 0)``: finite for an all-zero row, but
    its gradient there is NaN (the derivative of sqrt at 0 times 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(10, 16, bias=False)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h = self.embed(x)
        n = (h * h).sum(1, keepdim=True)
        h = torch.where(n > 0, h / n.sqrt(), torch.zeros_like(h))
        return self.head(self.body(h))


def nan_batches(t: int, x: torch.Tensor) -> torch.Tensor:
    if t % 15 == 7:  # now and then an all-zero input row
        x = x.clone()
        x[3] = 0.0
    return x


def run_nan_model(policy: str, steps: int = 45):
    model = NormalisedFirstLayer()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = regression_data(n=64)
    w = gradwatch.watch(model, opt, policy=policy)
    losses = []
    for t in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(nan_batches(t, x)), y)
        loss.backward()
        w.record_loss(loss)
        opt.step()
        losses.append(float(loss.detach()))
    w.remove()
    return model, losses, w.report()


def test_nan_gradient_behind_a_finite_loss_is_skipped_and_located():
    model, losses, report = run_nan_model("auto")
    assert all(math.isfinite(v) for v in losses)  # the loss never shows it
    nonfinite = [f for f in report.findings if f.kind == "nonfinite"]
    assert nonfinite and nonfinite[0].step == 7 and nonfinite[0].severity == "error"
    assert nonfinite[0].evidence["origin"] == "embed"
    assert nonfinite[0].evidence["finite_layers"] == ["body.0", "head"]
    assert nonfinite[0].evidence["loss_finite"] is True
    skipped = [a.step for a in report.actions if a.kind == "skip_step"]
    assert skipped == [7, 22, 37]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    # Unwatched (or observed) the first NaN gradient poisons the first layer for good, and the
    # loss still looks fine: the NaN rows are masked to zero and the model ignores its input.
    observed, observed_losses, observed_report = run_nan_model("observe")
    assert first_nonfinite(observed_losses) is None
    assert torch.isnan(observed.embed.weight).all()
    assert observed_report.actions == [] and not observed_report.healthy
    assert losses[-1] < observed_losses[-1]


def explode_setup():
    model = mlp(seed=0, act=nn.Tanh, depth=4, width=64)
    return model, torch.optim.SGD(model.parameters(), lr=0.3)


def test_exploding_lr_too_high_is_rescued_by_rollback_and_a_smaller_lr():
    plain, plain_opt = explode_setup()
    plain_losses = train(plain, plain_opt, 120)
    assert first_nonfinite(plain_losses) is not None  # unwatched: diverges to NaN

    model, opt = explode_setup()
    with gradwatch.watch(model, opt) as w:  # default rollback_every="auto": snapshots are kept
        losses = train(model, opt, 120, watch=w)
    report = w.report()
    assert "exploding" in report.kinds("warning")
    # the step size is the cause: the last healthy weights come back and the LR is cut
    assert report.action_counts.get("rollback", 0) >= 1 and report.action_counts.get("lr_decay", 0) >= 1
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    assert w.lr_factor < 1.0
    assert opt.param_groups[0]["lr"] == 0.3  # the user's own LR is left as set between steps


def test_observe_never_changes_a_diverging_run():
    plain, plain_opt = explode_setup()
    train(plain, plain_opt, 60)
    model, opt = explode_setup()
    with gradwatch.watch(model, opt, policy="observe") as w:
        train(model, opt, 60, watch=w)
    report = w.report()
    assert not report.healthy and report.actions == []
    assert {"exploding", "nonfinite"} <= set(report.kinds())
    assert same_params(plain, model)  # bit for bit, NaN included
