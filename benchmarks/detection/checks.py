"""Label checks, read off a probe's plain-autodiff :class:`Trace` (PyTorch or Keras).

Each factory returns ``check(trace) -> LabelCheck``. The thresholds here define what the label
means, independently of gradwatch's detectors: a run "diverges" when its loss becomes non-finite
or 100x its pre-onset level; a gradient "spikes" when the global norm is 100x its recent median;
gradients "vanish" when the first weight layer's gradient norm is below ``max_ratio`` of the last
hidden layer's; units are "dead" when at least half of a layer's units output exactly zero on the
whole batch, step after step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .scoring import LabelCheck
from .trace import GroupTrace, Trace

Check = Callable[[Trace], LabelCheck]


def _global(gt: GroupTrace) -> np.ndarray:
    g = gt.grads()
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt(np.nansum(np.where(np.isnan(g), 0.0, g) ** 2, axis=1))


def _nonfinite_rows(gt: GroupTrace) -> np.ndarray:
    """Per step: some gradient that exists holds NaN/Inf (a missing gradient is not)."""
    return np.any(gt.present() & ~np.isfinite(gt.grads()), axis=1)


def healthy(*, min_drop: float = 0.9, every_group: bool = False, extra: Check | None = None) -> Check:
    """The run learns (mean loss of the last 10 steps below ``min_drop`` x the first 10's) and
    every gradient and loss stays finite. ``extra`` adds a scenario-specific condition (the trap
    really is there)."""

    def check(trace: Trace) -> LabelCheck:
        groups = trace.groups if every_group else [trace.main]
        notes = []
        ok = True
        for i, gt in enumerate(groups):
            loss = np.array(gt.loss)
            finite = bool(np.all(np.isfinite(loss))) and not bool(_nonfinite_rows(gt).any())
            first, last = float(np.mean(loss[:10])), float(np.mean(loss[-10:]))
            norms = _global(gt)
            norms = norms[norms > 0]
            spread = float(norms.max() / norms.min()) if norms.size else math.nan
            learns = last < min_drop * first
            ok = ok and finite and learns
            tag = f"G{i} " if len(groups) > 1 else ""
            notes.append(f"{tag}loss {first:.3g}->{last:.3g}, grad norm range x{spread:.3g}"
                         + ("" if finite else ", NON-FINITE"))
        if extra is not None:
            more = extra(trace)
            ok = ok and more.ok
            notes.append(more.evidence)
        return LabelCheck(ok, "; ".join(notes))

    return check


def diverges(onset: int, *, factor: float = 100.0) -> Check:
    """Finite and steady before ``onset``; after it the loss turns non-finite or exceeds
    ``factor`` x its pre-onset level, and the global gradient norm rises ``factor`` x its pre-onset
    median (or turns non-finite)."""

    def check(trace: Trace) -> LabelCheck:
        gt = trace.main
        loss = np.array(gt.loss)
        norms = _global(gt)
        before_loss = loss[max(0, onset - 20):onset] if onset > 0 else loss[:1]
        before_norm = norms[max(0, onset - 20):onset] if onset > 0 else norms[:1]
        base_loss, base_norm = float(np.median(before_loss)), float(np.median(before_norm))
        clean_before = bool(np.all(np.isfinite(loss[:onset]))) and not bool(_nonfinite_rows(gt)[:onset].any())
        after_loss, after_norm = loss[onset:], norms[onset:]
        bad = ~np.isfinite(after_loss) | (after_loss > factor * base_loss)
        loss_blows = bool(bad.any())
        norm_blows = bool((~np.isfinite(after_norm) | (after_norm > factor * base_norm)).any()) or bool(
            _nonfinite_rows(gt)[onset:].any())
        first_bad = int(np.argmax(bad)) + onset if loss_blows else None
        peak = float(np.nanmax(np.where(np.isfinite(after_norm), after_norm, np.nan))) if np.isfinite(after_norm).any() else math.inf
        ok = clean_before and loss_blows and norm_blows
        return LabelCheck(ok, (
            f"unwatched loss {base_loss:.3g} -> {'non-finite' if not np.isfinite(loss[-1]) else f'{loss[-1]:.3g}'}"
            f" (bad from step {first_bad}); grad norm {base_norm:.3g} -> peak {peak:.3g}"
            + ("" if clean_before else "; NOT CLEAN BEFORE ONSET")
        ))

    return check


def norm_spike(onset: int, *, factor: float = 100.0) -> Check:
    """At ``onset`` the global gradient norm is ``factor`` x its median over the 20 steps before."""

    def check(trace: Trace) -> LabelCheck:
        norms = _global(trace.main)
        base = float(np.median(norms[onset - 20:onset]))
        at = float(norms[onset])
        ok = (not math.isfinite(at) or at > factor * base) and bool(np.all(np.isfinite(norms[:onset])))
        return LabelCheck(ok, f"global grad norm {at:.3g} at step {onset} vs median {base:.3g} before (x{at / base:.3g})")

    return check


def nonfinite_at(onset: int, *, loss_finite: bool | None = None) -> Check:
    """Every gradient finite before ``onset``; some gradient non-finite at ``onset``. With
    ``loss_finite`` set, the loss at ``onset`` must be (non-)finite as said."""

    def check(trace: Trace) -> LabelCheck:
        gt = trace.main
        rows = _nonfinite_rows(gt)
        clean_before = not bool(rows[:onset].any())
        at = bool(rows[onset])
        bad = [gt.names[i] for i in np.flatnonzero(gt.present()[onset] & ~np.isfinite(gt.grads()[onset]))]
        loss = gt.loss[onset]
        ok = clean_before and at and (loss_finite is None or math.isfinite(loss) == loss_finite)
        return LabelCheck(ok, (
            f"grads finite before step {onset}: {clean_before}; non-finite at {onset}: {at} "
            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); loss there {loss:.3g}"
        ))

    return check


def first_nonfinite(*, loss_finite: bool | None = None) -> Check:
    """The onset is the first step with a non-finite gradient (measured); it must exist."""

    def check(trace: Trace) -> LabelCheck:
        rows = _nonfinite_rows(trace.main)
        if not rows.any():
            return LabelCheck(False, "no non-finite gradient in the unwatched run")
        onset = int(np.argmax(rows))
        inner = nonfinite_at(onset, loss_finite=loss_finite)(trace)
        return LabelCheck(inner.ok, inner.evidence, onset=onset)

    return check


def vanishing(first: str, last: str, *, max_ratio: float = 1e-3) -> Check:
    """The median over the run of ``||grad first|| / ||grad last||`` (weight tensors, plain
    autograd) is below ``max_ratio``; the relative form ``(||g||/||W||)`` is shown too."""

    def check(trace: Trace) -> LabelCheck:
        gt = trace.main
        g, p = gt.grads(), gt.params()
        i, j = gt.column(first), gt.column(last)
        raw = float(np.median(g[:, i] / g[:, j]))
        rel = float(np.median((g[:, i] / p[:, i]) / (g[:, j] / p[:, j])))
        return LabelCheck(raw < max_ratio and rel < max_ratio,
                          f"||g {first}|| / ||g {last}|| = {raw:.2g} (relative to ||W||: {rel:.2g})")

    return check


def dead(module: str, *, min_fraction: float = 0.5, onset: int | None = None, window: int = 10) -> Check:
    """At least ``min_fraction`` of ``module``'s units output exactly zero on the whole batch on
    every step from the onset (designed, or measured as the first step from which it holds for
    ``window`` steps)."""

    def check(trace: Trace) -> LabelCheck:
        frac = np.array(trace.dead[module])
        ok_rows = frac >= min_fraction
        if onset is not None:
            start = onset
        else:
            hits = [t for t in range(len(frac) - window + 1) if ok_rows[t:t + window].all()]
            if not hits:
                return LabelCheck(False, f"{module}: dead share never >= {min_fraction:.0%} for {window} steps (max {frac.max():.0%})")
            start = hits[0]
        held = bool(ok_rows[start:].all())
        return LabelCheck(held, (
            f"{module}: {frac[start:].min():.0%}-{frac[start:].max():.0%} of units output exactly 0 "
            f"on the whole batch from step {start} (before: {frac[:start].max() if start else 0:.0%} max)"
        ), onset=None if onset is not None else start)

    return check


def loss_jump(onset: int, *, factor: float = 5.0) -> Check:
    """The loss at ``onset`` is ``factor`` x its mean over the 20 steps before, all finite."""

    def check(trace: Trace) -> LabelCheck:
        loss = np.array(trace.main.loss)
        base = float(np.mean(loss[onset - 20:onset]))
        at = float(loss[onset])
        ok = at > factor * base and bool(np.all(np.isfinite(loss)))
        return LabelCheck(ok, f"loss {at:.3g} at step {onset} vs mean {base:.3g} before (x{at / base:.3g})")

    return check


def frozen_grads_none(prefixes: tuple[str, ...]) -> Check:
    """Parameters under ``prefixes`` never got a gradient (None)."""

    def check(trace: Trace) -> LabelCheck:
        gt = trace.main
        frozen = [i for i, n in enumerate(gt.names) if n.startswith(prefixes)]
        ok = bool(frozen) and not bool(gt.present()[:, frozen].any())
        return LabelCheck(ok, f"{len(frozen)} frozen tensors with grad None on every step: {ok}")

    return check


def trap_converges(factor: float = 100.0) -> Check:
    """The gradients really shrink by ``factor`` (the convergence trap is set)."""

    def check(trace: Trace) -> LabelCheck:
        norms = _global(trace.main)
        shrink = float(norms[0] / norms[-1])
        return LabelCheck(shrink > factor, f"global grad norm shrank x{shrink:.3g}")

    return check


def trap_lr_range(low: float, high: float) -> Check:
    """The LR really moved over ``[low, high]`` x its final value (warm-up, restarts)."""

    def check(trace: Trace) -> LabelCheck:
        lr = np.array(trace.main.lr)
        ratio = float(lr.max() / max(lr.min(), 1e-30))
        ok = ratio >= high / low
        return LabelCheck(ok, f"LR ranged {lr.min():.2g}..{lr.max():.2g} (x{ratio:.3g})")

    return check


def all_of(*checks: Check) -> Check:
    def check(trace: Trace) -> LabelCheck:
        results = [c(trace) for c in checks]
        onset = next((r.onset for r in results if r.onset is not None), None)
        return LabelCheck(all(r.ok for r in results), "; ".join(r.evidence for r in results), onset)

    return check
