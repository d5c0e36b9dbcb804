"""The HTML report in a real browser: Debian's headless Chromium (``apt-get install chromium``)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)"
)

# Put into a copy of the page: record any script error (from the head on) and, after load, whether
# every image decoded, as attributes on <html> that --dump-dom serialises.
CATCH = """<head><script>
window.addEventListener("error", e => document.documentElement.setAttribute("data-error", String(e.message)), true);
</script>"""
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.documentElement.setAttribute("data-images", String(imgs.length));
  document.documentElement.setAttribute("data-decoded", String(imgs.filter(i => i.complete && i.naturalWidth > 400).length));
  document.documentElement.setAttribute("data-width", String(document.documentElement.scrollWidth));
});
</script></body>"""


def with_probe(html: str) -> str:
    assert html.count("<head>") == 1 and html.count("</body>") == 1
    return html.replace("<head>", CATCH).replace("</body>", PROBE)


def test_probe_sees_broken_images_and_script_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(with_probe('<html><head></head><body><img src="data:image/png;base64,AAAA">'
                               '<script>throw new Error("boom")</script></body></html>'))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()).stdout
    assert 'data-decoded="0"' in dom and 'data-error="' in dom  # resource and script errors both count


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_report_renders_in_chromium_with_its_figures(make_report, odd_report, tmp_path):
    report = make_report("exploding", policy="auto", onset=30, steps=60)
    page = tmp_path / "report.html"
    page.write_text(report.to_html(title="models.py:build_mlp"), encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(with_probe(page.read_text(encoding="utf-8")), encoding="utf-8")

    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images="2"' in dom.stdout and 'data-decoded="2"' in dom.stdout, dom.stdout[:500]
    assert 'data-error="' not in dom.stdout
    width = int(dom.stdout.split('data-width="')[1].split('"')[0])
    assert width <= 1200, "the page must not scroll sideways at 1200 px"

    shot = tmp_path / "report.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    header = pixels[30:80, 100:1100]
    assert (abs(header - header.mean((0, 1))) < 0.2).mean() > 0.8  # the verdict banner is drawn
    assert header[..., 0].mean() > header[..., 1].mean() + 0.2  # ... and red: UNHEALTHY
    assert pixels.std() > 0.1  # figures, not a blank page

    odd = tmp_path / "odd.html"
    odd.write_text(with_probe(odd_report.to_html()), encoding="utf-8")
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", odd.as_uri())
    assert 'data-decoded="2"' in dom.stdout and 'data-error="' not in dom.stdout
    assert "alert(" in dom.stdout and "<script>alert" not in dom.stdout  # shown as text, never run
