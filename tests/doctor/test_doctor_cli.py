"""``gradwatch doctor``: the exit codes, the outputs and the progress display of ``gradwatch check``,
in process, on real PyTorch factories; and the pytest fixture's ``doctor()``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from gradwatch.cli import main  # noqa: E402

FACTORIES = Path(__file__).with_name("gw_doctor_factories.py")
pytest_plugins = ["pytester"]


def run(capsys, name: str, *extra: str) -> tuple[int, str, str]:
    code = main(["doctor", f"{FACTORIES}:{name}", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_healthy_exits_0_with_nothing_to_repair(capsys, tmp_path):
    out_json = tmp_path / "healthy.json"
    code, out, err = run(capsys, "torch_healthy", "--steps", "20", "--json", str(out_json))
    assert code == 0, out + err
    assert "nothing to repair" in out and "Nothing to repair" in out
    data = json.loads(out_json.read_text())
    assert data["nothing_to_repair"] and [t["name"] for t in data["trials"]] == ["baseline"]
    assert data["doctor"]["exit_code"] == 0 and data["schema_version"] == 1


def test_unhealthy_exits_1_with_the_ranked_repairs(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    code, out, err = run(capsys, "torch_sigmoid", "--steps", "30", "--max-trials", "3", "--no-pairs",
                         "--json", str(out_json), "--html", str(out_html))
    assert code == 1, out + err
    data = json.loads(out_json.read_text())
    assert data["best"] and data["causes"][0]["kind"] == "saturating_activation"
    assert sum(1 for t in data["trials"] if t["name"] != "baseline" and not t["not_tried"]) == 3
    assert f"gradwatch doctor {FACTORIES}:torch_sigmoid: FAILED: best repair" in out
    assert "[baseline]: step 30/30" in err  # progress, plain lines off a terminal
    html = out_html.read_text()
    assert "gradwatch doctor: Repair found" in html and html.count("data:image/png;base64,") == 2


def test_fail_on_never_and_quiet(capsys):
    code, out, _ = run(capsys, "torch_sigmoid", "--steps", "20", "--max-trials", "1", "--no-pairs",
                       "--fail-on", "never", "-q", "--no-progress")
    assert code == 0 and out.count("\n") == 1 and "PASSED" in out


@pytest.mark.parametrize("args, message", [
    (("--steps", "5"), "--steps must be >= 10; received 5."),
    (("--budget", "0"), "--budget must be > 0 seconds"),
    (("--max-trials", "-1"), "--max-trials must be >= 0"),
])
def test_bad_options_exit_2(capsys, args, message):
    code, _, err = run(capsys, "torch_sigmoid", *args)
    assert code == 2 and message in err


def test_bad_targets_exit_2(capsys):
    code, _, err = run(capsys, "no_such_factory")
    assert code == 2 and "has no function 'no_such_factory'" in err
    code = main(["doctor", "does/not/exist.py:f"])
    assert code == 2 and "No file" in capsys.readouterr().err


def test_a_stats_stream_cannot_be_doctored(capsys, tmp_path):
    target = tmp_path / "stats.py"
    target.write_text("from gradwatch.testing import healthy\n\ndef stream():\n    return list(healthy(steps=30))\n")
    code = main(["doctor", f"{target}:stream"])
    assert code == 2 and "needs a model it can copy, rewrite and train" in capsys.readouterr().err


def test_the_pytest_fixture_runs_the_doctor(pytester):
    pytester.makepyfile(test_doc=f'''
import sys
sys.path.insert(0, {str(FACTORIES.parent)!r})
import gw_doctor_factories as f


def test_doctor(gradwatch):
    result = gradwatch.doctor(f.torch_sigmoid(), steps=20, max_trials=1, pairs=False)
    assert result.causes and result.trials[0].name != "baseline", result.summary()


def test_healthy(gradwatch):
    assert gradwatch.doctor(f.torch_healthy, steps=20).nothing_to_repair
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--gradwatch-report", "out")
    result.assert_outcomes(passed=2)
    assert (pytester.path / "out" / "test_doc.py_test_doctor-doctor.json").exists()
    result.stdout.fnmatch_lines(["gradwatch: 2 gradient check(s), 1 unhealthy*"])
