"""The zoo's Keras runner, run for real on a few short seeds: every family it trains runs, the
observed run ends bit-for-bit equal to the unwatched one, and the outcomes are scored (the full
runs live in ``benchmarks/zoo``: ``python -m benchmarks.zoo --framework keras``).

``tests/benchmarks`` runs once, with whatever backend is set; TensorFlow when none is."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

pytest.importorskip("keras")
pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `benchmarks`

from benchmarks.zoo.keras_runner import batch_indices, batches  # noqa: E402
from benchmarks.zoo.sampler import sample  # noqa: E402
from benchmarks.zoo.scoring import summarise  # noqa: E402
from benchmarks.zoo.spec import Pathology  # noqa: E402
from benchmarks.zoo.workers import run_zoo  # noqa: E402

SEEDS = [1, 3, 12, 15]
"""An mlp with dropout under bf16 and a resmlp with batch-norm (the runner's first errors), a
tanh RNN, and a linear model fed one Inf input (detected, rescued)."""


def test_the_batches_are_the_torch_zoo_batches_ragged_last_one_and_injection_included():
    pytest.importorskip("torch")
    from benchmarks.zoo.torch_runner import _Training, inject_batch

    spec = dataclasses.replace(sample(1), batch_size=32, steps=9, pathology=Pathology("nan_input", 5))
    run = _Training(spec)
    rows = len(run.dataset.x_train)
    epoch = [32] * (rows // 32) + ([rows % 32] if rows % 32 else [])
    assert rows % 32  # iris: the last batch of an epoch is ragged
    want: list[np.ndarray] = []
    while len(want) < spec.steps:  # the torch runner's loop
        for x, y in run.loader:
            if len(want) < spec.steps:
                want.append(inject_batch(spec, len(want), x, y)[0].numpy())
    got = [x for x, _ in batches(spec, run.dataset.x_train, run.dataset.y_train)]
    assert [len(x) for x in got] == (epoch * 9)[:spec.steps]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, want[:spec.steps]))
    assert np.isnan(got[5]).sum() == 1 and not any(np.isnan(x).any() for i, x in enumerate(got) if i != 5)
    assert [len(i) for i in batch_indices(spec, rows)] == [len(x) for x in got]


def test_a_few_keras_seeds_run_end_to_end_and_are_scored():
    outcomes = run_zoo(SEEDS, "keras", workers=1, max_steps=40, progress=False)
    assert [o.seed for o in outcomes] == SEEDS
    assert not [(o.seed, o.reason) for o in outcomes if o.status == "error"]
    assert all(o.framework.startswith("keras/") for o in outcomes)
    assert len({o.family for o in outcomes}) >= 3
    kept = [o for o in outcomes if o.kept]
    assert kept
    for o in kept:
        assert o.observe_identical is True, o.line  # observe never changes training
        assert o.auto["identical"] in (True, False)
        if not o.healthy:
            assert o.detected == (o.latency is not None)
        assert all(f["severity"] in ("warning", "error") for f in o.false_alarms)
    totals = summarise(outcomes)
    assert totals["seeds"] == len(SEEDS) and totals["errors"] == 0
    assert totals["healthy"] + totals["pathological"] + totals["dropped"] == len(SEEDS)
    assert totals["observe_identical"]["equal"] == totals["kept"]
