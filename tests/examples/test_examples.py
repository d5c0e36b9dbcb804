"""Every script in examples/ runs as a user would run it (a subprocess, CPU) and says what it should."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CASES = {
    # script: (modules it needs, text its output must contain)
    "torch_loop.py": (["torch"], ["exploding", "lr_decay", "learning rate factor x0."]),
    "keras_fit.py": (["keras", "torch", "gradwatch.integrations.keras"], ["Findings: none", "final loss"]),
    "lightning_trainer.py": (["lightning"], ["exploding", "grad_norm/total", "gradwatch/lr_factor"]),
    "hf_trainer.py": (["transformers", "accelerate"], ["1 NaN/Inf loss(es) in 40 batches", "[error] nonfinite at step 12"]),
    "sinks.py": (["torch", "tensorboard"], ["'report': 1", "CountingSink saw 120 steps", "tensorboard --logdir"]),
}


def _missing(modules: list[str]) -> str | None:
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:
            return name
    return None


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script: str, tmp_path: Path) -> None:
    modules, expected = CASES[script]
    missing = _missing(modules)
    if missing:
        pytest.skip(f"{script} needs {missing}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3",
           "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD": "1"}
    args = [sys.executable, str(EXAMPLES / script)] + ([str(tmp_path / "out")] if script == "sinks.py" else [])
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for text in expected:
        assert text in output, f"{script}: {text!r} not in its output:\n{output[-3000:]}"
    if script == "sinks.py":
        assert (tmp_path / "out" / "run.jsonl").stat().st_size > 0
        assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
