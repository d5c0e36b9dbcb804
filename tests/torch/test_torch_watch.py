"""The handle: remove, context manager, strict, state_dict, every, several optimizers, no
references to gradients, argument checks."""

from __future__ import annotations

import gc
import io
import json
import warnings
import weakref

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from gw_torch_models import mlp, regression_data, same_params, train  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.integrations.torch import Watch  # noqa: E402


def setup(seed: int = 20):
    model = mlp(seed=seed, depth=3, width=16)
    return model, torch.optim.Adam(model.parameters(), lr=3e-3)


def test_gradwatch_watch_is_the_torch_adapter():
    model, opt = setup()
    w = gradwatch.watch(model, opt)
    assert isinstance(w, Watch) and isinstance(w.monitor, gradwatch.Monitor)
    w.remove()


def test_remove_is_idempotent_and_detaches_every_hook():
    model, opt = setup()
    w = gradwatch.watch(model, opt)
    train(model, opt, 3, watch=w)
    w.remove()
    w.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    train(model, opt, 3, watch=w)
    assert w.report().steps_measured == 3


def test_context_manager_removes_on_exit_and_report_survives():
    model, opt = setup()
    with gradwatch.watch(model, opt) as w:
        train(model, opt, 4, watch=w)
    assert not opt._optimizer_step_pre_hooks
    report = w.report()
    assert report.framework == "torch" and report.steps_measured == 4 and report.healthy


def test_an_internal_error_warns_once_and_training_goes_on(monkeypatch):
    plain, plain_opt = setup()
    train(plain, plain_opt, 12)
    model, opt = setup()
    w = gradwatch.watch(model, opt)

    def broken(*args, **kwargs):
        raise RuntimeError("detector exploded")

    train(model, opt, 4, watch=w)
    monkeypatch.setattr(w.monitor, "observe", broken)
    with pytest.warns(gradwatch.GradwatchWarning, match="detector exploded") as record:
        train(model, opt, 8, watch=w)
    assert len([r for r in record if issubclass(r.category, gradwatch.GradwatchWarning)]) == 1
    assert same_params(plain, model)
    assert w.report().steps_measured == 4
    w.remove()


def test_strict_raises_internal_errors(monkeypatch):
    model, opt = setup()
    w = gradwatch.watch(model, opt, strict=True)

    def broken(*args, **kwargs):
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(w.monitor, "observe", broken)
    with pytest.raises(RuntimeError, match="detector exploded"):
        train(model, opt, 1, watch=w)
    w.remove()


def test_no_reference_to_gradients_is_held_between_steps():
    model, opt = setup()
    with gradwatch.watch(model, opt, rollback_every=2) as w:
        train(model, opt, 3, watch=w)
        refs = [weakref.ref(p.grad) for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(r() is None for r in refs)


def test_state_dict_round_trip_resumes_the_same_run():
    x, y = regression_data(n=64)
    data = (x, y * 3)
    model, opt = setup(seed=21)
    with gradwatch.watch(model, opt) as w_full:
        train(model, opt, 40, watch=w_full, data=data)
    full = w_full.monitor.state_dict()

    model, opt = setup(seed=21)
    w = gradwatch.watch(model, opt)
    train(model, opt, 25, watch=w, data=data)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradwatch": w.state_dict()}, buffer)
    w.remove()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model2, opt2 = setup(seed=99)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    w2 = gradwatch.watch(model2, opt2)
    w2.load_state_dict(saved["gradwatch"])
    assert w2.step == 25
    train(model2, opt2, 15, watch=w2, data=data)
    assert json.dumps(w2.monitor.state_dict(), sort_keys=True) == json.dumps(full, sort_keys=True)
    assert w2.params.layout is w2.monitor.layout
    w2.remove()
    with pytest.raises(ValueError, match="state_dict"):
        w2.load_state_dict({"nope": 1})


def test_every_n_measures_one_step_in_n_and_stays_bit_for_bit():
    plain, plain_opt = setup()
    train(plain, plain_opt, 20)
    model, opt = setup()
    with gradwatch.watch(model, opt, every=3) as w:
        train(model, opt, 20, watch=w)
    report = w.report()
    assert report.steps_measured == 7 and report.history["steps"] == list(range(0, 20, 3))
    assert same_params(plain, model)


class TwoOptimizerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(22)
        self.embed = nn.Embedding(100, 8, sparse=True)
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens).mean(1))))


def test_several_optimizers_and_param_groups_are_measured_once_per_step():
    model = TwoOptimizerModel()
    sparse_opt = torch.optim.SparseAdam(list(model.embed.parameters()), lr=1e-2)
    dense_opt = torch.optim.Adam([
        {"params": model.body.parameters()},
        {"params": model.head.parameters(), "lr": 1e-3},
    ], lr=3e-3)
    g = torch.Generator().manual_seed(23)
    tokens = torch.randint(0, 100, (64, 5), generator=g)
    y = tokens.float().mean(1, keepdim=True) / 50
    with gradwatch.watch(model, [sparse_opt, dense_opt]) as w:
        for _ in range(30):
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss = nn.functional.mse_loss(model(tokens), y)
            loss.backward()
            w.record_loss(loss)
            sparse_opt.step()
            dense_opt.step()
    report = w.report()
    assert report.steps_measured == 30 and w.step == 30
    assert report.healthy and report.actions == [], report.summary()
    assert w.params.layout.names == ("embed.weight", "body.weight", "body.bias", "head.weight", "head.bias")


def test_a_new_param_group_rebuilds_the_layout():
    model, opt = setup()
    extra = nn.Linear(16, 1)
    with gradwatch.watch(model, opt) as w:
        train(model, opt, 3, watch=w)
        first = w.params.layout
        opt.add_param_group({"params": extra.parameters()})
        train(model, opt, 3, watch=w)
        assert w.params.layout is not first and len(w.params.layout) == len(first) + 2
    assert w.report().steps_measured == 6


def test_record_loss_averages_micro_batches_without_a_sync():
    model, opt = setup()
    x, y = regression_data(n=64)
    with gradwatch.watch(model, opt) as w:
        opt.zero_grad()
        losses = []
        for half in (slice(0, 32), slice(32, 64)):
            loss = nn.functional.mse_loss(model(x[half]), y[half]) / 2
            loss.backward()
            w.record_loss(loss)
            losses.append(float(loss.detach()))
        opt.step()
    assert w.report().history["loss"][0] == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_arguments_are_checked():
    model, opt = setup()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gradwatch.watch(model, "adam")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gradwatch.watch(model, 3)
    with pytest.raises(ValueError, match="every must be"):
        gradwatch.watch(model, opt, every=0)
    with pytest.raises(ValueError, match="rollback_every"):
        gradwatch.watch(model, opt, rollback_every=0)
    with pytest.raises(ValueError, match="param_norm_every"):
        gradwatch.watch(model, opt, param_norm_every=-1)
    with pytest.raises(ValueError, match="policy"):
        gradwatch.watch(model, opt, policy="sometimes")
    with pytest.raises(TypeError, match="GradScaler"):
        gradwatch.watch(model, opt, scaler=object())
    assert not opt._optimizer_step_pre_hooks


def test_parameter_norms_are_refreshed_every_n_measured_steps():
    model, opt = setup()
    seen = []
    with gradwatch.watch(model, opt, param_norm_every=4) as w:
        original = w.monitor.observe

        def spy(stats, **kwargs):
            seen.append(stats.param_norm.copy())
            return original(stats, **kwargs)

        w.monitor.observe = spy
        train(model, opt, 29, watch=w)
    # every step for the first 20 measured steps (the absolute rules need consecutive ones while a
    # run may be broken from its start), then every 4th
    changed = [i for i in range(20, 29) if not (seen[i] == seen[i - 1]).all()]
    assert changed == [20, 24, 28]
    assert all(not (seen[i] == seen[i - 1]).all() for i in range(1, 20))
    with gradwatch.watch(model, opt, param_norm_every=0) as w:
        train(model, opt, 2, watch=w)
    assert all(layer["param_norm"] != layer["param_norm"] for layer in w.report().layers)  # NaN


def test_no_warning_on_a_healthy_run():
    model, opt = setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradwatch.watch(model, opt) as w:
            train(model, opt, 10, watch=w)


def test_without_pytorch_the_error_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import gradwatch\n"
        "try:\n"
        "    gradwatch.watch\n"
        "except gradwatch.MissingExtraError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'gradwatch[torch]'" in out.stdout, out.stdout + out.stderr
