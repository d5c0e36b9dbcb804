"""``gradwatch demo`` with PyTorch: the three stories it tells hold."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")

from gradwatch.demo import run_demo  # noqa: E402


def test_demo_runs_and_tells_the_three_stories(capsys):
    assert run_demo() == 0  # what `gradwatch demo` calls: the PyTorch demo when torch is installed
    out = capsys.readouterr().out
    # 1. vanishing: a BatchNorm recommendation naming the modules
    assert "recommend_batchnorm at step" in out and "insert BatchNorm/LayerNorm after fc1, fc2" in out
    # 2. exploding: unwatched NaN, watched finite and lower than where it started
    assert re.search(r"unwatched: loss [\d.]+ at step 0, .*NaN from step \d+", out)
    first, last = map(float, re.search(r"watched \(policy=auto\): loss ([\d.e+]+) at step 0, ([\d.e+]+) at step", out).groups())
    assert last < first
    assert "rollback x" in out and "lr_decay x" in out  # the step size was the cause: smaller LR, weights back
    # 3. NaN behind a finite loss: located, skipped, parameters kept finite
    assert "it starts at 'embed'" in out and "embed.weight is NaN" in out
    assert "parameters all finite" in out and "skip_step at step 7" in out
