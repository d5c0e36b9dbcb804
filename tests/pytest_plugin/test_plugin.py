"""The pytest plugin, run with ``pytester`` in fresh projects that only have gradwatch installed
(the plugin is found through its ``pytest11`` entry point, never named on the command line)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Here and not in a conftest.py: pytest refuses pytest_plugins in a conftest below the rootdir
# when the whole tests/ tree is collected.
pytest_plugins = ["pytester"]

STATS_TESTS = '''
import pytest
from gradwatch import CheckSpec
from gradwatch.testing import healthy, nan_at, vanishing_stream


def test_fixture_healthy(gradwatch):
    report = gradwatch.check(CheckSpec(stats=healthy(steps=100)), steps=30)
    assert report.healthy, report.summary()
    assert report.steps_measured == 30


def test_fixture_sees_nan(gradwatch):
    report = gradwatch.check(nan_at(step=5, steps=20))
    assert report.kinds() == ["nonfinite"]


@pytest.mark.gradwatch(steps=30)
def test_marker_healthy():
    return CheckSpec(stats=healthy(steps=100))


@pytest.mark.gradwatch(steps=40, fail_on="warning")
def test_marker_vanishing():
    return CheckSpec(stats=vanishing_stream(steps=100))


@pytest.mark.gradwatch(steps=40, fail_on="error")
def test_marker_vanishing_is_only_a_warning():
    return CheckSpec(stats=vanishing_stream(steps=100))


@pytest.fixture
def steps_wanted():
    return 25


@pytest.mark.gradwatch
def test_marker_with_a_fixture(steps_wanted):
    return CheckSpec(stats=healthy(steps=steps_wanted))


@pytest.mark.gradwatch
def test_marker_returns_nothing():
    pass
'''


def test_fixture_and_marker(pytester):
    pytester.makepyfile(test_models=STATS_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-ra")
    result.assert_outcomes(passed=5, failed=2)
    result.stdout.fnmatch_lines([
        "*_ test_marker_vanishing _*",
        "gradwatch: vanishing at or above 'warning'",
        "*_ test_marker_returns_nothing _*",
        "A @pytest.mark.gradwatch test must return a training setup*it returned None.",
        "gradwatch: 6 gradient check(s), 3 unhealthy",  # the NaN seen by test_fixture_sees_nan counts
        "FAILED test_models.py::test_marker_vanishing*",
        "FAILED test_models.py::test_marker_returns_nothing*",
    ])
    result.stdout.fnmatch_lines(["*Insert BatchNorm/LayerNorm after*"])  # the summary shows the finding
    assert "PytestReturnNotNoneWarning" not in result.stdout.str()


def test_reports_are_saved(pytester, tmp_path):
    pytest.importorskip("matplotlib")
    pytester.makepyfile(test_models=STATS_TESTS)
    out = tmp_path / "reports"
    result = pytester.runpytest("-p", "no:cacheprovider", "-ra", f"--gradwatch-report={out}", "-k", "vanishing or fixture_sees")
    result.assert_outcomes(passed=2, failed=1)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"test_models.py_{t}.{ext}" for t in ("test_fixture_sees_nan", "test_marker_vanishing",
                                               "test_marker_vanishing_is_only_a_warning")
        for ext in ("json", "html")
    )
    saved = json.loads((out / "test_models.py_test_marker_vanishing.json").read_text())
    assert saved["schema_version"] == 1 and saved["findings"][0]["kind"] == "vanishing"
    result.stdout.fnmatch_lines([f"gradwatch: 3 gradient check(s), 3 unhealthy; reports in {out}"])


def test_marker_misuse_is_a_usage_error(pytester):
    pytester.makepyfile(test_bad='''
import pytest

@pytest.mark.gradwatch(steps=5, fail_on="sometimes")
def test_a():
    return None

@pytest.mark.gradwatch(30)
def test_b():
    return None
''')
    result = pytester.runpytest("-p", "no:cacheprovider", "-ra")
    result.stdout.fnmatch_lines(["*fail_on must be 'info', 'warning', 'error' or 'never'; received 'sometimes'*"])
    assert result.ret != 0


def test_marker_and_option_are_registered(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gradwatch(steps=None, fail_on='warning'*"])
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--gradwatch-report=DIR*"])


def test_plugin_import_is_cheap_and_imports_no_framework():
    code = ("import sys, gradwatch.pytest_plugin; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


TORCH_TESTS = '''
import torch
from torch import nn

import pytest


def build_mlp(lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 1))
    x = torch.randn(64, 8)
    y = x.sum(1, keepdim=True)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    return model, torch.optim.SGD(model.parameters(), lr=lr), batches, nn.MSELoss()


def test_model_trains_healthily(gradwatch):
    report = gradwatch.check(build_mlp(lr=0.01), steps=30)
    assert report.healthy, report.summary()


@pytest.mark.gradwatch(steps=30)
def test_learning_rate_too_high():
    return build_mlp(lr=0.5)
'''


def test_torch_setups_in_a_fresh_process(pytester):
    pytest.importorskip("torch")
    pytest.importorskip("gradwatch.integrations.torch")
    pytester.makepyfile(test_torch_models=TORCH_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-ra")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*_ test_learning_rate_too_high _*", "gradwatch: * at or above 'warning'",
                                 "gradwatch: UNHEALTHY (30 measured steps 0-29, policy=observe, torch)"])
