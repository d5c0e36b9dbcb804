"""The TensorBoard sink writes event files that TensorBoard itself reads back."""

from __future__ import annotations

import math
import sys
import types

import pytest

pytest.importorskip("tensorboard")
# Reading event files needs no TensorFlow: ``tensorboard.compat.notf`` is tensorboard's own switch
# to its TF-free stub (otherwise EventAccumulator imports TensorFlow, ~4 s, when it is installed).
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.plugins import Hooks, make_plugin_manager  # noqa: E402
from gradwatch.sinks import TensorBoardSink, grouped_grad_norms  # noqa: E402
from gradwatch.testing import nan_at  # noqa: E402


def _load(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_sink_scalars_text_and_histograms(tmp_path):
    monitor = gradwatch.Monitor(hooks=Hooks(make_plugin_manager(autoload=False)))
    sink = TensorBoardSink(tmp_path / "tb", histograms=True, max_groups=3).attach(monitor)
    stream = list(nan_at(step=4, steps=8, layers=5))
    for stats in stream:
        monitor.observe(stats)
    monitor.finish()
    sink.detach()

    acc = _load(tmp_path / "tb")
    tags = acc.Tags()
    groups = list(grouped_grad_norms(stream[0], max_groups=3))
    assert len(groups) == 3
    assert set(tags["scalars"]) == {
        "grad_norm/total", *(f"grad_norm/{g}" for g in groups), "gradwatch/lr_factor",
        "gradwatch/clipped", "gradwatch/skipped", "gradwatch/loss",
    }
    total = acc.Scalars("grad_norm/total")
    assert [e.step for e in total] == list(range(8))
    for event, stats in zip(total, stream):
        if stats.finite:
            assert event.value == pytest.approx(stats.global_norm, rel=1e-6)
        else:
            assert not math.isfinite(event.value)
    first_group = acc.Scalars(f"grad_norm/{groups[0]}")
    assert first_group[0].value == pytest.approx(grouped_grad_norms(stream[0], 3)[groups[0]], rel=1e-6)
    assert [e.value for e in acc.Scalars("gradwatch/skipped")] == [0, 0, 0, 0, 1, 0, 0, 0]
    assert [e.step for e in acc.Histograms("gradwatch/tensor_grad_norm")] == list(range(8))
    # Findings, actions and the report are text summaries (tensors of the "text" plugin).
    assert {"gradwatch/findings", "gradwatch/actions", "gradwatch/report"} <= set(tags["tensors"])
    (finding,) = acc.Tensors("gradwatch/findings")
    assert finding.step == 4
    assert finding.tensor_proto.string_val[0].decode().startswith("[error] nonfinite at step 4")


def test_tensorboard_sink_into_an_existing_writer(tmp_path):
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    writer = torch_tb.SummaryWriter(str(tmp_path / "tw"))
    monitor = gradwatch.Monitor(hooks=Hooks(make_plugin_manager(autoload=False)))
    with TensorBoardSink(writer=writer, every=2).attach(monitor):
        for stats in nan_at(step=50, steps=5):
            monitor.observe(stats)
    writer.close()
    assert [e.step for e in _load(tmp_path / "tw").Scalars("grad_norm/total")] == [0, 2, 4]


def test_tensorboard_sink_needs_exactly_one_destination(tmp_path):
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardSink()
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardSink(tmp_path, writer=object())
