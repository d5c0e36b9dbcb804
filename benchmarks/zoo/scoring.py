"""Totals over the zoo's outcomes, framework-free: false alarms with an exact bound, detection
and latency per pathology and per expected kind, rescues, what ``auto`` changed on healthy runs.

Definitions (the outcomes come from :func:`benchmarks.zoo.evaluate.evaluate`):

* **false alarm**: a warning or error finding of the ``observe`` run on a healthy run (counted
  per run: a run with at least one), or before the onset of a pathological run (counted apart).
  ``info`` findings never count. The rate's 95 % upper bound is the one-sided exact
  Clopper-Pearson bound (:func:`clopper_pearson_upper`): with 0 alarms in 300 runs it is 1.0 %.
* **detected**: a warning or error finding of the expected kind at or after the onset; latency
  is its step minus the onset; the 90th percentile is the nearest-rank one.
* **rescue**: over the diverging and non-finite runs (``exploding`` / ``nonfinite`` pathologies)
  whose unwatched run fails the rescue criterion (:func:`benchmarks.zoo.labels.rescued`), the
  share whose ``auto`` run meets it. Those the unwatched run survived are counted apart, with
  the ones ``auto`` made fail (harm).
* **changed by auto**: a healthy run where ``auto`` took a training action (clip, LR decay,
  skip, rollback) or whose parameters are not bit-for-bit those of the unwatched run.

>>> round(clopper_pearson_upper(0, 300), 4)
0.0099
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .evaluate import TRAINING_ACTIONS, ZooOutcome
from .pathologies import DIVERGING, EXPECTED_KINDS, PATHOLOGIES


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for n in the thousands)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) upper bound of a rate with ``k`` events in ``n`` trials:
    the ``p`` with ``P(X <= k | n, p) = 1 - confidence``.

    Args:
        k: Events (false alarms).
        n: Trials (healthy runs).
        confidence: One-sided confidence. Defaults to 0.95.

    Returns:
        The bound (1.0 when ``k == n``; NaN when ``n == 0``).

    Raises:
        ValueError: for ``k`` outside ``[0, n]`` or a confidence outside (0, 1).

    >>> round(clopper_pearson_upper(1, 10), 4)
    0.3942
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must be within [0, n]. Received k={k}, n={n}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1). Received confidence={confidence}.")
    if n == 0:
        return math.nan
    if k == n:
        return 1.0
    alpha = 1.0 - confidence
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection: the CDF falls as p rises
        mid = (lo + hi) / 2
        if _binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (an observed value); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _detection(runs: Sequence[ZooOutcome]) -> dict[str, Any]:
    latencies = [o.latency for o in runs if o.detected and o.latency is not None]
    found_any = sum(o.first_kind is not None for o in runs)
    return {
        "runs": len(runs), "detected": sum(o.detected for o in runs),
        "rate": sum(o.detected for o in runs) / len(runs) if runs else None,
        "median_latency": statistics.median(latencies) if latencies else None,
        "p90_latency": percentile(latencies, 90),
        "max_latency": max(latencies) if latencies else None,
        "found_other_kind_only": found_any - sum(o.detected for o in runs),
        "nonfinite_also": sum(o.nonfinite_found for o in runs),
        "probe_nonfinite": sum(o.probe_nonfinite_step is not None for o in runs),
    }


def _signature(o: ZooOutcome) -> str:
    """The training actions ``auto`` took, as a sorted set (``clip+lr_decay``), or ``none``."""
    done = sorted(k for k, n in o.auto.get("actions", {}).items() if n and k in TRAINING_ACTIONS)
    return "+".join(done) or "none"


def summarise(outcomes: Iterable[ZooOutcome], *, seconds: float | None = None) -> dict[str, Any]:
    """Every total of the report (see the module docstring for the definitions).

    Args:
        outcomes: One per seed.
        seconds: Wall time of the whole zoo run. Defaults to None.

    Returns:
        A JSON-able dict.
    """
    outs = list(outcomes)
    kept = [o for o in outs if o.kept]
    healthy = [o for o in kept if o.healthy]
    sick = [o for o in kept if not o.healthy]
    alarmed = [o for o in healthy if o.false_alarms]
    early = [o for o in sick if o.false_alarms]
    frameworks = sorted({o.framework for o in outs})
    by_kind = Counter(k for o in alarmed for k in {f["kind"] for f in o.false_alarms})
    by_tag = Counter(f"{f['kind']}: {t}" for o in alarmed for f in o.false_alarms for t in f["context"]["tags"])
    by_family = Counter(f"{k}: {o.family}" for o in alarmed for k in {f["kind"] for f in o.false_alarms})
    diverging = [o for o in sick if o.pathology in DIVERGING]
    needs = [o for o in diverging if o.needs_rescue]
    # Broken (the unwatched run fails the rescue criterion) but not diverging: its loss falls all
    # the same. Not in the rescue rate; whether auto helped or hurt it is reported apart.
    broken = [o for o in diverging if o.diverged is False and o.needs_rescue is False
              and "fail" in o.rescue_note_unwatched]
    survived = [o for o in diverging if o.needs_rescue is False and o not in broken]
    changed = [o for o in healthy if o.changed]
    action_runs = Counter(k for o in healthy for k, n in o.auto.get("actions", {}).items() if n)
    compared = [o for o in kept if o.observe_identical is not None]
    return {
        "framework": frameworks[0] if len(frameworks) == 1 else ",".join(frameworks),
        "seeds": len(outs),
        "kept": len(kept), "healthy": len(healthy), "pathological": len(sick),
        "dropped": sum(o.status == "dropped" for o in outs), "errors": sum(o.status == "error" for o in outs),
        "dropped_by": dict(Counter(o.pathology or "healthy" for o in outs if o.status == "dropped")),
        "false_alarms": {
            "runs": len(alarmed), "rate": len(alarmed) / len(healthy) if healthy else None,
            "upper95": clopper_pearson_upper(len(alarmed), len(healthy)) if healthy else None,
            "by_kind": dict(by_kind), "by_tag": dict(by_tag.most_common()), "by_family": dict(by_family.most_common()),
        },
        "pre_onset_alarms": {"runs": len(early),
                             "by_kind": dict(Counter(k for o in early for k in {f["kind"] for f in o.false_alarms}))},
        "detection": {
            "all": _detection(sick),
            "by_kind": {k: _detection([o for o in sick if o.label == k]) for k in EXPECTED_KINDS
                        if any(o.label == k for o in sick)},
            "by_pathology": {p: _detection([o for o in sick if o.pathology == p]) for p in PATHOLOGIES
                             if any(o.pathology == p for o in sick)},
        },
        "missed_as": {p: dict(Counter(o.first_kind or "nothing" for o in sick if o.pathology == p and not o.detected))
                      for p in PATHOLOGIES if any(o.pathology == p and not o.detected for o in sick)},
        "failed_rescue_actions": {
            p: dict(Counter(_signature(o) for o in needs if o.pathology == p and not o.rescued))
            for p in PATHOLOGIES if any(o.pathology == p and not o.rescued for o in needs)},
        "rescue": {
            "runs": len(needs), "rescued": sum(bool(o.rescued) for o in needs),
            "rate": sum(bool(o.rescued) for o in needs) / len(needs) if needs else None,
            "by_pathology": {p: {"runs": sum(o.pathology == p for o in needs),
                                 "rescued": sum(bool(o.rescued) for o in needs if o.pathology == p)}
                             for p in PATHOLOGIES if any(o.pathology == p for o in needs)},
            "survived_unwatched": len(survived),
            "harmed_by_auto": sum(o.rescued is False for o in survived),
            "broken_not_diverging": len(broken),
            "broken_meets_criterion_under_auto": sum(bool(o.rescued) for o in broken),
        },
        "auto_on_healthy": {
            "runs": len(healthy), "changed": len(changed),
            "share": len(changed) / len(healthy) if healthy else None,
            "runs_with_action": dict(action_runs),
            "not_identical": sum(o.auto.get("identical") is False for o in healthy),
            "not_identical_without_action": sum(
                o.auto.get("identical") is False and not any(o.auto["actions"].get(k, 0) for k in TRAINING_ACTIONS)
                for o in healthy),
        },
        "observe_identical": {"compared": len(compared), "equal": sum(bool(o.observe_identical) for o in compared)},
        "seconds": seconds,
        "seconds_per_seed": statistics.mean(o.seconds for o in outs) if outs else None,
    }


__all__ = ["clopper_pearson_upper", "percentile", "summarise"]
