"""DDP on 2 gloo ranks (CPU): global numbers, one decision for all ranks, rank-0-only output."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

pytest.importorskip("torch.distributed")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from gw_dist_harness import result, run_scenarios  # noqa: E402

SCENARIOS = [
    "ddp_norms", "ddp_no_sync", "ddp_explode", "ddp_nan_one_rank", "ddp_rollback", "ddp_every",
    "ddp_fail_measure", "ddp_fail_before", "ddp_fail_observe",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_scenarios("gw_dist_scenarios", SCENARIOS, tmp_path_factory.mktemp("ddp"), world=2, timeout_s=150)


def close(a, b, rel=1e-5):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-7) for x, y in zip(a, b))


def gradwatch_warnings(out):
    return [w for w in out["warnings"] if w.startswith("GradwatchWarning")]


@pytest.mark.parametrize("name", ["ddp_norms", "ddp_no_sync"])
def test_ddp_norms_equal_the_single_process_norms(runs, name):
    r0, r1 = result(runs[name], 0), result(runs[name], 1)
    assert r0["dist"] == r1["dist"]  # the same statistics, findings and decisions on both ranks
    ref, got = r0["ref"], r0["dist"]
    assert got["measured"] == ref["measured"] == 4  # under no_sync: once per optimizer step
    assert close(got["global_norm"], ref["global_norm"])
    for a, b in zip(got["layer_grad_norm"], ref["layer_grad_norm"]):
        assert close(a, b)
    assert close(got["loss"], ref["loss"])  # the mean of the ranks' losses
    assert got["dead"] == ref["dead"] and got["dead"]["0"] == pytest.approx(1 / 8)  # the dead unit
    assert got["healthy"] and ref["healthy"] and got["actions"] == []
    for a, b in zip(r0["params"], r0["ref_params"]):
        assert close(a, b, rel=1e-4)


def test_ddp_exploding_run_is_rescued_with_identical_parameters_on_both_ranks(runs):
    r0, r1 = result(runs["ddp_explode"], 0), result(runs["ddp_explode"], 1)
    assert r0["unwatched_diverges"]
    assert r0["params"] == r1["params"]  # bit for bit
    assert r0["dist"]["actions"] == r1["dist"]["actions"]
    kinds = {kind for _, kind in r0["dist"]["actions"]}
    # A remedy that acts on the step size (clip, a lower LR, a rollback), the same on both ranks.
    assert kinds & {"clip", "lr_decay", "rollback"} and "exploding" in r0["dist"]["kinds"]
    assert all(math.isfinite(v) for p in r0["params"] for v in p)
    losses = r0["dist"]["loss"]  # the mean over the ranks
    assert all(math.isfinite(v) for v in losses) and max(losses[-20:]) < max(losses) / 5  # recovered


def test_ddp_nan_on_one_ranks_batch_is_skipped_on_both(runs):
    r0, r1 = result(runs["ddp_nan_one_rank"], 0), result(runs["ddp_nan_one_rank"], 1)
    # DDP's all-reduce spreads rank 1's NaN: rank 0's own gradients are NaN at step 3 only.
    assert r0["local_nan"] == [False, False, False, True, False, False]
    assert r0["dist"]["actions"] == r1["dist"]["actions"] == [[3, "skip_step"]]
    # The non-finite element counts, summed over the shards, are the single process's.
    assert r0["nonfinite"] == r1["nonfinite"] == r0["ref_nonfinite"]
    assert sum(r0["nonfinite"][3]) > 0 and sum(map(sum, r0["nonfinite"])) == sum(r0["nonfinite"][3])
    assert r0["ref"]["actions"] == [[3, "skip_step"]]
    assert r0["params"] == r1["params"] and r0["finite"]
    assert math.isnan(r0["dist"]["loss"][3]) and math.isnan(r1["dist"]["loss"][3])


def test_ddp_nonfinite_weights_are_rolled_back_on_both_ranks(runs):
    r0, r1 = result(runs["ddp_rollback"], 0), result(runs["ddp_rollback"], 1)
    assert r0["dist"]["actions"] == r1["dist"]["actions"]
    assert [12, "rollback"] in r0["dist"]["actions"]
    assert r0["snapshot_restored"] and r1["snapshot_restored"]  # the snapshot of step 10
    assert r0["params"] == r1["params"] and all(math.isfinite(v) for p in r0["params"] for v in p)


def test_ddp_only_rank_zero_writes_events(runs):
    outs = runs["ddp_nan_one_rank"]
    events0, events1 = result(outs, 0)["events"], result(outs, 1)["events"]
    assert "finding:nonfinite" in events0 and "action:skip_step" in events0 and "report" in events0
    assert events0.count("step") == 6
    assert events1 == []
    for out in outs:
        assert out["stdout"] == "" and gradwatch_warnings(out) == []


def test_ddp_every_n_measures_and_communicates_on_the_same_steps(runs):
    r0, r1 = result(runs["ddp_every"], 0), result(runs["ddp_every"], 1)
    assert r0["dist"]["measured"] == 4 and r0["dist"] == r1["dist"]  # steps 0, 2, 4, 6 of 7
    assert r0["params"] == r1["params"]


@pytest.mark.parametrize(
    "name, measured", [("ddp_fail_measure", (2, 2)), ("ddp_fail_before", (2, 2)), ("ddp_fail_observe", (3, 2))]
)
def test_a_rank_failing_inside_gradwatch_stops_every_rank_without_deadlock(runs, name, measured):
    r0, r1 = result(runs[name], 0), result(runs[name], 1)
    # Rank 1 failed at step 2: before its collective (in its measurement, or earlier in the watch),
    # every rank stops at step 2; after it (in the monitor), every rank stops at the next
    # collective, step 3.
    assert (r0["measured"], r1["measured"]) == measured
    assert not r0["active"] and not r1["active"]
    assert r0["params"] == r1["params"]  # training went on, identically
    (warning,) = gradwatch_warnings(runs[name][0])
    assert "rank(s) [1]" in warning and "injected failure on rank 1" in warning
    assert gradwatch_warnings(runs[name][1]) == []


def test_distributed_true_needs_an_initialised_process_group():
    from gradwatch.integrations.torch import watch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        watch(model, opt, distributed=True)
    with watch(model, opt) as w:  # not distributed: measured in this process alone
        assert w.driver._dist is None
