"""The figures of a report (matplotlib, imported only when a figure is drawn).

* ``heatmap``: each layer's gradient norm over the steps, log-scaled, input layer at the top.
  Non-finite gradients are red, layers without a gradient (frozen, unused) grey.
* ``global_norm``: the global gradient norm over the steps with the actions marked, the spans of
  the findings shaded, and the loss below it when it was recorded.

The figures are built on :class:`matplotlib.figure.Figure` directly, not through ``pyplot``, so
drawing one never changes the user's backend or opens a window. Layer names are drawn as plain
text: a ``$`` in a name is not taken for mathtext.
"""

from __future__ import annotations

import io
import math
import os
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.errors import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gradwatch.report.base import Report

FIGURE_KINDS = ("global_norm", "heatmap")
"""The figures :func:`plot` draws."""

ACTION_STYLE: dict[str, tuple[str, str]] = {
    "clip": ("#ff7f0e", "v"),
    "lr_decay": ("#9467bd", "D"),
    "skip_step": ("#d62728", "X"),
    "rollback": ("#8c564b", "s"),
    "recommend_batchnorm": ("#2ca02c", "P"),
}
"""Colour and marker of each action kind in the global-norm figure."""

SEVERITY_COLOR = {"info": "#1f77b4", "warning": "#ff9f1c", "error": "#d62728"}
NONFINITE_COLOR = "#d62728"
NO_GRAD_COLOR = "#d9d9d9"
_RC = {"text.parse_math": False, "font.size": 10, "axes.titlesize": 12, "axes.titleweight": "bold",
       "axes.spines.top": False, "axes.spines.right": False}


def require_matplotlib() -> Any:
    """Import matplotlib or raise MissingExtraError naming ``pip install 'gradwatch[report]'``."""
    return require("matplotlib", "report")


def _short(name: str, width: int = 36) -> str:
    """A layer name for a tick label: printable, and cut at the front when long (the end of a
    module path is its most specific part: ``…layers.7.attention.q_proj``)."""
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _common_prefix(names: list[str]) -> str:
    """The module path all layers share (``"transformer.encoder."``), if long enough to be worth
    writing once instead of on every label."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    cut = max(prefix.rfind("."), prefix.rfind("/"))
    prefix = prefix[: cut + 1] if cut >= 0 else ""
    return prefix if len(prefix) >= 8 and all(len(n) > len(prefix) for n in names) else ""


def _history(report: Report) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = report.history or {}
    steps = np.asarray(h.get("steps", []), dtype=float)
    norm = np.asarray(h.get("global_norm", []), dtype=float)
    loss = np.asarray(h.get("loss", []), dtype=float)
    return steps, norm, loss


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges between consecutive steps (steps need not be contiguous: ``every=10``)."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def heatmap_figure(report: Report, *, width: float = 11.0, title: bool = True) -> Figure:
    """Per-layer gradient norms over the steps.

    Args:
        report: The report.
        width: Figure width in inches. Defaults to 11.0.
        title: Draw the figure's title (the HTML page has its own headings). Defaults to True.

    Returns:
        The figure.

    Raises:
        MissingExtraError: without matplotlib.
    """
    mpl = require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    h = report.history or {}
    names = [str(n) for n in h.get("layer_names", [])]
    steps = np.asarray(h.get("steps", []), dtype=float)
    grid = np.asarray(h.get("layer_grad_norm", []), dtype=float).reshape(len(steps), len(names)).T
    with mpl.rc_context(_RC):
        fig = Figure(figsize=(width, min(2.0 + 0.24 * max(len(names), 3), 16.0)), layout="constrained")
        ax = fig.add_subplot()
        if title:
            ax.set_title("Gradient norm per layer over the steps")
        if not names or not steps.size:
            _empty(ax, "no steps measured")
            return fig
        nonfinite_layers = {str(layer["layer"]) for layer in report.layers if layer.get("nonfinite_steps", 0)}
        in_bad_layer = np.array([n in nonfinite_layers for n in names])[:, None]
        nonfinite = np.isinf(grid) | (np.isnan(grid) & in_bad_layer)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(grid)
        shown = np.isfinite(grid) & (grid > 0)
        if shown.any():
            lo, hi = np.percentile(logs[shown], [1, 99])
            if hi - lo < 2.0:
                # At least two decades, so the noise of a healthy run does not look like a pattern.
                mid = (hi + lo) / 2
                lo, hi = mid - 1.0, mid + 1.0
        else:
            lo, hi = -1.0, 1.0
        # Exactly-zero gradients (log10 0 = -inf) take the darkest colour: they are the extreme.
        values = np.ma.masked_where(~(shown | (grid == 0)), np.where(grid == 0, lo, logs))
        x = _edges(steps)
        y = np.arange(len(names) + 1) - 0.5
        ax.set_facecolor(NO_GRAD_COLOR)
        mesh = ax.pcolormesh(x, y, values, cmap="viridis", vmin=lo, vmax=hi, shading="flat")
        if nonfinite.any():
            ax.pcolormesh(x, y, np.ma.masked_where(~nonfinite, np.ones_like(grid)),
                          cmap=ListedColormap([NONFINITE_COLOR]), vmin=0, vmax=1, shading="flat")
        ax.set_ylim(len(names) - 0.5, -0.5)
        every = max(1, math.ceil(len(names) / 60))
        ticks = list(range(0, len(names), every))
        prefix = _common_prefix(names)
        ax.set_yticks(ticks, [_short(names[i][len(prefix):]) for i in ticks], fontsize=9 if len(names) < 30 else 7)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"layer in {_short(prefix, 40)}… (input at the top)" if prefix else "layer (input at the top)")
        for f in report.findings:
            if steps[0] <= f.step <= steps[-1] and f.severity != "info":
                ax.axvline(f.step, color=SEVERITY_COLOR[f.severity], lw=1.0, ls="--", alpha=0.9)
        bar = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.04)
        bar.set_label("log10 gradient norm")
        legend = []
        if nonfinite.any():
            legend.append(Patch(color=NONFINITE_COLOR, label="non-finite (NaN/Inf)"))
        if (~shown & ~nonfinite & (grid != 0)).any():
            legend.append(Patch(color=NO_GRAD_COLOR, label="no gradient"))
        if legend:
            ax.legend(handles=legend, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(legend),
                      frameon=False, fontsize=9, borderaxespad=0.2)
    return fig


def global_norm_figure(report: Report, *, width: float = 11.0, title: bool = True) -> Figure:
    """Global gradient norm over the steps, with the actions and findings, and the loss.

    Args:
        report: The report.
        width: Figure width in inches. Defaults to 11.0.
        title: Draw the figure's title (the HTML page has its own headings). Defaults to True.

    Returns:
        The figure.

    Raises:
        MissingExtraError: without matplotlib.
    """
    mpl = require_matplotlib()
    from matplotlib.figure import Figure

    steps, norm, loss = _history(report)
    has_loss = bool(np.isfinite(loss).any())
    with mpl.rc_context(_RC):
        fig = Figure(figsize=(width, 5.6 if has_loss else 3.8), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2]) if has_loss else [fig.add_subplot()]
        ax = axes[0]
        if title:
            ax.set_title("Global gradient norm over the steps")
        if not steps.size:
            _empty(ax, "no steps measured")
            return fig
        finite = np.isfinite(norm)
        ax.plot(steps[finite], norm[finite], color="#1f4e79", lw=1.5, label="global gradient norm")
        if _spans_decades(norm[finite]):
            ax.set_yscale("log")
        if (~finite).any():
            ax.scatter(steps[~finite], np.full((~finite).sum(), 0.96), transform=ax.get_xaxis_transform(),
                       marker="x", color=NONFINITE_COLOR, s=30, zorder=5, label="non-finite gradients")
        ax.set_ylabel("‖grad‖₂ (all layers)")
        ax.grid(True, which="major", alpha=0.3)
        _shade_findings(axes, report, steps)
        _mark_actions(ax, report, steps, norm)
        if has_loss:
            ax_loss = axes[1]
            ok = np.isfinite(loss)
            ax_loss.plot(steps[ok], loss[ok], color="#444444", lw=1.3, label="loss")
            if (~ok).any():
                ax_loss.scatter(steps[~ok], np.full((~ok).sum(), 0.92), transform=ax_loss.get_xaxis_transform(),
                                marker="x", color=NONFINITE_COLOR, s=30, label="non-finite loss")
            if _spans_decades(loss[ok]):
                ax_loss.set_yscale("log")
            ax_loss.set_ylabel("loss")
            ax_loss.grid(True, alpha=0.3)
            ax_loss.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        axes[-1].set_xlabel("optimizer step")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


def _spans_decades(values: np.ndarray, ratio: float = 30.0) -> bool:
    """Positive values spread over more than ``ratio``x: a log axis reads better than a linear one."""
    return bool(values.size) and bool((values > 0).all()) and float(values.max() / values.min()) > ratio


def _shade_findings(axes: Any, report: Report, steps: np.ndarray) -> None:
    lo, hi = steps[0], steps[-1]
    for f in report.findings:
        if f.severity == "info" or f.last_step < lo or f.step > hi:
            continue
        for ax in axes:
            ax.axvspan(max(f.step, lo) - 0.5, min(f.last_step, hi) + 0.5, color=SEVERITY_COLOR[f.severity],
                       alpha=0.13, lw=0)


def _mark_actions(ax: Any, report: Report, steps: np.ndarray, norm: np.ndarray) -> None:
    seen: set[str] = set()
    lo, hi = steps[0], steps[-1]
    index = {int(s): i for i, s in enumerate(steps)}
    for a in report.actions:
        if not lo <= a.step <= hi:
            continue
        color, marker = ACTION_STYLE.get(a.kind, ("#7f7f7f", "o"))
        i = index.get(int(a.step))
        y = norm[i] if i is not None and np.isfinite(norm[i]) and norm[i] > 0 else None
        label = None if a.kind in seen else a.kind.replace("_", " ")
        seen.add(a.kind)
        if y is None:
            ax.scatter([a.step], [0.9], transform=ax.get_xaxis_transform(), marker=marker, color=color,
                       s=46, zorder=6, edgecolor="white", linewidth=0.6, label=label)
        else:
            ax.scatter([a.step], [y], marker=marker, color=color, s=46, zorder=6, edgecolor="white",
                       linewidth=0.6, label=label)
    clips = [(a.step, a.params.get("max_norm")) for a in report.actions if a.kind == "clip"]
    clips = [(s, float(v)) for s, v in clips if isinstance(v, (int, float)) and math.isfinite(v) and lo <= s <= hi]
    if clips:
        xs, ys = zip(*clips)
        ax.plot(xs, ys, color=ACTION_STYLE["clip"][0], lw=1.0, ls=":", label="clip threshold")


def plot(report: Report, kind: str = "global_norm", *, path: str | PathLike[str] | None = None,
         dpi: int = 110, width: float = 11.0) -> Figure:
    """Draw one of the report's figures, and save it when ``path`` is given.

    Args:
        report: The report.
        kind: ``"global_norm"`` or ``"heatmap"``. Defaults to ``"global_norm"``.
        path: Where to save it (the format follows the suffix: ``.png``, ``.svg``, ``.pdf``).
            Defaults to None (not saved).
        dpi: Resolution when saving a raster image. Defaults to 110.
        width: Figure width in inches. Defaults to 11.0.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: for an unknown ``kind``.
        MissingExtraError: without matplotlib.
    """
    builders = {"global_norm": global_norm_figure, "heatmap": heatmap_figure}
    if kind not in builders:
        raise ValueError(f"kind must be one of {FIGURE_KINDS}; received {kind!r}.")
    fig = builders[kind](report, width=width)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def png_bytes(fig: Figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for embedding in HTML)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
