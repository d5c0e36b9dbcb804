"""``gradwatch check`` and ``gradwatch report`` on setups that need no framework (StepStats
streams) and on broken targets: exit codes, JSON, JUnit, messages."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from gradwatch.check import Progress
from gradwatch.cli import main

FACTORIES = Path(__file__).with_name("factories.py")


def target(name: str) -> str:
    return f"{FACTORIES}:{name}"


def test_healthy_exits_0_and_prints_the_layer_table(check):
    run = check("stats_healthy")
    assert run.code == 0, run.err
    assert "HEALTHY" in run.out and "grad/param" in run.out and "PASSED" in run.out
    data = run.data
    assert data["schema_version"] == 1 and data["healthy"] is True and data["findings"] == []
    assert data["steps_measured"] == 60  # the CheckSpec's own steps
    assert data["check"]["target"].endswith("factories.py:stats_healthy") and data["check"]["exit_code"] == 0
    assert run.failed_cases() == set()


@pytest.mark.parametrize(("factory", "kind"), [
    ("stats_exploding", "exploding"), ("stats_nan", "nonfinite"), ("stats_vanishing", "vanishing"),
])
def test_unhealthy_exits_1_with_the_kind_in_json_and_junit(check, factory, kind):
    run = check(factory, "--steps", "40")
    assert run.code == 1, run.err
    assert kind in run.kinds() and kind in run.failed_cases()
    verdict = next(line for line in run.out.splitlines() if "FAILED:" in line)
    assert kind in verdict
    assert "What to do:" in run.out
    finding = next(f for f in run.data["findings"] if f["kind"] == kind)
    assert {"kind", "severity", "step", "layers", "message"} <= set(finding)
    assert run.data["healthy"] is False and run.data["steps_measured"] == 40


def test_fail_on_error_and_never(check):
    assert check("stats_vanishing", "--fail-on", "error").code == 0  # vanishing is a warning
    assert check("stats_nan", "--fail-on", "error").code == 1  # nonfinite is an error
    run = check("stats_nan", "--fail-on", "never")
    assert run.code == 0 and run.failed_cases() == set() and "worst severity: error" in run.out


@pytest.mark.parametrize(("factory", "expected"), [
    ("raises", "raised RuntimeError: the data directory is missing"),
    ("returns_number", "returned an int (42).\nA factory must return one of:\n  PyTorch:  (model, optimizer, batches, loss_fn)"),
    ("returns_nothing", "returned None (does the factory end with a `return`?)"),
    ("NOT_A_FUNCTION", "is an int (3), not a function that returns a setup"),
    ("no_such_factory", "has no function 'no_such_factory'; it defines"),
])
def test_broken_factories_exit_2_with_what_was_expected(check, factory, expected):
    run = check(factory, outputs=False)
    assert run.code == 2
    assert expected in run.err
    assert "Traceback" not in run.err and run.out == ""


@pytest.mark.parametrize(("argv", "expected"), [
    (["check", "no_such_module_xyz:build"], "Cannot import module 'no_such_module_xyz'"),
    (["check", "build_mlp"], "Expected a target of the form 'package.module:function' or 'path/to/file.py:function'"),
    (["check", "missing/models.py:build"], "No file 'missing/models.py'"),
    (["check"], "the following arguments are required: TARGET"),
    (["check", "x.py:f", "--fail-on", "fatal"], "invalid choice: 'fatal'"),
    (["check", target("stats_healthy"), "--steps", "0"], "--steps must be >= 1; received 0"),
    (["report", "no_such_report.json"], "No file 'no_such_report.json'"),
])
def test_usage_errors_exit_2(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_module_targets_import_from_the_current_directory(check, monkeypatch):
    monkeypatch.chdir(FACTORIES.parent)
    monkeypatch.syspath_prepend(str(FACTORIES.parent))
    code = main(["check", "factories:stats_nan", "--no-progress"])
    assert code == 1


def test_a_file_that_fails_to_import_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad_models.py"
    bad.write_text("import numpy\nraise ImportError('needs the private package')\n")
    assert main(["check", f"{bad}:build"]) == 2
    assert "Importing" in capsys.readouterr().err


def test_a_script_that_exits_at_import_is_a_usage_error(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("import argparse\nargparse.ArgumentParser().parse_args(['--nope'])\n")
    assert main(["check", f"{script}:build"]) == 2
    err = capsys.readouterr().err
    assert "called sys.exit(2)" in err and 'if __name__ == "__main__":' in err


def test_report_renders_a_saved_report_again(check, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    check("stats_nan")
    html, xml = tmp_path / "out" / "again.html", tmp_path / "again.xml"
    assert main(["report", str(check.json_path), "--html", str(html), "--junit", str(xml)]) == 0
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 2 and "factories.py:stats_nan" in page
    assert "nonfinite" in xml.read_text()
    capsys.readouterr()
    assert main(["report", str(check.json_path)]) == 0
    assert "Findings:" in capsys.readouterr().out
    assert main(["report", str(check.json_path), "--fail-on", "warning"]) == 1


def test_report_rejects_other_json(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert main(["report", str(other)]) == 2
    assert "not a gradwatch report" in capsys.readouterr().err


def test_html_from_check(check, tmp_path):
    pytest.importorskip("matplotlib")
    page = tmp_path / "r.html"
    run = check("stats_layer_names", "--html", str(page))
    assert run.code == 1 and page.exists() and "&lt;script&gt;" in page.read_text()


def test_progress_is_plain_lines_off_a_terminal(check):
    run = check("stats_healthy", "--steps", "20", outputs=False)
    lines = [line for line in run.err.splitlines() if "step" in line]
    assert len(lines) == 10 and lines[-1].split(": step ")[1].startswith("20/20")
    assert "\r" not in run.err


def test_progress_is_a_bar_on_a_terminal():
    stream = io.StringIO()
    progress = Progress("check", stream=stream, tty=True)
    for done in range(1, 6):
        progress(done, 5)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 5 and "[" + "#" * 30 + "] 5/5 steps" in text and text.endswith("\n")


def test_console_script_runs(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "gradwatch")
    result = subprocess.run([script, "check", target("stats_nan"), "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["findings"][0]["kind"] == "nonfinite"
