"""The public API is what ``gradwatch.__all__`` lists; importing gradwatch imports no framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gradwatch

PUBLIC = [
    "ACTION_KINDS",
    "FINDING_KINDS",
    "SEVERITIES",
    "Action",
    "AutoPolicy",
    "BadTargetError",
    "CheckSpec",
    "Controls",
    "Decision",
    "Detector",
    "Finding",
    "GradWatch",
    "GradwatchError",
    "GradwatchWarning",
    "Layout",
    "MissingExtraError",
    "Monitor",
    "ObservePolicy",
    "Policy",
    "Report",
    "StepStats",
    "__version__",
    "hookimpl",
    "watch",
]


def test_all_is_pinned():
    assert sorted(gradwatch.__all__) == sorted(PUBLIC)


def test_vocabulary_is_stable():
    assert gradwatch.FINDING_KINDS == ("nonfinite", "exploding", "vanishing", "dead_units", "loss_spike")
    assert gradwatch.ACTION_KINDS == ("clip", "lr_decay", "skip_step", "rollback", "recommend_batchnorm")
    assert gradwatch.SEVERITIES == ("info", "warning", "error")


def test_import_gradwatch_imports_no_framework():
    code = (
        "import sys, gradwatch, gradwatch.testing, gradwatch.cli, gradwatch.pytest_plugin, gradwatch.demo\n"
        "heavy = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'matplotlib', 'lightning', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import gradwatch imported {out.stdout.strip()}"


@pytest.mark.parametrize(("attr", "module", "extra"), [("watch", "torch", "torch"), ("GradWatch", "keras", "keras")])
def test_missing_framework_names_the_extra(attr, module, extra):
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "import gradwatch\n"
        "try:\n"
        f"    gradwatch.{attr}\n"
        "except gradwatch.MissingExtraError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert f"pip install 'gradwatch[{extra}]'" in out.stdout, out.stdout + out.stderr


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="has no attribute 'wacth'"):
        gradwatch.wacth  # noqa: B018
