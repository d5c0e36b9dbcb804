"""Remedy benchmark: each diverging or non-finite PyTorch scenario, five ways.

For every detection scenario marked ``remedy=True`` (the exploding and non-finite ones), the same
seeded run is trained:

* ``unwatched``: as is;
* ``gradwatch``: ``gradwatch.watch(model, optimizer)`` with its defaults (the ``auto`` policy,
  rollback snapshots ``rollback_every="auto"``);
* ``gradwatch-no-rollback``: the same with ``rollback_every=None`` (no snapshot: skipping,
  clipping and the LR only);
* ``clip-1.0``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` every step;
* ``autoclip-p10``: AutoClip, clip at the 10th percentile of the norm history (Seetharaman 2020);
* ``zclip``: z-score clipping on an EMA of the norm (Kumar 2025), ``alpha=0.97``, ``z=2.5``.

The result per run is the final loss on the scenario's clean evaluation data and whether it is
finite. A run is *rescued* when that loss is finite and no higher than before training. Targets
(issue 6): ``gradwatch`` rescues at least 90% of the scenarios, and its final loss is within 10%
of the best of the three clipping rules' (where one of them finished finite).

Usage (from the repository root)::

    python -m benchmarks.remedy [--only NAME ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import gradwatch
from benchmarks.clipping import AutoClip, ZClip, clip_to
from benchmarks.detection.torch_harness import Scenario

METHODS = ("unwatched", "gradwatch", "gradwatch-no-rollback", "clip-1.0", "autoclip-p10", "zclip")
ALTERNATIVES = ("clip-1.0", "autoclip-p10", "zclip")


def run_method(scenario: Scenario, method: str) -> dict[str, Any]:
    """Train ``scenario`` with one remedy; return its final loss and what gradwatch did.

    Args:
        scenario: A remedy scenario.
        method: One of :data:`METHODS`.

    Returns:
        ``final_loss``, ``initial_loss``, ``finite``, ``rescued``, ``seconds`` and, for the
        gradwatch methods, ``actions`` (counts by kind) and ``lr_factor``.

    Raises:
        ValueError: for an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}. Received method={method!r}.")
    start = time.perf_counter()
    run = scenario.build()
    initial = run.eval_loss()
    params = [[p for p in g.model.parameters() if p.requires_grad] for g in run.groups]
    watches: list[Any] = []
    rules: list[Callable[[list[torch.Tensor]], None]] = []
    if method in ("gradwatch", "gradwatch-no-rollback"):
        every = None if method == "gradwatch-no-rollback" else "auto"
        watches = [gradwatch.watch(g.model, g.optimizers, scaler=g.scaler, rollback_every=every) for g in run.groups]
    elif method == "clip-1.0":
        rules = [lambda ps: clip_to(ps, 1.0) for _ in run.groups]
    elif method == "autoclip-p10":
        rules = [AutoClip(10.0) for _ in run.groups]
    elif method == "zclip":
        rules = [ZClip() for _ in run.groups]

    def on_backward(g: int, loss: torch.Tensor) -> None:
        if watches:
            watches[g].record_loss(loss)
        if rules:
            rules[g](params[g])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(scenario.steps):
            run.step(t, on_backward)
    final = run.eval_loss()
    out: dict[str, Any] = {
        "final_loss": final,
        "initial_loss": initial,
        "finite": math.isfinite(final),
        "rescued": math.isfinite(final) and final <= initial,
        "seconds": time.perf_counter() - start,
    }
    if watches:
        reports = [w.report() for w in watches]
        out["actions"] = {k: sum(r.action_counts.get(k, 0) for r in reports) for k in
                          sorted({k for r in reports for k in r.action_counts})}
        out["lr_factor"] = min(w.lr_factor for w in watches)
        for w in watches:
            w.remove()
    return out


def evaluate(scenarios: list[Scenario]) -> dict[str, Any]:
    """Every remedy on every scenario, and the totals against the targets."""
    rows = []
    for scenario in scenarios:
        results = {m: run_method(scenario, m) for m in METHODS}
        best_alt = min((results[m]["final_loss"] for m in ALTERNATIVES if results[m]["finite"]), default=math.nan)
        gw = results["gradwatch"]
        within = (gw["finite"] and math.isfinite(best_alt) and gw["final_loss"] <= 1.1 * best_alt) or (
            gw["finite"] and not math.isfinite(best_alt))
        rows.append({"scenario": scenario.name, "about": scenario.about, "results": results,
                     "best_alternative": best_alt, "gradwatch_within_10pct": within})
        print(f"  {scenario.name:<38} " + " ".join(
            f"{m}={results[m]['final_loss']:.3g}" for m in METHODS), file=sys.stderr, flush=True)
    n = len(rows)
    rescued = {m: sum(r["results"][m]["rescued"] for r in rows) for m in METHODS}
    finite = {m: sum(r["results"][m]["finite"] for r in rows) for m in METHODS}
    within = sum(r["gradwatch_within_10pct"] for r in rows)
    return {"rows": rows, "scenarios": n, "rescued": rescued, "finite": finite, "gradwatch_within_10pct": within}


def _fmt(x: float) -> str:
    return "NaN" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.3g}")


def markdown(result: dict[str, Any]) -> str:
    """The per-scenario table and the totals."""
    head = "| scenario | initial loss | " + " | ".join(METHODS) + " | gradwatch actions | within 10% of best clip |"
    lines = [head, "| --- | ---: | " + " | ".join("---:" for _ in METHODS) + " | --- | --- |"]
    for r in result["rows"]:
        res = r["results"]
        cells = []
        for m in METHODS:
            cell = _fmt(res[m]["final_loss"])
            cells.append(cell if res[m]["rescued"] else f"{cell} ✗")
        actions = ", ".join(f"{k} {v}" for k, v in res["gradwatch"].get("actions", {}).items()) or "-"
        lr = res["gradwatch"].get("lr_factor", 1.0)
        if lr != 1.0:
            actions += f"; LR x{lr:g}"
        lines.append(f"| {r['scenario']} | {_fmt(res['unwatched']['initial_loss'])} | " + " | ".join(cells)
                     + f" | {actions} | {'yes' if r['gradwatch_within_10pct'] else '**no**'} |")
    n = result["scenarios"]
    lines.append("")
    lines.append(
        "Rescued (final loss finite and not above the initial loss): "
        + ", ".join(f"{m} {result['rescued'][m]}/{n}" for m in METHODS)
        + f". gradwatch within 10% of the best clipping rule's final loss: {result['gradwatch_within_10pct']}/{n}."
        + " ✗ marks a run not rescued."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remedy", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.detection import torch_pathologies

    scenarios = [s for s in torch_pathologies.SCENARIOS if s.remedy and
                 (not args.only or any(k in s.name for k in args.only))]
    start = time.perf_counter()
    result = evaluate(scenarios)
    result["seconds"] = time.perf_counter() - start
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
