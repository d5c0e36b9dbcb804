"""Gradient checks as unit tests (the pytest plugin comes with gradwatch: nothing to configure).

    pytest examples/ci/test_gradients.py --gradwatch-report reports/
"""

from __future__ import annotations

import pytest
from models import build_deep_sigmoid_mlp, build_mlp

pytest.importorskip("torch")


def test_mlp_trains_healthily(gradwatch):
    report = gradwatch.check(build_mlp(), steps=30)
    assert report.healthy, report.summary()


@pytest.mark.gradwatch(steps=30, fail_on="warning")
def test_mlp_with_the_marker():
    return build_mlp()


def test_deep_sigmoid_mlp_is_caught(gradwatch):
    report = gradwatch.check(build_deep_sigmoid_mlp(), steps=30)
    assert "vanishing" in report.kinds("warning")
