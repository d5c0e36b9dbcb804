"""A :class:`~gradwatch.Report` as one self-contained HTML page.

The page holds the verdict, the findings with what to do about each, the figures of
:mod:`gradwatch.report.figures` embedded as PNG (``data:`` URIs, so the file can be attached to a
CI run and opened anywhere, offline), the per-layer table and the actions. Every name that comes
from the model (layer names, messages) is escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import re
from html import escape as _html_escape
from typing import TYPE_CHECKING, Any

from gradwatch.advice import advice_for
from gradwatch.findings import severity_rank
from gradwatch.report.figures import (
    global_norm_figure,
    heatmap_figure,
    png_bytes,
    require_matplotlib,
)

if TYPE_CHECKING:
    from gradwatch.report.base import Report

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def escape(text: str) -> str:
    """HTML-escaped text, control characters (legal in layer names, not in HTML) shown as U+FFFD."""
    return _CONTROL.sub("\ufffd", _html_escape(str(text), quote=True))


_CSS = """
:root { --ok: #1e7b3c; --bad: #b3261e; --warn: #a15c00; --info: #1f5f99; --ink: #1d2330;
        --muted: #5b6475; --line: #e2e6ee; --bg: #f6f7fb; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header { border-radius: 10px; padding: 18px 22px; color: white; display: flex; flex-wrap: wrap;
         align-items: center; gap: 8px 18px; }
header.healthy { background: var(--ok); } header.unhealthy { background: var(--bad); }
header h1 { margin: 0; font-size: 24px; letter-spacing: .2px; }
header .verdict { font-weight: 700; font-size: 15px; padding: 3px 12px; border-radius: 999px;
                  background: rgba(255,255,255,.18); border: 1px solid rgba(255,255,255,.5); }
header .meta { flex-basis: 100%; margin: 0; opacity: .93; font-size: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin: 18px 0 6px; }
.card { background: white; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .n { font-size: 24px; font-weight: 700; } .card .l { color: var(--muted); font-size: 13px; }
.card.error .n { color: var(--bad); } .card.warning .n { color: var(--warn); }
section { background: white; border: 1px solid var(--line); border-radius: 10px; padding: 6px 20px 16px;
          margin-top: 18px; }
h2 { font-size: 18px; margin: 14px 0 10px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 13px; background: #fafbfd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td code, li code { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
tr.nonfinite td { background: #fdecea; } tr.flagged td { background: #fff6e5; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px; font-weight: 700;
        color: white; text-transform: uppercase; letter-spacing: .3px; }
.pill.error { background: var(--bad); } .pill.warning { background: var(--warn); } .pill.info { background: var(--info); }
.advice { margin: 12px 0 0; padding: 0; list-style: none; }
.advice li { margin: 6px 0; padding: 8px 12px; background: #f3f6fb; border-left: 4px solid var(--info);
             border-radius: 4px; }
figure { margin: 8px 0 14px; } figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.none { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; margin-top: 22px; text-align: center; }
"""


def _num(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and math.isnan(value):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _layers_cell(layers: tuple[str, ...] | list[str], limit: int = 8) -> str:
    if not layers:
        return '<span class="none">–</span>'
    shown = ", ".join(f"<code>{escape(str(n))}</code>" for n in layers[:limit])
    more = f" <span class='none'>+{len(layers) - limit} more</span>" if len(layers) > limit else ""
    return shown + more


def _img(fig: Any, alt: str) -> str:
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _findings_section(report: Report) -> str:
    findings = sorted(report.findings, key=lambda f: (-severity_rank(f.severity), f.step))
    if not findings:
        return "<section id='findings'><h2>Findings</h2><p class='none'>No findings: the gradients look healthy.</p></section>"
    rows = []
    for f in findings:
        span = f"{f.step}" if f.count <= 1 else f"{f.step}–{f.last_step} <span class='none'>(×{f.count})</span>"
        rows.append(
            f"<tr><td><span class='pill {escape(f.severity)}'>{escape(f.severity)}</span></td>"
            f"<td><b>{escape(f.kind)}</b></td><td class='num'>{span}</td><td>{_layers_cell(f.layers)}</td>"
            f"<td>{escape(f.message)}</td></tr>"
        )
    kinds = list(dict.fromkeys(f.kind for f in findings))
    advice = "".join(f"<li><b>{escape(k)}</b>: {escape(advice_for(k))}</li>" for k in kinds)
    return (
        "<section id='findings'><h2>Findings</h2><table><thead><tr><th>severity</th><th>kind</th>"
        "<th class='num'>steps</th><th>layers</th><th>what was seen</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table><h2>What to do</h2><ul class='advice'>" + advice + "</ul></section>"
    )


def _layers_section(report: Report) -> str:
    if not report.layers:
        return "<section id='layers'><h2>Layers</h2><p class='none'>No layers measured.</p></section>"
    flagged = {n for f in report.findings if f.severity != "info" for n in f.layers}
    rows = []
    for layer in report.layers:
        name = str(layer["layer"])
        bad = layer.get("nonfinite_steps", 0)
        cls = "nonfinite" if bad else ("flagged" if name in flagged else "")
        dead = layer.get("dead_fraction", math.nan)
        dead_text = "–" if dead is None or math.isnan(dead) else f"{dead:.0%}"
        rows.append(
            f"<tr class='{cls}'><td><code>{escape(name)}</code></td>"
            f"<td>{escape(', '.join(layer.get('roles', [])))}</td>"
            f"<td class='num'>{_num(layer.get('numel'), ',')}</td>"
            f"<td class='num'>{_num(layer.get('grad_norm'))}</td><td class='num'>{_num(layer.get('grad_norm_max'))}</td>"
            f"<td class='num'>{_num(layer.get('param_norm'))}</td><td class='num'>{_num(layer.get('ratio'))}</td>"
            f"<td class='num'>{dead_text}</td><td class='num'>{int(bad)}</td></tr>"
        )
    return (
        "<section id='layers'><h2>Layers</h2><table><thead><tr><th>layer (input first)</th><th>roles</th>"
        "<th class='num'>parameters</th><th class='num'>grad norm (last)</th><th class='num'>max</th>"
        "<th class='num'>param norm</th><th class='num'>grad / param</th><th class='num'>dead units</th>"
        "<th class='num'>non-finite steps</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _actions_section(report: Report) -> str:
    if not report.actions and not report.skipped_steps:
        text = ("policy 'observe' takes no action." if report.policy == "observe" else "No action was needed.")
        return f"<section id='actions'><h2>Actions</h2><p class='none'>{escape(text)}</p></section>"
    parts = ["<section id='actions'><h2>Actions</h2>"]
    if report.skipped_steps:
        parts.append(f"<p>{report.skipped_steps} step(s) skipped by the loss scaler (inf/NaN in the scaled "
                     "gradients); not counted as explosions.</p>")
    if report.actions:
        counts = ", ".join(f"{escape(k)} ×{n}" for k, n in sorted(report.action_counts.items()))
        parts.append(f"<p>{counts}</p><table><thead><tr><th class='num'>step</th><th>action</th>"
                     "<th>because of</th><th>what was done</th></tr></thead><tbody>")
        shown = report.actions[-200:]
        if len(report.actions) > len(shown):
            parts.append(f"<tr><td colspan='4' class='none'>… {len(report.actions) - len(shown)} earlier actions …</td></tr>")
        for a in shown:
            parts.append(f"<tr><td class='num'>{a.step}</td><td><b>{escape(a.kind)}</b></td>"
                         f"<td>{escape(a.reason)}</td><td>{escape(a.message)}</td></tr>")
        parts.append("</tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def _cards(report: Report) -> str:
    by_severity = {"error": 0, "warning": 0, "info": 0}
    for f in report.findings:  # episodes: repeats on consecutive steps are merged into one finding
        by_severity[f.severity] = by_severity.get(f.severity, 0) + 1
    cards = [
        ("", report.steps_measured, "steps measured"),
        ("error" if by_severity["error"] else "", by_severity["error"], "errors"),
        ("warning" if by_severity["warning"] else "", by_severity["warning"], "warnings"),
        ("", sum(report.action_counts.values()), "actions taken"),
        ("", len(report.layers), "layers"),
    ]
    return "<div class='cards'>" + "".join(
        f"<div class='card {cls}'><div class='n'>{n}</div><div class='l'>{escape(label)}</div></div>"
        for cls, n, label in cards
    ) + "</div>"


def to_html(report: Report, *, title: str = "", fail_on: str = "warning") -> str:
    """Render a report as one self-contained HTML page.

    Args:
        report: The report.
        title: What was checked (a ``gradwatch check`` target, a test id), shown in the header.
            Defaults to "" (none).
        fail_on: The severity the verdict is judged at (as ``gradwatch check --fail-on``).
            Defaults to ``"warning"``, which matches :attr:`Report.healthy`.

    Returns:
        The HTML document.

    Raises:
        MissingExtraError: without matplotlib (``pip install 'gradwatch[report]'``).
    """
    from gradwatch import __version__

    require_matplotlib()
    failed = report.fails(fail_on)
    verdict = "UNHEALTHY" if failed else "HEALTHY"
    span = f"steps {report.first_step}–{report.last_step}" if report.steps_measured else "no steps"
    meta = " · ".join(escape(x) for x in (
        title, report.framework or "", f"policy {report.policy}" if report.policy else "",
        f"{report.steps_measured} steps measured ({span})",
    ) if x)
    heatmap = heatmap_figure(report, title=False)
    timeline = global_norm_figure(report, title=False)
    history_note = ""
    steps = (report.history or {}).get("steps", [])
    if steps and report.steps_measured > len(steps):
        history_note = f" The figures show the last {len(steps)} measured steps."
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gradwatch: {verdict}{(" — " + escape(title)) if title else ""}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header class="{verdict.lower()}"><h1>gradwatch report</h1><span class="verdict">{verdict}</span>
<p class="meta">{meta}</p></header>
{_cards(report)}
{_findings_section(report)}
<section id="figures"><h2>Gradient norm per layer</h2>
<figure>{_img(heatmap, "Heatmap of each layer's gradient norm over the steps")}
<figcaption>log10 of each layer's gradient norm (colour) per optimizer step; input layer at the top.
Dashed lines mark where findings start.{history_note}</figcaption></figure>
<h2>Global gradient norm and actions</h2>
<figure>{_img(timeline, "Global gradient norm over the steps, with the actions taken")}
<figcaption>Shaded spans: findings (orange warning, red error). Markers: actions taken.</figcaption></figure>
</section>
{_layers_section(report)}
{_actions_section(report)}
<footer>gradwatch {escape(__version__)} · generated {generated}</footer>
</main>
</body>
</html>
"""
