"""The documentation builds strictly and documents every hook."""

from __future__ import annotations

import inspect
import pathlib
import shutil
import subprocess
import sys

import pytest

from gradwatch import hookspecs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_hook_is_documented():
    text = (ROOT / "docs" / "hooks.md").read_text()
    hooks = [name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("gradwatch_")]
    assert len(hooks) == 6
    for name in hooks:
        assert f"## {name}" in text, f"docs/hooks.md lacks a section for {name}"


def test_mkdocs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and not (pathlib.Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip("mkdocs is not installed (pip install 'gradwatch[dev]')")
    mkdocs = shutil.which("mkdocs") or str(pathlib.Path(sys.executable).parent / "mkdocs")
    out = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
