"""FSDP2 (``fully_shard``: DTensor shards) on 2 gloo ranks on the CPU; FSDP1 where an accelerator is.

The global norm is the all-reduce of squared local shard norms, in one collective per step; the
decisions (skip, clip, rollback) are the same on every rank.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

pytest.importorskip("torch.distributed")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

from gw_dist_harness import result, run_scenarios  # noqa: E402

SCENARIOS = [
    "fsdp_norms", "fsdp_clip", "fsdp_explode", "fsdp_nan_one_rank", "fsdp_rollback", "fsdp_fail_measure",
    "dtensor_placements",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_scenarios("gw_dist_scenarios", SCENARIOS, tmp_path_factory.mktemp("fsdp"), world=2, timeout_s=150)


def close(a, b, rel=1e-5):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-7) for x, y in zip(a, b))


def test_fsdp2_norms_equal_the_single_process_norms(runs):
    r0, r1 = result(runs["fsdp_norms"], 0), result(runs["fsdp_norms"], 1)
    assert r0["dist"] == r1["dist"]
    ref, got = r0["ref"], r0["dist"]
    assert got["measured"] == ref["measured"] == 4
    assert close(got["global_norm"], ref["global_norm"])
    for a, b in zip(got["layer_grad_norm"], ref["layer_grad_norm"]):
        assert close(a, b)
    assert close(got["loss"], ref["loss"])
    # The dead unit's row lives in rank 0's Shard(0) rows: zero rows are counted per shard and summed.
    assert got["dead"] == ref["dead"] and got["dead"]["0"] == pytest.approx(1 / 8)
    assert got["healthy"] and got["actions"] == []
    for a, b in zip(r0["params"], r0["ref_params"]):
        assert close(a, b, rel=1e-4)


def test_fsdp2_clip_equals_torch_clip_grad_norm_on_dtensors(runs):
    for rank in (0, 1):
        r = result(runs["fsdp_clip"], rank)
        for a, b in zip(r["torch"], r["gradwatch"]):
            assert close(a, b, rel=1e-6)


def test_fsdp2_exploding_run_is_rescued_with_the_same_decisions_on_both_ranks(runs):
    r0, r1 = result(runs["fsdp_explode"], 0), result(runs["fsdp_explode"], 1)
    assert r0["unwatched_diverges"]
    assert r0["params"] == r1["params"]
    assert r0["dist"] == r1["dist"]
    assert "exploding" in r0["dist"]["kinds"]
    # The first remedies are those the single process takes on the same data.
    assert r0["dist"]["actions"][:2] == r0["ref"]["actions"][:2]
    assert {kind for _, kind in r0["dist"]["actions"]} & {"clip", "lr_decay", "rollback"}
    assert all(math.isfinite(v) for p in r0["params"] for v in p)
    losses = r0["dist"]["loss"]  # the mean over the ranks
    assert all(math.isfinite(v) for v in losses) and max(losses[-20:]) < max(losses) / 5  # recovered


def test_fsdp2_nan_on_one_ranks_batch_is_skipped_on_both(runs):
    r0, r1 = result(runs["fsdp_nan_one_rank"], 0), result(runs["fsdp_nan_one_rank"], 1)
    # The reduce-scatter spreads rank 1's NaN into rank 0's shards too.
    assert r0["local_nan"] == [False, False, False, True, False, False]
    assert r0["dist"]["actions"] == r1["dist"]["actions"] == [[3, "skip_step"]]
    # The non-finite element counts, summed over the shards, are the single process's.
    assert r0["nonfinite"] == r1["nonfinite"] == r0["ref_nonfinite"]
    assert sum(r0["nonfinite"][3]) > 0 and sum(map(sum, r0["nonfinite"])) == sum(r0["nonfinite"][3])
    assert r0["ref"]["actions"] == [[3, "skip_step"]]
    assert r0["finite"] and r0["params"] == r1["params"]
    assert result(runs["fsdp_nan_one_rank"], 1)["events"] == []


def test_fsdp2_nonfinite_shard_on_one_rank_is_rolled_back_on_both(runs):
    r0, r1 = result(runs["fsdp_rollback"], 0), result(runs["fsdp_rollback"], 1)
    assert r0["dist"]["actions"] == r1["dist"]["actions"]
    assert [12, "rollback"] in r0["dist"]["actions"]
    assert r0["snapshot_restored"] and r1["snapshot_restored"]
    assert all(math.isfinite(v) for p in r0["params"] for v in p)


def test_fsdp2_rank_failing_inside_gradwatch_stops_every_rank(runs):
    r0, r1 = result(runs["fsdp_fail_measure"], 0), result(runs["fsdp_fail_measure"], 1)
    assert r0["measured"] == r1["measured"] == 2 and not r0["active"] and not r1["active"]
    assert r0["params"] == r1["params"]
    assert any("rank(s) [1]" in w for w in runs["fsdp_fail_measure"][0]["warnings"])
    assert not any(w.startswith("GradwatchWarning") for w in runs["fsdp_fail_measure"][1]["warnings"])


def test_dtensor_placements_measure_the_full_tensors(runs):
    r0, r1 = result(runs["dtensor_placements"], 0), result(runs["dtensor_placements"], 1)
    assert r0 == r1  # the same statistics on every rank
    assert close(r0["grad_norm"], r0["expected"]) and close(r0["param_norm"], r0["expected_param"])
    zero = dict(zip(r0["names"], r0["zero_fraction"]))
    assert zero["0.weight"] == pytest.approx(1 / 6)  # Shard(0): rows counted per shard and summed
    assert zero["2.weight"] == 0.0  # Replicate: whole rows on every rank
    assert math.isnan(zero["1.weight"])  # Shard(1) splits each row: not counted
    assert r0["loss"] == pytest.approx(0.5)  # the mean of the ranks' losses 0 and 1


def _fsdp1_unavailable() -> str | None:
    accelerator = getattr(torch, "accelerator", None)
    if not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available()):
        return "FSDP needs a non-CPU accelerator device (FullyShardedDataParallel refuses the CPU)"
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available():
        return "2 FSDP1 ranks need 2 CUDA GPUs and NCCL (NCCL cannot put two ranks on one GPU)"
    return None


@pytest.mark.skipif(_fsdp1_unavailable() is not None, reason=str(_fsdp1_unavailable()))
def test_fsdp1_norms_equal_the_single_process_norms(tmp_path):
    runs = run_scenarios("gw_dist_scenarios", ["fsdp1_norms"], tmp_path, world=2, timeout_s=300, backend="nccl")
    r0, r1 = result(runs["fsdp1_norms"], 0), result(runs["fsdp1_norms"], 1)
    ref = r0["ref"]
    for key in ("orig=False", "orig=True"):
        assert r0[key] == r1[key]
        assert close(r0[key]["global_norm"], ref["global_norm"], rel=1e-4)
        assert close(r0[key]["loss"], ref["loss"], rel=1e-4)
