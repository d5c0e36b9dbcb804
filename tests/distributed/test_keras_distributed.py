"""Keras on 2 CPU devices: ``tf.distribute.MirroredStrategy`` (TensorFlow) and
``keras.distribution.DataParallel`` (JAX) report the norms of the single-device run and take its
decisions.

Each backend runs in a subprocess (gw_keras_dist_script.py): the logical devices (TensorFlow) and
``XLA_FLAGS`` (JAX) must be set before the framework starts, and Keras picks its backend at import.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gw_keras_dist_script.py")
BACKENDS = {"mirrored": "tensorflow", "jax_data_parallel": "jax"}


def _run(mode: str) -> dict:
    for module in ("keras", BACKENDS[mode]):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, str(SCRIPT), mode], capture_output=True, text=True, timeout=240, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("GRADWATCH_RESULT ")), None)
    assert out.returncode == 0 and line is not None, out.stdout[-3000:] + out.stderr[-6000:]
    return json.loads(line.split(" ", 1)[1])


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def runs(request):
    return request.param, _run(request.param)


def close(a, b, rel=1e-5):
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rel, abs_tol=1e-6) for x, y in zip(a, b)
    )


def test_reported_norms_equal_the_single_device_run(runs):
    mode, result = runs
    single, dist = result["norms"]["single"], result["norms"]["distributed"]
    # One row per step, from the aggregated gradients (not one per replica, not a replica's share).
    assert dist["measured"] == single["measured"] == 8, mode
    assert close(dist["global_norm"], single["global_norm"]), mode
    for a, b in zip(dist["layer_grad_norm"], single["layer_grad_norm"]):
        assert close(a, b), mode
    for a, b in zip(dist["weights"], single["weights"]):
        assert close(a, b, rel=1e-4), mode
    assert dist["actions"] == [] and dist["kinds"] == []


def test_nan_in_one_replicas_half_is_skipped_as_on_one_device(runs):
    mode, result = runs
    single, dist = result["nan_one_replica"]["single"], result["nan_one_replica"]["distributed"]
    assert [1, "skip_step"] in single["actions"]
    assert dist["actions"] == single["actions"], mode
    assert all(math.isfinite(v) for w in dist["weights"] for v in w)
    for a, b in zip(dist["weights"], single["weights"]):
        assert close(a, b, rel=1e-4), mode


def test_explosion_is_remedied_as_on_one_device(runs):
    mode, result = runs
    single, dist = result["explode"]["single"], result["explode"]["distributed"]
    assert "exploding" in single["kinds"]
    # The cause is the step size: the LR is decayed and the last healthy snapshot restored (the
    # core answers such an explosion with lr_decay and rollback rather than with a clip).
    kinds = [kind for _, kind in single["actions"]]
    assert kinds[:2] == ["lr_decay", "rollback"] and single["actions"][0][0] == single["actions"][1][0], single
    # Once: the step already running when the LR was decayed ran at the old LR, which must not be
    # read as a jump of the user's LR (a second decay and rollback for nothing).
    assert kinds.count("lr_decay") == 1 and kinds.count("rollback") == 1, single
    # The same remedies at the same steps (the first ones; later steps may differ by rounding).
    assert dist["actions"][:6] == single["actions"][:6], mode
    assert all(math.isfinite(v) for w in dist["weights"] for v in w)
    assert all(math.isfinite(v) for w in single["weights"] for v in w)
