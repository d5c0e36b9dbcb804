from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gradwatch import Layout, Monitor, Report, StepStats
from gradwatch.testing import STREAMS


def run_stream(name: str, policy: str = "observe", **kwargs) -> Report:
    monitor = Monitor(policy=policy)
    stream: Any = STREAMS[name]
    for stats in stream(**kwargs):
        monitor.observe(stats)
    return monitor.report()


def odd_names_report() -> Report:
    """Layer names that must be escaped everywhere: HTML, XML, mathtext ($), control characters."""
    names = ['<script>alert("x")</script>.weight', "a&b $x$ 'q'.weight", "ctrl\x01\x1f.weight"]
    layout = Layout.from_names(names, numel=[10, 10, 10])
    monitor = Monitor(policy="observe")
    for step in range(30):
        grad = [0.1, 0.1, float("nan") if step == 12 else 0.1]
        monitor.observe(StepStats(step=step, layout=layout, grad_norm=np.array(grad), param_norm=np.ones(3), loss=1.0))
    return monitor.report()


@pytest.fixture
def make_report():
    return run_stream


@pytest.fixture
def odd_report() -> Report:
    return odd_names_report()
