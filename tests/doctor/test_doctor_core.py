"""The doctor's framework-free core: measurements, causes, candidates, early stopping, ranking and
the result, on descriptions and numbers built here (numpy only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import gradwatch.doctor as doctor
from gradwatch.doctor import (
    Candidate,
    Cause,
    ClipNorm,
    DoctorResult,
    EarlyStop,
    InsertNorm,
    LayerInfo,
    ModelDescription,
    Reinit,
    ScaleLR,
    SwapActivation,
    SwitchOptimizer,
    TrialResult,
    activation_stats,
    combine,
    diagnose,
    expected_std,
    propose,
    rank,
    symptoms_of,
)
from gradwatch.doctor.causes import INIT_HIGH, INIT_LOW, UPDATE_HIGH, UPDATE_LOW, loss_drop
from gradwatch.doctor.trials import loss_reached
from gradwatch.report import Report


def test_public_api_is_pinned():
    assert sorted(doctor.__all__) == sorted([
        "CAUSE_KINDS", "DEFAULT_DOCTOR_STEPS", "Candidate", "Cause", "Change", "ClipNorm", "DoctorAdapter",
        "DoctorResult", "EarlyStop", "InsertNorm", "LayerInfo", "ModelDescription", "Reinit", "ScaleLR",
        "SwapActivation", "SwitchOptimizer", "TrialProgress", "TrialResult", "activation_stats", "combine",
        "diagnose", "doctor_target", "expected_std", "propose", "rank", "run_doctor", "symptoms_of",
    ])
    for name in doctor.__all__:
        assert hasattr(doctor, name), name


def test_importing_the_doctor_imports_no_framework():
    code = ("import sys, gradwatch, gradwatch.doctor, gradwatch.doctor.html, gradwatch.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'keras', 'tensorflow', 'jax', 'matplotlib', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- measurements --------------------------------------------------------------------------------


def test_saturation_is_the_share_in_the_flat_tails():
    z = np.array([-10.0, -4.0, 0.0, 0.5, 4.0, 10.0])
    sigmoid = activation_stats(z, "sigmoid")
    assert sigmoid["saturation"] == pytest.approx(4 / 6)  # |z| > 3.64
    tanh = activation_stats(np.array([-3.0, -1.0, 0.0, 1.0, 3.0]), "tanh")
    assert tanh["saturation"] == pytest.approx(2 / 5)  # |z| > 1.82
    assert activation_stats(np.zeros(10), "sigmoid")["slope"] == pytest.approx(1.0)


def test_dead_units_are_counted_on_the_unit_axis():
    z = np.ones((8, 4, 3, 3))  # NCHW: channel 0 never positive
    z[:, 0] = -1.0
    assert activation_stats(z, "relu", unit_axis=1)["dead"] == pytest.approx(0.25)
    dense = np.ones((16, 5))
    dense[:, [1, 2]] = -2.0
    assert activation_stats(dense, "relu")["dead"] == pytest.approx(0.4)
    assert math.isnan(activation_stats(dense, "sigmoid")["dead"])


def test_expected_std_follows_the_activation():
    assert expected_std("relu", fan_in=50, fan_out=10) == pytest.approx(math.sqrt(2 / 50))
    assert expected_std("tanh", fan_in=30, fan_out=10) == pytest.approx(math.sqrt(2 / 40))
    assert expected_std("selu", fan_in=25, fan_out=10) == pytest.approx(0.2)
    assert math.isnan(expected_std("relu", fan_in=0, fan_out=1))


# -- causes --------------------------------------------------------------------------------------


def _stack(n: int = 6, activation: str = "sigmoid", std: float | None = None, **extra) -> ModelDescription:
    layers = []
    for i in range(n):
        want = expected_std(activation, fan_in=32, fan_out=32)
        layers.append(LayerInfo(f"fc{i}", "dense", "Linear", 32, 32, std if std is not None else want,
                                activation=activation, activation_site=f"module:act{i}", slope=0.9))
    layers[-1].output = True
    layers[-1].activation = "linear"
    return ModelDescription("torch", "Sequential", layers, "SGD", lr=0.1, **extra)


def test_no_symptom_no_cause():
    assert diagnose(_stack(8, std=0.001), symptoms=()) == []


def test_saturating_activation_names_the_hidden_layers_and_the_bound():
    causes = {c.kind: c for c in diagnose(_stack(8), symptoms=("vanishing",))}
    cause = causes["saturating_activation"]
    assert cause.layers == tuple(f"fc{i}" for i in range(7))  # not the output layer
    assert cause.evidence["backward_gain_bound"] == pytest.approx((0.25 * 0.9) ** 7)
    assert "no_normalisation" in causes


def test_tanh_with_a_healthy_slope_is_not_blamed():
    model = _stack(6, "tanh")
    assert "saturating_activation" not in {c.kind for c in diagnose(model, symptoms=("vanishing",))}
    model.layers[2].saturation = 0.5  # but a saturated one is
    assert "saturating_activation" in {c.kind for c in diagnose(model, symptoms=("exploding",))}


@pytest.mark.parametrize("scale", [INIT_LOW / 3, INIT_HIGH * 3])
def test_init_scale_outside_the_bounds(scale):
    want = expected_std("relu", fan_in=32, fan_out=32)
    cause = next(c for c in diagnose(_stack(3, "relu", std=want * scale), symptoms=("stalled",)) if c.kind == "init_scale")
    assert cause.layers == ("fc0", "fc1", "fc2")  # the linear output layer is judged by LeCun: off too
    assert cause.evidence["std_ratio"]["fc0"] == pytest.approx(scale)


def test_recurrent_gain_is_an_init_cause():
    model = ModelDescription("torch", "Net", [LayerInfo("rnn", "recurrent", "RNN", 8, 64, 0.1, recurrent_gain=3.9,
                                                        activation="relu"),
                                              LayerInfo("head", "dense", "Linear", 64, 4, 0.1, output=True)], "SGD")
    cause = next(c for c in diagnose(model, symptoms=("exploding",)) if c.kind == "init_scale")
    assert cause.layers == ("rnn",) and cause.evidence["recurrent_gain"] == {"rnn": 3.9}
    assert [c.changes for c in propose([cause], model)] == [(Reinit(("rnn",), "orthogonal"),)]


def test_dying_relu_from_the_finding_and_the_bias():
    model = _stack(4, "relu")
    model.layers[1].bias_mean = -4.0
    cause = next(c for c in diagnose(model, symptoms=("dead_units",), dead_layers=("fc1", "ghost")) if c.kind == "dying_relu")
    assert cause.layers == ("fc1",)
    assert cause.evidence["bias_mean"] == {"fc1": -4.0} and "biases start negative" in cause.message


def test_dead_units_after_first_updates_as_large_as_the_weights_try_the_lr_first():
    """Adam at LR 0.3 on a small ReLU net: the units die because the first steps are too large.
    The LR is the root cause; re-initialising the dead layers first looks good for a short trial
    and collapses again over a full run."""
    model = _stack(4, "relu")
    causes = diagnose(model, symptoms=("dead_units",), dead_layers=("fc1",), update_ratios={"fc0": 0.9, "fc1": 2.5})
    assert [c.kind for c in causes][:2] == ["lr_too_high", "dying_relu"]
    model.layers[1].bias_mean = -4.0  # dead units with sane steps: the bias is the cause
    assert [c.kind for c in diagnose(model, symptoms=("dead_units",), dead_layers=("fc1",))][0] == "dying_relu"


def test_sgd_across_depth_needs_plain_sgd_and_three_decades():
    norms = {"fc0": 1e-7, "fc5": 0.3}
    assert "sgd_across_depth" in {c.kind for c in diagnose(_stack(6), symptoms=("vanishing",), grad_norms=norms)}
    adam = _stack(6, adaptive=True)
    assert "sgd_across_depth" not in {c.kind for c in diagnose(adam, symptoms=("vanishing",), grad_norms=norms)}
    close = {"fc0": 1e-2, "fc5": 0.3}
    assert "sgd_across_depth" not in {c.kind for c in diagnose(_stack(6), symptoms=("vanishing",), grad_norms=close)}


def test_lr_causes_from_the_first_updates():
    model = _stack(3, "relu")
    high = next(c for c in diagnose(model, symptoms=("exploding",), update_ratios={"fc0": 0.5, "fc1": UPDATE_HIGH / 2})
                if c.kind == "lr_too_high")
    assert high.layers == ("fc0",) and high.evidence["factor"] == pytest.approx(0.01)
    low = next(c for c in diagnose(model, symptoms=("stalled",), update_ratios={"fc0": 1e-7, "fc1": UPDATE_LOW / 10})
               if c.kind == "lr_too_low")
    assert low.evidence["factor"] == pytest.approx(100.0)  # the most-moving layer, 1e-5, brought to 1e-3
    assert not [c for c in diagnose(model, symptoms=("vanishing",), update_ratios={"fc0": 1e-7}) if c.kind == "lr_too_low"]


def test_unclipped_norm_level_comes_from_the_start_of_the_run():
    cause = next(c for c in diagnose(_stack(3, "relu"), symptoms=("exploding",), global_norms=[2.0, 3.0, 4.0, 50.0, math.inf])
                 if c.kind == "unclipped_norm")
    assert cause.evidence["level"] == pytest.approx(3.0) and cause.evidence["peak"] == pytest.approx(50.0)
    clipped = _stack(3, "relu", clip_norm=1.0)
    assert "unclipped_norm" not in {c.kind for c in diagnose(clipped, symptoms=("exploding",), global_norms=[1.0, 9.0])}


def test_causes_are_ordered_by_the_primary_symptom():
    model = _stack(8)
    kinds = [c.kind for c in diagnose(model, symptoms=("vanishing",), update_ratios={"fc6": 0.5},
                                      global_norms=[1.0], grad_norms={"fc0": 1e-9, "fc7": 1.0})]
    assert kinds[0] == "saturating_activation" and kinds.index("lr_too_high") > kinds.index("no_normalisation")
    kinds = [c.kind for c in diagnose(model, symptoms=("diverged",), update_ratios={"fc6": 0.5}, global_norms=[1.0])]
    assert kinds[:2] == ["lr_too_high", "unclipped_norm"]
    large = _stack(4, "relu", std=1.0)  # 5.7x He: the forward pass explodes at step 0, whatever the LR
    kinds = [c.kind for c in diagnose(large, symptoms=("diverged",), update_ratios={"fc0": 0.5}, global_norms=[1.0])]
    assert kinds[:2] == ["init_scale", "lr_too_high"]


def test_symptoms_and_loss_drop():
    assert symptoms_of(["vanishing"], [2.0] * 20) == ("vanishing", "stalled")
    assert symptoms_of([], [2.0] * 5 + [1.0] * 15) == ()
    assert symptoms_of([], [2.0, math.nan]) == ("diverged",)
    assert math.isnan(loss_drop([1.0] * 3))


def test_cause_kind_is_validated():
    with pytest.raises(ValueError, match="Cause.kind must be one of"):
        Cause("bad_luck", (), "")


# -- candidates ----------------------------------------------------------------------------------


def test_each_cause_calls_for_its_repairs():
    model = _stack(6)
    causes = [Cause("saturating_activation", ("fc0", "fc1"), ""), Cause("no_normalisation", ("fc0",), ""),
              Cause("sgd_across_depth", (), ""), Cause("unclipped_norm", (), "", {"level": 2.5}),
              Cause("lr_too_low", (), "", {"factor": 100.0})]
    names = [c.name for c in propose(causes, model)]
    assert names == ["sigmoid->relu", "sigmoid->selu", "insert BatchNorm", "Adam", "clip at 2.5", "LR x100"]
    assert [c.name for c in propose([Cause("lr_too_low", (), "", {"factor": 100.0})], model)] == ["Adam", "LR x100"]
    adam = next(c for c in propose(causes, model) if c.name == "Adam")
    assert adam.because == ("sgd_across_depth", "lr_too_low")  # listed once, for both causes
    assert adam.changes == (SwitchOptimizer("adam", 1e-3),)


def test_sequence_models_get_layer_norm_and_weight_decay_gets_adamw():
    model = _stack(6, sequence_model=True, weight_decay=0.01)
    [norm] = propose([Cause("no_normalisation", ("fc0",), "")], model)
    assert norm.changes == (InsertNorm(("fc0",), "layer"),)
    [adam] = propose([Cause("sgd_across_depth", (), "")], model)
    assert adam.changes == (SwitchOptimizer("adamw", 1e-3, weight_decay=0.01),)


def test_combine_refuses_what_changes_the_same_thing():
    swap = Candidate("swap", (SwapActivation(("fc0",), "relu", "he"),))
    norm = Candidate("norm", (InsertNorm(("fc0",)),))
    lr = Candidate("lr", (ScaleLR(0.1),))
    adam = Candidate("adam", (SwitchOptimizer(),))
    reinit = Candidate("reinit", (Reinit(("fc0",), "he"),))
    assert combine(swap, norm).changes == swap.changes + norm.changes
    assert combine(lr, adam) is None and combine(swap, reinit) is None and combine(lr, lr) is None
    pair = combine(norm, Candidate("clip", (ClipNorm(1.0),)))
    assert pair.name == "norm + clip" and [c.kind for c in pair.ordered()] == ["insert_norm", "clip_norm"]


@pytest.mark.parametrize("make, match", [
    (lambda: ScaleLR(0.0), "factor must be > 0"), (lambda: ClipNorm(-1.0), "level must be > 0"),
    (lambda: Reinit(("a",), "random"), "init must be one of"), (lambda: InsertNorm(("a",), "group"), "norm must be one of"),
])
def test_changes_validate_their_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- trials and ranking --------------------------------------------------------------------------


def test_early_stop_rules():
    stop = EarlyStop(steps=40, baseline=[2.0] * 40, best=[0.5] * 40)
    assert stop([1.0] * 19) == ""  # before half the steps
    assert stop([2.5] * 20).startswith("hopeless") and "baseline" in stop([2.5] * 20)
    assert stop([1.0] * 20) == ""  # better than the baseline; too early to compare with the best
    assert "far behind the best" in stop([1.7] * 25)
    assert stop([1.0] * 25) == ""
    assert stop([1.0, math.nan]).startswith("diverged")
    exploding = EarlyStop(steps=40, baseline=[2.0] * 25 + [50.0] * 15)
    assert exploding([2.1] * 20) == ""  # slower than the baseline so far, but the baseline ends far worse


def _trial(name, losses, steps=10, kinds=(), **kw):
    report = Report(healthy=not kinds, finding_counts={k: {"warning": 1} for k in kinds})
    return TrialResult(name, None if name == "baseline" else Candidate(name, (ScaleLR(0.5),)), steps,
                       losses=list(losses), report=report, **kw)


def test_ranking_puts_health_first_then_the_loss():
    baseline = _trial("baseline", [2.0] * 10, kinds=("vanishing",))
    good = _trial("good", [0.5] * 10)
    better_but_sick = _trial("sick", [0.1] * 10, kinds=("exploding",))
    stopped = _trial("stopped", [0.01] * 5, stopped="hopeless")
    diverged = _trial("diverged", [1.0, math.nan])
    skipped = TrialResult("skipped", Candidate("skipped", (ScaleLR(2.0),)), 10, not_tried="time budget")
    ranked = rank([baseline, stopped, diverged, skipped, better_but_sick, good])
    assert [t.name for t in ranked] == ["good", "sick", "baseline", "stopped", "diverged", "skipped"]
    assert [t.tier for t in ranked] == [0, 1, 1, 2, 3, 4]
    assert loss_reached([3.0] * 8 + [1.0, 1.0]) == 1.0


def _result(trials, causes=()):
    model = ModelDescription("torch", "Sequential", [], "SGD", lr=0.1)
    return DoctorResult("demo", "torch", model, ("vanishing",) if causes else (), list(causes), rank(trials), 10)


def test_result_best_summary_json_and_fails():
    cause = Cause("saturating_activation", ("fc0",), "8 sigmoid layers")
    baseline = _trial("baseline", [2.0] * 10, kinds=("vanishing",))
    good = _trial("good", [0.5] * 10, snippet="- model[1] = nn.Sigmoid()\n+ model[1] = nn.ReLU()")
    manual = TrialResult("by hand", Candidate("by hand", (ScaleLR(2.0),)), 10, not_tried="called inside forward",
                         code_change="- x = torch.sigmoid(h)\n+ x = torch.relu(h)")
    result = _result([baseline, good, manual], [cause])
    assert result.best is good and result.fails("warning") and not result.fails("never")
    text = result.summary()
    assert "Recommended: good" in text and "+ model[1] = nn.ReLU()" in text and "+ x = torch.relu(h)" in text
    data = json.loads(result.to_json())
    assert data["best"] == "good" and data["causes"][0]["kind"] == "saturating_activation"
    assert [t["name"] for t in data["trials"]] == ["good", "baseline", "by hand"]
    with pytest.raises(ValueError, match="fail_on"):
        result.fails("sometimes")


def test_nothing_to_repair_and_no_repair_better():
    healthy = _result([_trial("baseline", [2.0] + [1.0] * 9)])
    assert healthy.nothing_to_repair and healthy.best is None and not healthy.fails()
    assert "Nothing to repair" in healthy.summary()
    baseline = _trial("baseline", [2.0] * 10, kinds=("vanishing",))
    worse = _trial("worse", [3.0] * 5, stopped="hopeless")
    stuck = _result([baseline, worse], [Cause("no_normalisation", ("fc0",), "")])
    assert stuck.best is None and "No repair did better" in stuck.summary()


def test_html_has_the_figures_the_table_and_the_change(tmp_path):
    pytest.importorskip("matplotlib")
    cause = Cause("saturating_activation", ("<fc0>",), "8 sigmoid layers & more")
    layout_history = {"steps": list(range(10)), "global_norm": [1.0] * 10, "loss": [1.0] * 10, "lr_factor": [1.0] * 10,
                      "layer_names": ["a", "b"], "layer_grad_norm": [[1e-6, 1.0]] * 10}
    baseline = _trial("baseline", [2.0] * 10, kinds=("vanishing",))
    baseline.report.history = layout_history
    good = _trial("good", [0.5] * 10, snippet="+ model[1] = nn.ReLU()")
    good.report.history = {**layout_history, "layer_grad_norm": [[0.5, 1.0]] * 10}
    html = _result([baseline, good], [cause]).to_html(title="t")
    assert html.count("data:image/png;base64,") == 2  # loss curves, heatmaps before/after
    assert "&lt;fc0&gt;" in html and "<span class='add'>+ model[1] = nn.ReLU()</span>" in html
    assert "Repair found: good" in html
