"""The reusable pieces: build_layout, measure, clip_grads / drop_grads, LRScale, Snapshot."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("torch")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gw_torch_models import mlp, regression_data  # noqa: E402
from torch import nn  # noqa: E402

from gradwatch.integrations.torch import (  # noqa: E402
    LRScale,
    Snapshot,
    build_layout,
    clip_grads,
    drop_grads,
    measure,
)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(self.emb(tokens).transpose(1, 2))).relu().transpose(1, 2)
        h, _ = self.lstm(h)
        return self.head(self.norm(h[:, -1])) * self.scale


def test_layout_names_layers_and_roles_follow_named_modules():
    model = Mixed()
    tp = build_layout(model, torch.optim.Adam(model.parameters()))
    lay = tp.layout
    roles = dict(zip(lay.names, lay.roles))
    # named_modules order: the root module's own parameters first, then each submodule's
    assert lay.names[:3] == ("scale", "emb.weight", "conv.weight") and roles["emb.weight"] == "embedding"
    assert roles["conv.weight"] == "weight" and roles["conv.bias"] == "bias"
    assert roles["bn.weight"] == "norm" and roles["bn.bias"] == "norm" and roles["norm.weight"] == "norm"
    assert roles["lstm.weight_ih_l0"] == "weight" and roles["lstm.bias_hh_l0"] == "bias"
    assert roles["scale"] == "other"
    assert dict(zip(lay.names, lay.layers))["lstm.weight_hh_l0"] == "lstm"
    assert dict(zip(lay.names, lay.layers))["scale"] == "scale"
    assert lay.numel == tuple(p.numel() for p in tp.params)
    assert tp.unit_rows[lay.names.index("conv.weight")] and not tp.unit_rows[lay.names.index("emb.weight")]


def test_layout_only_watches_what_the_optimizers_update_and_renames_layers():
    model = Mixed()
    head_only = torch.optim.SGD(model.head.parameters(), lr=0.1)
    tp = build_layout(model, head_only, names={"head": "classifier"})
    assert tp.layout.names == ("head.weight", "head.bias")
    assert tp.layout.layers == ("classifier", "classifier")
    extra = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([{"params": model.head.parameters()}, {"params": [extra]}], lr=0.1)
    tp2 = build_layout(model, opt, names=str.upper)
    assert tp2.layout.names[-1] == "optimizer0.param2" and tp2.layout.layers[0] == "HEAD"
    assert not tp2.stale([opt])
    opt.add_param_group({"params": model.norm.parameters()})
    assert tp2.stale([opt])


def test_tied_weights_are_measured_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    tp = build_layout(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert tp.layout.names == ("0.weight",)


def test_build_layout_rejects_a_model_without_parameters():
    with pytest.raises(ValueError, match="no parameter"):
        build_layout(nn.ReLU())


def _reference(model: nn.Module) -> dict[str, tuple[float, float, float]]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        zero = float((g.reshape(g.shape[0], -1) == 0).all(1).float().mean()) if g.dim() >= 2 else math.nan
        out[name] = (float(g.double().norm()), float(p.detach().double().norm()), zero)
    return out


def test_measure_matches_per_tensor_reference_and_skips_missing_grads():
    model = Mixed()
    tokens = torch.randint(0, 20, (16, 7), generator=torch.Generator().manual_seed(0))
    model(tokens).sum().backward()
    model.conv.weight.grad[2].zero_()  # a dead unit: one output channel with no gradient
    tp = build_layout(model, torch.optim.Adam(model.parameters()))
    stats = measure(tp, step=3, loss=torch.tensor(1.5), lr=0.01)
    ref = _reference(model)
    assert stats.step == 3 and stats.loss == 1.5 and stats.lr == 0.01
    for i, name in enumerate(tp.layout.names):
        if name.startswith("unused"):
            assert not stats.has_grad[i]
            continue
        g, p, zero = ref[name]
        assert stats.has_grad[i]
        assert stats.grad_norm[i] == pytest.approx(g, rel=1e-5)
        assert stats.param_norm[i] == pytest.approx(p, rel=1e-5)
        if tp.unit_rows[i]:
            assert stats.zero_fraction[i] == pytest.approx(zero)
        else:
            assert math.isnan(stats.zero_fraction[i])
    assert stats.zero_fraction[tp.layout.names.index("conv.weight")] == pytest.approx(1 / 6)
    assert stats.finite and stats.nonfinite.sum() == 0


def test_measure_sparse_and_half_precision_gradients():
    emb = nn.Embedding(50, 8, sparse=True)
    lin = nn.Linear(8, 2).to(torch.bfloat16)
    model = nn.ModuleDict({"emb": emb, "lin": lin})
    idx = torch.tensor([[1, 2, 2, 7]])
    lin(emb(idx).to(torch.bfloat16)).float().pow(2).sum().backward()
    tp = build_layout(model)
    stats = measure(tp, step=0)
    ref = _reference(model)
    for i, name in enumerate(tp.layout.names):
        assert stats.grad_norm[i] == pytest.approx(ref[name][0], rel=1e-2)
    assert tp.layout.roles[0] == "embedding" and stats.finite


def test_measure_counts_nonfinite_values_and_divides_by_the_loss_scale():
    model = mlp(depth=2, width=8)
    x, y = regression_data(n=16)
    nn.functional.mse_loss(model(x), y).backward()
    tp = build_layout(model)
    plain = measure(tp, step=0)
    scaled_grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad.mul_(1024.0)
    scaled = measure(tp, step=0, grad_scale=torch.tensor(1024.0))
    np.testing.assert_allclose(scaled.grad_norm, plain.grad_norm, rtol=1e-6)
    for p, g in zip(model.parameters(), scaled_grads):
        p.grad = g
    model[2].weight.grad[0, :3] = float("nan")
    model[0].bias.grad[1] = float("inf")
    bad = measure(tp, step=1)
    assert not bad.finite
    assert bad.nonfinite.tolist() == [0, 1, 3, 0, 0, 0]
    model[2].weight.grad[0, :3] = 1e30  # finite, but the float32 norm overflows
    model[0].bias.grad[1] = 0.0
    big = measure(tp, step=2)
    assert big.finite and big.grad_norm[2] == pytest.approx(math.sqrt(3) * 1e30, rel=1e-4)


def test_clip_grads_equals_clip_grad_norm():
    a = mlp(seed=3)
    x, y = regression_data(n=32)
    nn.functional.mse_loss(a(x), y).backward()
    b = copy.deepcopy(a)
    for p, q in zip(a.parameters(), b.parameters()):
        q.grad = p.grad.clone()
    total = clip_grads(list(a.parameters()), 0.05)
    expected = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    assert torch.equal(total, expected)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_clip_grads_guard_leaves_nonfinite_gradients_alone():
    p = nn.Parameter(torch.ones(3))
    q = nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    q.grad = torch.tensor([3.0, 4.0])
    clip_grads([p, q], 1.0, guard_nonfinite=True)
    assert torch.equal(q.grad, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
], ids=["sgd_momentum", "adam", "adamw"])
def test_dropping_grads_leaves_params_and_optimizer_state_unchanged(make_opt):
    model = mlp(seed=4, depth=2, width=8)
    opt = make_opt(model.parameters())
    x, y = regression_data(n=16)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    drop_grads(model.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    for key, saved in state["state"].items():
        for name, value in saved.items():
            now = after["state"][key][name]
            assert torch.equal(torch.as_tensor(now), torch.as_tensor(value)), name


def test_lr_scale_applies_only_during_the_step():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [nn.Parameter(torch.ones(1))], "lr": 0.2}], lr=0.1)
    scale = LRScale()
    scale.apply(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.05]
    assert scale.effective_lr(opt, 0.25) == 0.025
    scale.apply(opt, 0.25)  # a step that raised: applying again must not compound
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.05]
    scale.restore(opt)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    scale.restore(opt)
    assert scale.effective_lr(opt, 0.25) == 0.025


def test_snapshot_restores_params_and_optimizer_state_in_place():
    model = mlp(seed=5, depth=2, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = regression_data(n=16)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    step()
    snap = Snapshot(list(model.parameters()), [opt])
    assert not snap.taken
    with pytest.raises(RuntimeError, match="before"):
        snap.restore()
    snap.take(1)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    ids = [id(v) for s in opt.state.values() for v in s.values()]
    for _ in range(3):
        step()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    snap.restore()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert [id(v) for s in opt.state.values() for v in s.values()] == ids
    for key, saved in state["state"].items():
        for name, value in saved.items():
            assert torch.equal(torch.as_tensor(opt.state_dict()["state"][key][name]), torch.as_tensor(value))


def test_wrappers_do_not_change_the_names():
    model = mlp(seed=1, depth=1, width=4)
    wrapped = nn.DataParallel(model)  # on the CPU a plain wrapper, with the "module." prefix
    assert next(iter(dict(wrapped.named_parameters()))) == "module.0.weight"
    assert build_layout(wrapped).layout.names == build_layout(model).layout.names == (
        "0.weight", "0.bias", "2.weight", "2.bias")


def test_clip_grads_handles_sparse_gradients():
    emb = nn.Embedding(30, 4, sparse=True)
    lin = nn.Linear(4, 1)
    lin(emb(torch.tensor([[1, 2, 2, 9]]))).pow(2).sum().mul(100).backward()
    dense_emb = emb.weight.grad.to_dense().clone()
    dense_lin = [p.grad.clone() for p in lin.parameters()]
    total = float(torch.sqrt(sum(g.pow(2).sum() for g in [dense_emb, *dense_lin])))
    assert total > 1.0
    returned = clip_grads([emb.weight, *lin.parameters()], 1.0)
    assert float(returned) == pytest.approx(total, rel=1e-5)
    coef = 1.0 / (total + 1e-6)
    assert torch.allclose(emb.weight.grad.to_dense(), dense_emb * coef, rtol=1e-5)
    assert all(torch.allclose(p.grad, g * coef, rtol=1e-5) for p, g in zip(lin.parameters(), dense_lin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_same_shape_tensors_are_reduced_together_with_the_same_results(dtype):
    model = mlp(seed=6, depth=6, width=16).to(dtype)  # five 16x16 weights, six 16-biases: stacked
    x, y = regression_data(n=32)
    nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
    model[4].weight.grad[3].zero_()
    model[4].weight.grad[5].zero_()
    tp = build_layout(model)
    stats = measure(tp, step=0)
    ref = _reference(model)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    for i, name in enumerate(tp.layout.names):
        g, p, zero = ref[name]
        assert stats.grad_norm[i] == pytest.approx(g, rel=rel), name
        assert stats.param_norm[i] == pytest.approx(p, rel=rel), name
        if tp.unit_rows[i]:
            assert stats.zero_fraction[i] == pytest.approx(zero), name
    assert stats.zero_fraction[tp.layout.names.index("4.weight")] >= 2 / 16
    model[6].weight.grad[1, 2] = float("nan")  # inside a stacked group
    bad = measure(tp, step=1)
    assert not bad.finite and bad.nonfinite[tp.layout.names.index("6.weight")] == 1
    assert bad.nonfinite.sum() == 1


def test_unit_streaks_in_numpy_and_on_the_device_agree(monkeypatch):
    """On the CPU the units' zero-gradient streaks are kept in numpy; on an accelerator on the
    device. Both paths, on the same real steps (dead rows, a step with no gradient at all, a
    restart from saved streaks), give the same dead fractions and the same saved streaks."""
    import importlib

    from gradwatch.stats import UNIT_STREAK

    measure_module = importlib.import_module("gradwatch.integrations.torch.measure")  # the package shadows it
    load_unit_streaks, unit_streaks = measure_module.load_unit_streaks, measure_module.unit_streaks

    def run(host: bool) -> tuple[list[np.ndarray], dict[str, list[int]], list[np.ndarray]]:
        monkeypatch.setattr(measure_module, "HOST_UNITS", host)
        model = mlp(seed=3, depth=3, width=16)  # two 16x16 weights: stacked; the rest alone
        with torch.no_grad():
            model[0].bias[:6] = -50.0  # six units of the first layer never fire
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = regression_data(n=64)
        tp = build_layout(model, opt)
        dead = []
        for step in range(UNIT_STREAK + 4):
            opt.zero_grad()
            batch = slice(2 * step, 2 * step + 2)
            loss = nn.functional.mse_loss(model(x[batch]), y[batch]) * (0.0 if step == 3 else 1.0)
            loss.backward()  # step 3: a gradient of exactly zero everywhere, streaks held
            dead.append(measure(tp, step=step).dead_fraction)
            opt.step()
        saved = unit_streaks(tp)
        resumed = build_layout(model, opt)
        load_unit_streaks(resumed, saved)
        later = []
        for step in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[:2]), y[:2]).backward()
            later.append(measure(resumed, step=step).dead_fraction)
        return dead, saved, later

    host, device = run(True), run(False)
    np.testing.assert_array_equal(np.array(host[0]), np.array(device[0]))
    assert host[1] == device[1]
    np.testing.assert_array_equal(np.array(host[2]), np.array(device[2]))
    first = build_layout(mlp(seed=3, depth=3, width=16)).layout.names.index("0.weight")
    assert host[0][UNIT_STREAK - 1][first] == 0.0  # the zero step did not count
    assert host[0][UNIT_STREAK][first] >= 6 / 16
    assert host[2][0][first] >= 6 / 16  # the resumed run remembers


@pytest.mark.parametrize("host", [True, False])
def test_a_unit_that_comes_back_after_a_long_streak_raises_the_bar_for_its_layer(monkeypatch, host):
    """Batches of one sample: two ReLU units fire on one sample in twelve (off eleven steps in a
    row, then back), two never fire (bias -50), one always does. Once the rare units have come back
    from a streak of eleven, only units off for longer count as dead: 2 of 5, not 4 of 5."""
    import importlib

    from gradwatch.stats import UNIT_STREAK

    measure_module = importlib.import_module("gradwatch.integrations.torch.measure")
    monkeypatch.setattr(measure_module, "HOST_UNITS", host)
    model = nn.Sequential(nn.Linear(1, 5), nn.ReLU(), nn.Linear(5, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [1.0], [0.0], [0.0], [0.0]]))
        model[0].bias.copy_(torch.tensor([-0.5, -0.5, -50.0, -50.0, 1.0]))
        model[2].weight.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tp = build_layout(model, opt)
    hidden = tp.layout.names.index("0.weight")
    dead = []
    for step in range(48):
        opt.zero_grad()
        x = torch.tensor([[1.0 if step % 12 == 11 else 0.2]])
        nn.functional.mse_loss(model(x), torch.full((1, 1), 5.0)).backward()
        dead.append(measure(tp, step=step).dead_fraction[hidden])
        opt.step()
    assert dead[UNIT_STREAK - 1] == pytest.approx(4 / 5)  # before any unit came back: 4 of 5 off for 10 steps
    assert dead[11] == pytest.approx(2 / 5)  # the rare units fire
    assert max(dead[12:]) == pytest.approx(2 / 5) and min(dead[12:]) == pytest.approx(2 / 5)
