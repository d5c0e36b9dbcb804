"""``gradwatch check`` on real PyTorch setups (CPU): each pathology exits 1 with its kind in the
JSON and the JUnit XML, a healthy MLP exits 0, and setups that do not fit exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

pytest.importorskip("gradwatch.integrations.torch")

from gradwatch import BadTargetError, Report  # noqa: E402
from gradwatch.check import check_target, run_check  # noqa: E402

FACTORIES = Path(__file__).with_name("factories.py")


def test_healthy_mlp_exits_0(check):
    run = check("torch_healthy", "--steps", "30")
    assert run.code == 0, run.out + run.err
    assert run.data["healthy"] is True and run.data["framework"] == "torch"
    assert run.data["steps_measured"] == 30 and run.failed_cases() == set()
    assert [layer["layer"] for layer in run.data["layers"]] == ["0", "2", "4"]


@pytest.mark.parametrize(("factory", "kind"), [
    ("torch_vanishing", "vanishing"),
    ("torch_exploding", "exploding"),
    ("torch_nan", "nonfinite"),
])
def test_pathologies_exit_1_with_their_kind(check, factory, kind):
    run = check(factory, "--steps", "30" if kind != "exploding" else "40")
    assert run.code == 1, run.out + run.err
    assert kind in run.kinds() and kind in run.failed_cases()
    assert run.data["healthy"] is False


def test_nan_finding_points_at_the_layer_before_the_sqrt(check):
    run = check("torch_nan", "--steps", "5")
    finding = next(f for f in run.data["findings"] if f["kind"] == "nonfinite")
    assert finding["evidence"]["origin"] == "2" and finding["step"] == 0


def test_vanishing_names_the_early_layers(check):
    run = check("torch_vanishing", "--steps", "20")
    finding = next(f for f in run.data["findings"] if f["kind"] == "vanishing")
    assert finding["layers"][0] == "0"


@pytest.mark.parametrize(("factory", "expected"), [
    ("torch_wrong_optimizer", "optimizer is a MSELoss"),
    ("torch_shape_mismatch", "Step 0 of the setup from"),
])
def test_setups_that_do_not_fit_exit_2(check, factory, expected):
    run = check(factory, outputs=False)
    assert run.code == 2 and expected in run.err and "Traceback" not in run.err


def test_the_check_never_changes_training():
    """observe: the watched run's parameters equal an unwatched run's."""
    from torch import nn

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        batches = [(torch.randn(4, 8), torch.randn(4, 2)) for _ in range(3)]
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), batches, nn.MSELoss()

    model, optimizer, batches, loss_fn = setup()
    report = run_check((model, optimizer, batches, loss_fn), steps=7)  # iterates the list again
    assert report.steps_measured == 7
    ref, ref_opt, ref_batches, _ = setup()
    for x, y in (ref_batches * 3)[:7]:
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_seed_makes_checks_repeatable():
    a = check_target(f"{FACTORIES}:torch_healthy", steps=5, seed=3)
    b = check_target(f"{FACTORIES}:torch_healthy", steps=5, seed=3)
    assert a.history["global_norm"] == b.history["global_norm"]


def test_a_one_shot_iterator_that_runs_out_stops_the_check():
    from torch import nn

    model = nn.Linear(3, 1)
    batches = iter([(torch.randn(2, 3), torch.randn(2, 1))] * 4)
    report = run_check((model, torch.optim.SGD(model.parameters(), lr=0.1), batches, nn.MSELoss()), steps=10)
    assert isinstance(report, Report) and report.steps_measured == 4
    with pytest.raises(BadTargetError, match="yielded no batch"):
        run_check((model, torch.optim.SGD(model.parameters(), lr=0.1), iter([]), nn.MSELoss()), steps=3)
    with pytest.raises(BadTargetError, match=r"must be \(inputs, targets\) pairs; batch 0 is a Tensor"):
        run_check((model, torch.optim.SGD(model.parameters(), lr=0.1), [torch.randn(2, 3)], nn.MSELoss()), steps=3)


def test_device_option_moves_model_and_batches(check):
    run = check("torch_healthy", "--steps", "3", "--device", "cpu")
    assert run.code == 0
    run = check("torch_healthy", "--steps", "3", "--device", "no_such_device", outputs=False)
    assert run.code == 2 and "Cannot move the model to device 'no_such_device'" in run.err


def test_html_report_of_a_torch_check(check, tmp_path):
    pytest.importorskip("matplotlib")
    page = tmp_path / "torch.html"
    run = check("torch_nan", "--steps", "10", "--html", str(page))
    assert run.code == 1
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "nonfinite" in html


def test_a_framework_the_factory_imports_is_seeded_as_it_loads(tmp_path):
    """The factories import torch inside the function: the console script, in a fresh process,
    must give the numbers of an in-process check where torch was already imported."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "r.json"
    script = os.path.join(os.path.dirname(sys.executable), "gradwatch")
    result = subprocess.run([script, "check", f"{FACTORIES}:torch_healthy", "--steps", "5", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fresh = json.loads(out.read_text())["history"]["global_norm"]
    assert fresh == check_target(f"{FACTORIES}:torch_healthy", steps=5, seed=0).history["global_norm"]


def test_the_docs_example_factory_is_healthy():
    example = Path(__file__).parents[2] / "examples" / "ci" / "models.py"
    assert check_target(f"{example}:build_mlp", steps=12, seed=0).healthy
