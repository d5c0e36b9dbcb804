"""A :class:`~gradwatch.doctor.DoctorResult` as one self-contained HTML page, and its figures.

The page holds the baseline's verdict, the causes with their evidence, the loss curves of every
trial on one plot (the baseline dashed, the best repair bold), the per-layer gradient heatmaps of
the baseline and of the best repair side by side on one colour scale (:func:`heatmaps_figure`),
the ranked table, and the exact change as a diff-like snippet. Figures are embedded as PNG
``data:`` URIs; every name that comes from the model is escaped. matplotlib is imported only here,
through :func:`gradwatch.report.figures.require_matplotlib`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.report.figures import png_bytes, require_matplotlib
from gradwatch.report.html import escape

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gradwatch.doctor.result import DoctorResult

__all__ = ["heatmaps_figure", "loss_figure", "to_html"]

_CSS = """
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2330; background: #f6f7fb; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header { border-radius: 10px; padding: 18px 22px; color: white; }
header.repaired { background: #1e7b3c; } header.unrepaired { background: #b3261e; } header.healthy { background: #1f5f99; }
header h1 { margin: 0; font-size: 24px; } header p { margin: 4px 0 0; opacity: .93; }
section { background: white; border: 1px solid #e2e6ee; border-radius: 10px; padding: 6px 20px 16px; margin-top: 18px; }
h2 { font-size: 18px; margin: 14px 0 10px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #e2e6ee; vertical-align: top; }
th { color: #5b6475; font-weight: 600; font-size: 13px; background: #fafbfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.best td { background: #e9f6ee; } tr.baseline td { background: #f3f6fb; }
code, pre { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; }
pre { background: #f6f8fa; border-radius: 6px; padding: 10px 12px; overflow-x: auto; }
pre .add { color: #116329; background: #dafbe1; display: block; } pre .del { color: #82071e; background: #ffebe9; display: block; }
figure { margin: 8px 0 14px; } figure img { width: 100%; height: auto; display: block; }
figcaption { color: #5b6475; font-size: 13px; margin-top: 4px; }
.none { color: #5b6475; }
footer { color: #5b6475; font-size: 12px; margin-top: 22px; text-align: center; }
"""


def _img(fig: Any, alt: str) -> str:
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def loss_figure(result: DoctorResult, *, width: float = 11.0) -> Figure:
    """The training loss of every trial that ran, on one plot, log-scaled when it spans decades.

    Args:
        result: The doctor's result.
        width: Figure width in inches. Defaults to 11.0.

    Returns:
        The figure (drawn on its own :class:`matplotlib.figure.Figure`, no ``pyplot``).

    Raises:
        MissingExtraError: without matplotlib.
    """
    mpl = require_matplotlib()
    from matplotlib.figure import Figure

    best = result.best
    with mpl.rc_context({"text.parse_math": False, "font.size": 10, "axes.spines.top": False, "axes.spines.right": False}):
        fig = Figure(figsize=(width, 4.2), layout="constrained")
        ax = fig.add_subplot()
        values: list[float] = []
        for trial in result.trials:
            if not trial.losses:
                continue
            losses = np.asarray(trial.losses, dtype=float)
            losses[~np.isfinite(losses)] = np.nan
            values += [v for v in losses if np.isfinite(v)]
            style: dict[str, Any]
            if trial.is_baseline:
                style = {"color": "#333333", "linestyle": "--", "linewidth": 2.0, "zorder": 3}
            elif best is not None and trial is best:
                style = {"color": "#1e7b3c", "linewidth": 2.6, "zorder": 4}
            else:
                style = {"linewidth": 1.0, "alpha": 0.75}
            label = trial.name + ("" if trial.completed or trial.is_baseline else f" (stopped at {len(trial.losses)})")
            ax.plot(np.arange(len(losses)), losses, label=label, **style)
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        if values:
            ax.legend(loc="best", fontsize=8, frameon=False)
        else:
            ax.text(0.5, 0.5, "no trial ran", ha="center", va="center", transform=ax.transAxes)
    return fig


def _grid(report: Any) -> tuple[list[str], np.ndarray]:
    history = (report.history if report is not None else None) or {}
    names = [str(n) for n in history.get("layer_names", [])]
    rows = np.asarray(history.get("layer_grad_norm", []), dtype=float)
    return names, rows.reshape(-1, len(names)).T if names and rows.size else np.zeros((0, 0))


def heatmaps_figure(before: Any, after: Any, *, labels: tuple[str, str] = ("before", "after"), width: float = 11.0) -> Figure:
    """Each layer's gradient norm over the steps, for two reports side by side on one colour
    scale (log10), input layer at the top; non-finite gradients red.

    Args:
        before: The baseline's :class:`~gradwatch.Report`.
        after: The repaired run's report, or None.
        labels: The panels' titles. Defaults to ``("before", "after")``.
        width: Figure width in inches. Defaults to 11.0.

    Returns:
        The figure.

    Raises:
        MissingExtraError: without matplotlib.
    """
    mpl = require_matplotlib()
    from matplotlib.figure import Figure

    panels = [(labels[0], *_grid(before)), (labels[1], *_grid(after))]
    finite = np.concatenate([g[np.isfinite(g) & (g > 0)].ravel() for _, _, g in panels if g.size] or [np.ones(1)])
    logs = np.log10(finite)
    lo, hi = np.percentile(logs, [1, 99])
    if hi - lo < 2.0:
        lo, hi = (hi + lo) / 2 - 1.0, (hi + lo) / 2 + 1.0
    rows = max([len(names) for _, names, _ in panels] + [3])
    with mpl.rc_context({"text.parse_math": False, "font.size": 9}):
        fig = Figure(figsize=(width, min(2.2 + 0.24 * rows, 14.0)), layout="constrained")
        axes = fig.subplots(1, 2)
        mesh = None
        for ax, (title, names, grid) in zip(axes, panels):
            ax.set_title(title, fontsize=10)
            if not grid.size:
                ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(grid > 0, np.log10(grid), lo)
            bad = ~np.isfinite(grid)
            ax.set_facecolor("#d62728")
            mesh = ax.pcolormesh(np.arange(grid.shape[1] + 1) - 0.5, np.arange(len(names) + 1) - 0.5,
                                 np.ma.masked_where(bad, values), cmap="viridis", vmin=lo, vmax=hi, shading="flat")
            ax.set_ylim(len(names) - 0.5, -0.5)
            every = max(1, math.ceil(len(names) / 40))
            ax.set_yticks(list(range(0, len(names), every)), [names[i][-28:] for i in range(0, len(names), every)])
            ax.set_xlabel("step")
        if mesh is not None:
            fig.colorbar(mesh, ax=list(axes), pad=0.01, fraction=0.03).set_label("log10 gradient norm")
    return fig


def _snippet(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("+"):
            lines.append(f"<span class='add'>{escape(line)}</span>")
        elif line.startswith("-"):
            lines.append(f"<span class='del'>{escape(line)}</span>")
        else:
            lines.append(escape(line) + "\n")
    return "<pre>" + "".join(lines) + "</pre>"


def _num(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, ".3g")


def _causes(result: DoctorResult) -> str:
    if not result.causes:
        return "<p class='none'>No cause found.</p>"
    rows = "".join(
        f"<tr><td><b>{escape(c.kind)}</b></td><td><code>{escape(', '.join(c.layers[:8]))}"
        f"{' …' if len(c.layers) > 8 else ''}</code></td><td>{escape(c.message)}</td></tr>"
        for c in result.causes
    )
    return f"<table><tr><th>cause</th><th>layers</th><th>evidence</th></tr>{rows}</table>"


def _table(result: DoctorResult) -> str:
    base = result.baseline
    best = result.best
    rows = []
    for i, t in enumerate(result.trials, start=1):
        css = "best" if best is not None and t is best else ("baseline" if t.is_baseline else "")
        if t.not_tried:
            rows.append(f"<tr><td>–</td><td>{escape(t.name)}</td><td colspan='5' class='none'>not tried: {escape(t.not_tried)}</td></tr>")
            continue
        versus = "–"
        if not t.is_baseline and math.isfinite(t.final_loss) and math.isfinite(base.final_loss) and base.final_loss > 0:
            versus = f"{(t.final_loss - base.final_loss) / base.final_loss:+.0%}"
        note = t.error or t.stopped or ", ".join(t.finding_kinds)
        rows.append(
            f"<tr class='{css}'><td class='num'>{i}</td><td>{escape(t.name)}</td><td class='num'>{_num(t.final_loss)}</td>"
            f"<td class='num'>{versus}</td><td>{'yes' if t.healthy else 'no'}</td><td class='num'>{len(t.losses)}</td>"
            f"<td class='num'>{t.seconds:.2f}</td><td>{escape(note)}</td></tr>"
        )
    return ("<table><tr><th>rank</th><th>repair</th><th>loss reached</th><th>vs baseline</th><th>healthy</th>"
            "<th>steps</th><th>seconds</th><th>note</th></tr>" + "".join(rows) + "</table>")


def to_html(result: DoctorResult, *, title: str = "") -> str:
    """Render a doctor's result as one self-contained HTML page.

    Args:
        result: The result.
        title: What was diagnosed, shown in the header. Defaults to "" (the result's name).

    Returns:
        The HTML document.

    Raises:
        MissingExtraError: without matplotlib (``pip install 'gradwatch[report]'``).
    """
    from gradwatch import __version__

    require_matplotlib()
    best = result.best
    title = title or result.name
    if result.nothing_to_repair:
        state, headline = "healthy", "Nothing to repair" if not result.symptoms else "No known cause"
    elif best is not None:
        state, headline = "repaired", f"Repair found: {best.name}"
    else:
        state, headline = "unrepaired", "No repair did better than the baseline"
    base = result.baseline
    meta = (f"{escape(title)} · {escape(result.framework)} · {escape(result.description.model_type)} · "
            f"{escape(result.description.optimizer)} · {result.steps} steps per trial · {result.seconds:.1f} s")
    figures = ""
    if not result.nothing_to_repair:
        heatmaps = _img(heatmaps_figure(base.report, best.report if best is not None else None,
                                        labels=("before: the baseline", f"after: {best.name}" if best is not None else "after: no repair")),
                        "gradient norm per layer, before and after")
        figures = f"""<section><h2>Training loss of every trial</h2>
<figure>{_img(loss_figure(result), "training loss of each trial")}
<figcaption>Same batches, same seed. Dashed: the baseline; bold green: the best repair.</figcaption></figure></section>
<section><h2>Gradient norm per layer, before and after</h2>
<figure>{heatmaps}<figcaption>log10 of each layer's gradient norm per step, one colour scale for both; input layer
at the top; red: non-finite.</figcaption></figure></section>
<section><h2>Ranked trials</h2>{_table(result)}</section>"""
    change = ""
    if best is not None and best.snippet:
        change = f"<section><h2>The change</h2>{_snippet(best.snippet)}</section>"
    manual = "".join(
        f"<section><h2>By hand: {escape(t.name)}</h2><p>{escape(t.not_tried)}</p>{_snippet(t.code_change)}</section>"
        for t in result.trials if t.code_change
    )
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gradwatch doctor: {escape(headline)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header class="{state}"><h1>gradwatch doctor: {escape(headline)}</h1><p>{meta}</p>
<p>{escape(result.baseline_line())}</p></header>
<section><h2>Causes</h2>{_causes(result)}</section>
{figures}
{change}
{manual}
<footer>gradwatch {escape(__version__)} · generated {generated}</footer>
</main>
</body>
</html>
"""
