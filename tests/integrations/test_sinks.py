"""The core sinks (JSON Lines, logging), grouping, per-run attachment and failure isolation."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest

import gradwatch
from gradwatch.plugins import Hooks, make_plugin_manager
from gradwatch.sinks import (
    JsonlSink,
    LoggingSink,
    Sink,
    group_layers,
    grouped_grad_norms,
    read_jsonl,
    resolve_sinks,
    step_scalars,
)
from gradwatch.testing import exploding_stream, healthy, nan_at


def _monitor(**kwargs) -> gradwatch.Monitor:
    """A monitor with its own plugin manager, so tests never leak sinks into each other."""
    return gradwatch.Monitor(hooks=Hooks(make_plugin_manager(autoload=False)), **kwargs)


def _run(monitor: gradwatch.Monitor, stream) -> gradwatch.Report:
    for stats in stream:
        monitor.observe(stats)
    return monitor.finish()


def test_group_layers_picks_the_deepest_level_that_fits():
    names = [
        "bert.embeddings.word_embeddings", "bert.embeddings.LayerNorm", "bert.encoder.layer.0.attention",
        "bert.encoder.layer.0.output", "bert.encoder.layer.1.attention", "bert.encoder.layer.1.output",
        "bert.pooler.dense", "classifier",
    ]
    groups, index = group_layers(names, max_groups=5)
    assert groups == ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler", "classifier")
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    groups, _ = group_layers(names, max_groups=4)
    assert groups == ("bert.embeddings", "bert.encoder", "bert.pooler", "classifier")
    groups, _ = group_layers(names, max_groups=1)
    assert groups == ("bert..classifier",)


def test_group_layers_merges_a_long_sequential_into_runs():
    names = [str(i) for i in range(20)]
    groups, index = group_layers(names, max_groups=4)
    assert groups == ("0..4", "5..9", "10..14", "15..19")
    assert index.tolist() == [i // 5 for i in range(20)]
    with pytest.raises(ValueError, match="max_groups must be >= 1"):
        group_layers(names, max_groups=0)


def test_grouped_norms_combine_tensors_and_skip_groups_without_gradients():
    layout = gradwatch.Layout.from_names(["enc.0.weight", "enc.1.weight", "head.weight"], numel=[4, 4, 2])
    stats = gradwatch.StepStats(0, layout, grad_norm=[3.0, 4.0, 1.0], has_grad=[True, True, False])
    assert grouped_grad_norms(stats, max_groups=2) == {"enc": 5.0}
    scalars = step_scalars(stats, gradwatch.Decision(step=0, clip_norm=2.0, lr_factor=0.5), max_groups=2)
    assert scalars == {
        "grad_norm/total": 5.0, "grad_norm/enc": 5.0, "gradwatch/lr_factor": 0.5,
        "gradwatch/clipped": 1.0, "gradwatch/skipped": 0.0,
    }


def test_jsonl_sink_writes_steps_findings_actions_and_report(tmp_path):
    path = tmp_path / "logs" / "run.jsonl"
    monitor = _monitor()
    sink = JsonlSink(path).attach(monitor)
    report = _run(monitor, nan_at(step=5, steps=10))
    sink.detach()
    records = read_jsonl(path)
    events = [r["event"] for r in records]
    assert events.count("step") == 10 and events[-1] == "report"
    finding = next(r for r in records if r["event"] == "finding")
    assert finding["kind"] == "nonfinite" and finding["step"] == 5 and finding["severity"] == "error"
    action = next(r for r in records if r["event"] == "action")
    assert action["kind"] == "skip_step" and action["step"] == 5
    steps = [r for r in records if r["event"] == "step"]
    assert steps[5]["global_norm"] is None and steps[5]["skip"] is True  # NaN is null, as in reports
    assert steps[4]["global_norm"] == pytest.approx(report.history["global_norm"][4])
    assert set(steps[0]["grad_norm"]) == {"fc0", "fc1", "fc2", "fc3", "fc4"}
    assert records[-1]["report"]["healthy"] is False
    # Appending: a resumed run continues the file.
    monitor2 = _monitor()
    with JsonlSink(str(path)).attach(monitor2):
        _run(monitor2, healthy(steps=3))
    assert len(read_jsonl(path)) == len(records) + 4


def test_jsonl_sink_every_thins_steps_but_keeps_every_finding(tmp_path):
    path = tmp_path / "run.jsonl"
    monitor = _monitor()
    with JsonlSink(path, every=10).attach(monitor):
        _run(monitor, exploding_stream(onset=40, steps=60))
    records = read_jsonl(path)
    assert [r["step"] for r in records if r["event"] == "step"] == [0, 10, 20, 30, 40, 50]
    assert any(r["event"] == "action" and r["kind"] in ("clip", "lr_decay") for r in records)
    for line in path.read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN/Infinity literals


def test_an_attached_sink_ignores_other_monitors(tmp_path):
    manager = make_plugin_manager(autoload=False)
    mine, other = gradwatch.Monitor(hooks=Hooks(manager)), gradwatch.Monitor(hooks=Hooks(manager))
    path = tmp_path / "mine.jsonl"
    sink = JsonlSink(path).attach(mine)
    _run(other, nan_at(step=2, steps=4))
    _run(mine, healthy(steps=3))
    sink.detach()
    records = read_jsonl(path)
    assert [r["event"] for r in records] == ["step", "step", "step", "report"]
    assert records[-1]["report"]["healthy"] is True
    sink.detach()  # twice is safe
    assert not manager.is_registered(sink)


def test_a_registered_sink_sees_every_monitor(tmp_path):
    manager = make_plugin_manager(autoload=False)
    path = tmp_path / "all.jsonl"
    sink = JsonlSink(path).register(manager)
    for _ in range(2):
        _run(gradwatch.Monitor(hooks=Hooks(manager)), healthy(steps=2))
    sink.detach()
    assert [r["event"] for r in read_jsonl(path)].count("report") == 2


def test_logging_sink_levels(caplog):
    monitor = _monitor()
    with LoggingSink("gradwatch.test").attach(monitor), caplog.at_level(logging.DEBUG, logger="gradwatch.test"):
        _run(monitor, nan_at(step=3, steps=5))
    by_level = {}
    for rec in caplog.records:
        by_level.setdefault(rec.levelname, []).append(rec.getMessage())
    assert any("nonfinite at step 3" in m for m in by_level["ERROR"])
    assert any("skip_step at step 3" in m for m in by_level["WARNING"])
    assert any(m.startswith("gradwatch report:") for m in by_level["WARNING"])
    assert len([m for m in by_level["DEBUG"] if m.startswith("gradwatch step")]) == 5


def test_logging_sink_is_silent_on_a_healthy_run_at_warning_level(caplog):
    monitor = _monitor()
    with LoggingSink().attach(monitor), caplog.at_level(logging.WARNING, logger="gradwatch"):
        _run(monitor, healthy(steps=50))
    assert caplog.records == []


class _Broken(Sink):
    def write_step(self, stats, decision, monitor):
        raise OSError("disk full")


def test_a_failing_sink_warns_once_and_training_goes_on():
    monitor = _monitor()
    sink = _Broken().attach(monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _run(monitor, healthy(steps=5))
    assert report.steps_measured == 5
    assert [str(w.message)[:36] for w in caught] == ["gradwatch sink _Broken failed (OSErr"]
    assert issubclass(caught[0].category, gradwatch.GradwatchWarning)
    strict = _Broken(strict=True).attach(_monitor())
    with pytest.raises(OSError, match="disk full"):
        strict.monitors[0].observe(next(healthy(steps=1)))
    sink.detach()
    strict.detach()


def test_a_third_party_plugin_with_only_some_arguments_works():
    seen = []

    class PrintSink:
        @gradwatch.hookimpl
        def gradwatch_on_report(self, report):
            seen.append(report.healthy)

    manager = make_plugin_manager(autoload=False)
    manager.register(PrintSink())
    _run(gradwatch.Monitor(hooks=Hooks(manager)), healthy(steps=2))
    assert seen == [True]


def test_resolve_sinks(tmp_path):
    assert resolve_sinks(None) == []
    (only,) = resolve_sinks(tmp_path / "a.jsonl")
    assert isinstance(only, JsonlSink) and only.path == str(tmp_path / "a.jsonl")
    log = LoggingSink()
    assert resolve_sinks([log, str(tmp_path / "b.jsonl")])[0] is log
    with pytest.raises(TypeError, match="Each sink must be a gradwatch.sinks.Sink"):
        resolve_sinks([42])
    with pytest.raises(ValueError, match="every and max_groups must be >= 1"):
        JsonlSink(tmp_path / "c.jsonl", every=0)


def test_step_scalars_keep_non_finite_values():
    stats = next(iter(nan_at(step=0, steps=1)))
    scalars = step_scalars(stats)
    assert math.isnan(scalars["grad_norm/total"]) or math.isinf(scalars["grad_norm/total"])
    assert np.isfinite(scalars["grad_norm/fc4"])
