from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def test_plot_returns_figures_and_saves(make_report, tmp_path):
    report = make_report("exploding", policy="auto", onset=30, steps=60)
    fig = report.plot("global_norm", path=tmp_path / "norm.png")
    assert (tmp_path / "norm.png").read_bytes().startswith(b"\x89PNG")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # the norm spans many decades
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    acted = {a.kind.replace("_", " ") for a in report.actions} & {"clip", "lr decay"}
    assert acted and {"global gradient norm", *acted} <= labels  # each remedy taken is marked
    heat = report.plot("heatmap", path=tmp_path / "heat.svg")
    assert (tmp_path / "heat.svg").exists()
    assert [t.get_text() for t in heat.axes[0].get_yticklabels()] == [f"fc{i}" for i in range(5)]


def test_heatmap_marks_nonfinite_layers(make_report):
    fig = make_report("nan", step=10, steps=30).plot("heatmap")
    legend = fig.axes[0].get_legend()
    assert legend is not None and "non-finite (NaN/Inf)" in {t.get_text() for t in legend.get_texts()}


def test_layer_names_are_not_mathtext(odd_report):
    fig = odd_report.plot("heatmap")
    labels = fig.axes[0].get_yticklabels()
    assert "a&b $x$ 'q'" in [t.get_text() for t in labels]
    assert all(not t.get_parse_math() for t in labels)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # $x$ would render as math if parsed; control characters must not break it


def test_unknown_kind_is_rejected(make_report):
    with pytest.raises(ValueError, match="kind must be one of"):
        make_report("healthy", steps=5).plot("histogram")


def test_long_module_paths_keep_their_specific_end():
    from gradwatch import Layout, Monitor, StepStats

    names = [f"transformer.encoder.layers.{b}.attention.{p}.weight" for b in range(12) for p in ("q_proj", "v_proj")]
    layout = Layout.from_names(names, numel=[16] * len(names))
    monitor = Monitor(policy="observe")
    for step in range(5):
        monitor.observe(StepStats(step=step, layout=layout, grad_norm=[0.1] * len(names), param_norm=[1.0] * len(names)))
    ax = monitor.report().plot("heatmap").axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:3] == ["0.attention.q_proj", "0.attention.v_proj", "1.attention.q_proj"]
    assert ax.get_ylabel() == "layer in transformer.encoder.layers.… (input at the top)"
