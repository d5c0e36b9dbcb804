"""A handful of the benchmark scenarios, run for real, so the suite notices when detection,
a label check or the benchmark harness breaks (the full runs live in ``benchmarks/``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `benchmarks`

from benchmarks.clipping import AutoClip, ZClip, global_norm  # noqa: E402
from benchmarks.detection import torch_healthy, torch_pathologies  # noqa: E402
from benchmarks.detection.scoring import LabelCheck, score, summarise  # noqa: E402
from benchmarks.detection.torch_harness import detect  # noqa: E402
from gradwatch.findings import Finding  # noqa: E402

torch.set_num_threads(1)

SCENARIOS = {s.name: s for s in torch_healthy.SCENARIOS + torch_pathologies.SCENARIOS}


def test_the_suites_are_as_large_as_promised_and_half_healthy():
    names = list(SCENARIOS)
    assert len(names) == len(set(names))
    healthy = [s for s in SCENARIOS.values() if s.label == "healthy"]
    assert len(SCENARIOS) >= 30 and len(healthy) >= len(SCENARIOS) / 2 - 1
    kinds = {s.label for s in SCENARIOS.values()} - {"healthy"}
    assert kinds == {"exploding", "nonfinite", "vanishing", "dead_units", "loss_spike"}


@pytest.mark.parametrize("name", ["h-convex-converges", "h-frozen-backbone", "h-sparse-embedding", "h-bf16-grad-scaler"])
def test_healthy_traps_stay_silent_and_observe_changes_nothing(name):
    outcome = detect(SCENARIOS[name])
    assert outcome.check.ok, outcome.check.evidence
    assert outcome.false_alarms == [], outcome.false_alarms
    assert outcome.identical is True
    assert outcome.verdict == "ok"


@pytest.mark.parametrize(("name", "within"), [
    ("p-explode-lr-jump-300", 10), ("p-nan-zero-norm-depth1-180", 10), ("p-vanishing-sigmoid-10", 10),
    # 60 % of one layer dead is a warning only once the loss stops improving (three windows):
    # a partly dead layer in a run that still learns is an info finding.
    ("p-dead-layer1-bias", 30),
    ("p-loss-spike-targets-250", 10),
])
def test_pathologies_are_found_in_time(name, within):
    scenario = SCENARIOS[name]
    outcome = detect(scenario)
    assert outcome.check.ok, outcome.check.evidence
    assert outcome.detected, (outcome.first_kind, outcome.other_kinds)
    assert outcome.false_alarms == []
    assert outcome.latency is not None and outcome.latency <= within


def test_scoring_counts_early_findings_as_false_alarms_and_ignores_info():
    def finding(kind, step, severity="warning"):
        return Finding(kind=kind, severity=severity, step=step, layers=(), message="", evidence={})

    out = score(framework="torch", name="x", label="exploding", about="", onset=100,
                check=LabelCheck(True, "ok"), identical=True, seconds=0.0,
                findings=[finding("loss_spike", 40), finding("vanishing", 10, "info"),
                          finding("nonfinite", 103, "error"), finding("exploding", 105)])
    assert out.false_alarms == ["loss_spike@40"]
    assert out.info == ["vanishing@10"]
    assert out.detected and out.latency == 5 and out.first_kind == "nonfinite"
    assert out.other_kinds == ["nonfinite"]
    assert out.verdict == "FALSE ALARM"
    missed = score(framework="torch", name="y", label="vanishing", about="", onset=0,
                   check=LabelCheck(True, "ok"), identical=None, seconds=0.0, findings=[])
    totals = summarise([out, missed])
    assert totals["missed"] == ["y"] and totals["false_alarm_scenarios"] == ["x"]


def _params_with_grad(norm: float) -> list:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
    return [p]


def test_autoclip_clips_at_the_10th_percentile_of_the_history():
    rule = AutoClip(10.0)
    for norm in [float(v) for v in range(1, 11)]:
        params = _params_with_grad(norm)
        rule(params)
    # History 1..10: the 10th percentile (linear interpolation) is 1.9.
    assert math.isclose(global_norm(params), 1.9, rel_tol=1e-6)


def test_zclip_leaves_ordinary_norms_and_clips_a_spike_reciprocally():
    rule = ZClip(alpha=0.97, z_thresh=2.5, warmup=25)
    for i in range(40):
        params = _params_with_grad(1.0 + 0.1 * (i % 2))
        rule(params)
        assert math.isclose(global_norm(params), 1.0 + 0.1 * (i % 2), rel_tol=1e-6)
    mean, std = rule.mean, math.sqrt(rule.var)
    params = _params_with_grad(100.0)
    rule(params)
    z = (100.0 - mean) / std
    assert math.isclose(global_norm(params), mean + 2.5**2 / z * std, rel_tol=1e-5)
