from __future__ import annotations

import base64
import re
import sys

import pytest

pytest.importorskip("matplotlib")

from gradwatch import MissingExtraError, Report  # noqa: E402


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_page_is_self_contained_with_two_figures(make_report):
    html = make_report("exploding", policy="auto", onset=30, steps=60).to_html(title="models.py:build_mlp")
    pngs = images(html)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5000 for p in pngs)
    assert not re.search(r'(src|href)="(?!data:)', html), "everything must be embedded"
    assert "UNHEALTHY" in html and "models.py:build_mlp" in html
    assert "<b>exploding</b>" in html and "What to do" in html
    assert "clip" in html  # the actions table of the auto policy


def test_healthy_page_says_so(make_report):
    html = make_report("healthy", steps=60).to_html()
    assert ">HEALTHY<" in html and "No findings" in html and "UNHEALTHY" not in html


def test_layer_names_and_messages_are_escaped(odd_report):
    html = odd_report.to_html(title="<b>t</b>")
    assert '<script>alert("x")</script>' not in html and "&lt;script&gt;alert(&quot;x&quot;)" in html
    assert "a&amp;b $x$ &#x27;q&#x27;" in html
    assert "\x01" not in html and "<b>t</b>" not in html


def test_missing_matplotlib_names_the_extra(make_report, monkeypatch):
    report = make_report("healthy", steps=10)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'gradwatch\[report\]'"):
        report.to_html()
    with pytest.raises(MissingExtraError, match=r"gradwatch\[report\]"):
        report.plot("heatmap")


def test_a_report_read_back_from_json_renders_the_same_figures(make_report):
    report = make_report("nan", step=10, steps=30)
    again = Report.from_json(report.to_json())
    html = again.to_html()
    assert len(images(html)) == 2 and "nonfinite" in html


def test_empty_report_renders():
    html = Report(healthy=True).to_html()
    assert len(images(html)) == 2 and "No layers measured" in html


def test_a_pytorch_run_renders_its_report_at_the_end_of_training(tmp_path):
    torch = pytest.importorskip("torch")
    import gradwatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, optimizer) as watch:
        for _ in range(12):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(torch.randn(16, 4)), torch.randn(16, 1))
            loss.backward()
            watch.record_loss(loss)
            optimizer.step()
    report = watch.report()
    html = report.to_html(title="end of training")
    assert len(images(html)) == 2 and ">HEALTHY<" in html and "<code>0</code>" in html
    report.plot("heatmap", path=tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
