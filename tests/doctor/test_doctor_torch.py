"""The doctor on real PyTorch models (CPU, small): each cause from a real run, each repair applied to
a copy that trains and whose layers are what the snippet says, the fast path, the budget."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import gw_doctor_factories as f  # noqa: E402
from torch import nn  # noqa: E402

from gradwatch.check import as_spec  # noqa: E402
from gradwatch.doctor import (  # noqa: E402
    Candidate,
    ClipNorm,
    InsertNorm,
    Reinit,
    ScaleLR,
    SwapActivation,
    SwitchOptimizer,
    run_doctor,
)
from gradwatch.doctor.run import diagnose_baseline  # noqa: E402
from gradwatch.integrations.torch.doctor import TorchDoctor  # noqa: E402

STEPS = 30


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter(setup, steps: int = STEPS) -> TorchDoctor:
    doctor = TorchDoctor(as_spec(setup), seed=0, steps=steps)
    doctor.describe()
    return doctor


def causes_of(setup, steps: int = STEPS) -> dict:
    doctor = adapter(setup, steps)
    _, found = diagnose_baseline(doctor.description, doctor.trial(None, steps=steps))
    return {c.kind: c for c in found}


# -- describe ------------------------------------------------------------------------------------


def test_describe_reads_layers_activations_and_optimizer():
    d = adapter(f.torch_sigmoid()).description
    assert [layer.name for layer in d.weight_layers] == [str(i) for i in range(0, 17, 2)]
    first = d.layer("0")
    assert (first.activation, first.activation_site, first.fan_in, first.fan_out) == ("sigmoid", "module:1", 16, 32)
    assert 0.0 < first.slope <= 1.0 and 0.0 <= first.saturation < 0.2
    assert d.layer("16").output and d.layer("16").activation == "linear"
    assert (d.optimizer, d.lr, d.adaptive, d.has_norm) == ("SGD", pytest.approx(0.1), False, False)


def test_activations_called_in_forward_are_measured_but_not_swappable():
    doctor = adapter(f.torch_functional_tanh())
    fc1 = doctor.description.layer("fc1")
    assert fc1.activation == "tanh" and fc1.activation_site.startswith("function:Net.forward")
    assert not fc1.rewritable_activation and math.isfinite(fc1.slope)
    reason, code = doctor.applicable(Candidate("tanh->relu", (SwapActivation(("fc1", "fc2"), "relu", "he"),)))
    assert "called inside Net.forward" in reason
    assert "-     x = torch.tanh(self.fc1(x))" in code and "+     x = torch.nn.functional.relu(self.fc1(x))" in code
    assert "nn.init.kaiming_normal_(model.fc1.weight, nonlinearity='relu')" in code
    assert doctor.applicable(Candidate("norm", (InsertNorm(("fc1",)),))) == ("", "")  # wrapping fc1 still works


# -- causes from real runs -----------------------------------------------------------------------


def test_deep_sigmoid_causes():
    causes = causes_of(f.torch_sigmoid())
    assert {"saturating_activation", "no_normalisation", "sgd_across_depth"} <= set(causes)
    assert causes["saturating_activation"].layers == tuple(str(i) for i in range(0, 15, 2))
    assert causes["sgd_across_depth"].evidence["span"] > 1e3


def test_tiny_init_is_an_init_scale_cause():
    cause = causes_of(f.torch_tiny_init_tanh())["init_scale"]
    assert set(cause.layers) >= {"0", "2", "4", "6", "8"}
    assert cause.evidence["std_ratio"]["0"] < 0.3


def test_dead_relus():
    cause = causes_of(f.torch_dead())["dying_relu"]
    assert "0" in cause.layers and cause.evidence["bias_mean"]["0"] == pytest.approx(-4.0)


def test_lr_too_high_and_the_clip_level():
    causes = causes_of(f.torch_lr_too_high())
    assert causes["lr_too_high"].evidence["factor"] <= 0.1
    assert causes["unclipped_norm"].evidence["level"] > 0


def test_lr_too_low():
    cause = causes_of(f.torch_lr_too_low())["lr_too_low"]
    assert cause.evidence["factor"] >= 10


def test_exploding_recurrence():
    causes = causes_of(f.torch_rnn(gain=5.0))
    assert causes["init_scale"].evidence["recurrent_gain"]["rnn"] > 4
    assert "unclipped_norm" in causes or "lr_too_high" in causes


# -- repairs: the copy is rewritten, trains, and is what the snippet says -------------------------


def _trial(doctor: TorchDoctor, *changes, steps: int = STEPS):
    trial = doctor.trial(Candidate("c", tuple(changes)), steps=steps)
    assert not trial.error, trial.error
    assert len(trial.losses) == steps and all(math.isfinite(v) for v in trial.losses)
    return trial


def test_swap_activation_with_its_init():
    doctor = adapter(f.torch_sigmoid())
    hidden = tuple(str(i) for i in range(0, 15, 2))
    trial = _trial(doctor, SwapActivation(hidden, "relu", "he"))
    model = trial.model
    assert all(isinstance(model[i + 1], nn.ReLU) for i in range(0, 15, 2)) and isinstance(model[16], nn.Linear)
    assert float(model[2].weight.detach().std()) == pytest.approx(math.sqrt(2 / 32), rel=0.5)
    assert "- model[1] = nn.Sigmoid()" in trial.snippet and "+ model[1] = nn.ReLU()" in trial.snippet
    assert trial.final_loss < trial.losses[0]


def test_insert_norm_wraps_the_layer_and_the_optimizer_holds_it():
    doctor = adapter(f.torch_sigmoid())
    trial = _trial(doctor, InsertNorm(("0", "2")))
    model, optimizer = trial.model, trial.optimizer
    assert isinstance(model[0], nn.Sequential) and isinstance(model[0][1], nn.BatchNorm1d)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model[0][1].parameters())
    assert ("+ model[0] = nn.Sequential(nn.Linear(in_features=16, out_features=32, bias=True), nn.BatchNorm1d(32"
            in trial.snippet)
    assert {"0.0", "0.1", "2.0", "2.1"} <= {layer["layer"] for layer in trial.report.layers}


def test_insert_norm_picks_the_norm_for_convolutions_and_sequences():
    conv = adapter(f.torch_conv())
    assert isinstance(_trial(conv, InsertNorm(("0",))).model[0][1], nn.BatchNorm2d)
    seq_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16, 4))
    setup = (seq_model, torch.optim.SGD(seq_model.parameters(), lr=0.1), f.torch_batches(d=8, seq=8), nn.CrossEntropyLoss())
    seq = adapter(setup)
    assert seq.description.layer("0").sequence
    assert isinstance(_trial(seq, InsertNorm(("0",))).model[0][1], nn.LayerNorm)


def test_reinit_and_orthogonal_recurrence():
    doctor = adapter(f.torch_tiny_init_tanh())
    model = _trial(doctor, Reinit(("0", "2"), "glorot")).model
    assert float(model[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / (16 + 32)), rel=0.3)
    assert float(model[0].bias.detach().abs().max()) < 0.5
    rnn = adapter(f.torch_rnn()).build(Candidate("c", (Reinit(("rnn",), "orthogonal"),)))[0].rnn
    w = rnn.weight_hh_l0.detach()
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-4)


def test_lr_optimizer_and_clip_changes():
    doctor = adapter(f.torch_lr_too_high())
    _, optimizer, clip = doctor.build(Candidate("c", (ScaleLR(0.01),)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1) and clip is None
    _, adam, _ = doctor.build(Candidate("c", (SwitchOptimizer("adam", 1e-3),)))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == pytest.approx(1e-3)
    trial = _trial(doctor, ClipNorm(0.5), ScaleLR(0.01))
    norms = [v for v in trial.report.history["global_norm"] if math.isfinite(v)]
    assert max(norms) <= 0.5 * 1.001  # gradwatch measures at the optimizer step, after the clip
    assert "+ torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)" in trial.snippet


def test_the_factory_model_is_never_trained():
    model, opt, batches, loss_fn = f.torch_sigmoid()
    before = [p.detach().clone() for p in model.parameters()]
    result = run_doctor((model, opt, batches, loss_fn), steps=20, max_trials=1, pairs=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result.trials[0].model is not model


# -- the whole doctor ----------------------------------------------------------------------------


def test_deep_sigmoid_is_repaired_and_the_repaired_model_is_returned():
    result = run_doctor(f.torch_sigmoid, steps=40, max_trials=4)
    best = result.best
    assert best is not None and best.healthy and best.final_loss < result.baseline.final_loss
    assert best.candidate.because[0] in ("saturating_activation", "no_normalisation", "sgd_across_depth")
    assert not any(isinstance(m, nn.Sigmoid) for m in best.model.modules()) or "BatchNorm" in best.name
    assert result.fails("warning") and "Recommended:" in result.summary()
    assert result.baseline.report.kinds("warning") == ["vanishing"]


def test_healthy_model_fast_path():
    result = run_doctor(f.torch_healthy, steps=30)
    assert result.nothing_to_repair and [t.name for t in result.trials] == ["baseline"]
    assert not result.fails() and "Nothing to repair" in result.summary()


def test_budget_and_max_trials_are_kept():
    result = run_doctor(f.torch_sigmoid, steps=20, budget_s=1e-3)
    assert all(t.not_tried.startswith("time budget") for t in result.trials if not t.is_baseline)
    result = run_doctor(f.torch_sigmoid, steps=20, max_trials=1, pairs=False)
    assert sum(1 for t in result.trials if not t.is_baseline and not t.not_tried) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps >= 10"):
        run_doctor(f.torch_sigmoid, steps=5)
    with pytest.raises(ValueError, match="budget_s must be > 0"):
        run_doctor(f.torch_sigmoid, budget_s=0)
