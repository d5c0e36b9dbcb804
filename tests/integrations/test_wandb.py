"""The W&B sink in offline mode: what it logs reaches the run and its files."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("wandb")
import wandb  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.plugins import Hooks, make_plugin_manager  # noqa: E402
from gradwatch.sinks import WandbSink  # noqa: E402
from gradwatch.testing import nan_at  # noqa: E402


def test_wandb_sink_offline_logs_scalars_tables_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="gradwatch-test", dir=str(tmp_path), mode="offline",
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    try:
        monitor = gradwatch.Monitor(hooks=Hooks(make_plugin_manager(autoload=False)))
        sink = WandbSink(run, max_groups=3).attach(monitor)
        stream = list(nan_at(step=4, steps=8))
        for stats in stream:
            monitor.observe(stats)
        report = monitor.finish()
        assert run.summary["grad_norm/total"] == pytest.approx(stream[-1].global_norm)
        assert run.summary["gradwatch/step"] == 7
        assert run.summary["gradwatch/healthy"] is False
        assert run.summary["gradwatch/findings/nonfinite"] == 1 and run.summary["gradwatch/actions/skip_step"] == 1
        assert run.summary["gradwatch/steps_measured"] == report.steps_measured == 8
        assert run.summary["gradwatch/lr_factor"] == 1.0 and run.summary["gradwatch/skipped"] == 0.0
        sink.detach()
    finally:
        run.finish()
    # Offline, W&B keeps history and summary in its binary run file; the tables are plain JSON.
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/gradwatch/findings_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:5] == ["step", "last_step", "count", "kind", "severity"]
    assert [row[3] for row in table["data"]] == ["nonfinite"]


def test_wandb_sink_without_a_run_says_what_to_do(monkeypatch):
    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(RuntimeError, match="call wandb.init"):
        _ = WandbSink().run
