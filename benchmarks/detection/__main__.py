"""Run the detection scenarios and print (or save) the per-scenario table and the totals.

Usage (from the repository root)::

    python -m benchmarks.detection                      # PyTorch and Keras (current backend)
    python -m benchmarks.detection --framework torch --only p-nan h-gan
    python -m benchmarks.detection --json benchmarks/results/detection.json
    KERAS_BACKEND=jax python -m benchmarks.detection --framework keras

Exit status 0 whatever the score: the numbers are the result. ``--strict`` exits 1 on a miss, a
false alarm or a failed label check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .scoring import Outcome, failed, markdown_summary, markdown_table, summarise


def run_torch(only: list[str]) -> list[Outcome]:
    import torch

    torch.set_num_threads(1)
    from . import torch_healthy, torch_pathologies
    from .torch_harness import detect

    outcomes = []
    for scenario in torch_healthy.SCENARIOS + torch_pathologies.SCENARIOS:
        if only and not any(key in scenario.name for key in only):
            continue
        outcomes.append(_guarded(detect, scenario, "torch"))
    return outcomes


def _guarded(detect: Any, scenario: Any, framework: str) -> Outcome:
    start = time.perf_counter()
    try:
        outcome = detect(scenario)
    except Exception as exc:  # one broken scenario must not hide the others' results
        outcome = failed(framework, scenario.name, scenario.label, scenario.about, exc, time.perf_counter() - start)
    _progress(outcome)
    return outcome


def run_keras(only: list[str]) -> list[Outcome]:
    import os

    if os.environ.get("KERAS_BACKEND") == "torch":
        import torch

        torch.set_num_threads(1)
    from .keras_harness import BACKEND, detect
    from .keras_scenarios import SCENARIOS

    outcomes = []
    for scenario in SCENARIOS:
        if only and not any(key in scenario.name for key in only):
            continue
        outcomes.append(_guarded(detect, scenario, f"keras/{BACKEND}"))
    return outcomes


def _progress(o: Outcome) -> None:
    found = "" if o.healthy else f" found={o.detected} latency={o.latency}"
    print(f"  {o.framework:>16} {o.name:<38} {o.verdict:<11}{found} ({o.seconds:.1f}s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detection", description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=["torch", "keras", "all"], default="all")
    parser.add_argument("--only", nargs="*", default=[], help="run scenarios whose name contains one of these")
    parser.add_argument("--json", type=Path, help="write outcomes and totals here")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a miss, false alarm or bad label")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    if args.framework in ("torch", "all"):
        outcomes += run_torch(args.only)
    keras_error = None
    if args.framework in ("keras", "all"):
        try:
            outcomes += run_keras(args.only)
        except ImportError as exc:
            keras_error = f"Keras scenarios not run: {exc}"
            print(keras_error, file=sys.stderr)
    frameworks = list(dict.fromkeys(o.framework for o in outcomes))
    summaries = {fw: summarise([o for o in outcomes if o.framework == fw]) for fw in frameworks}
    text = "\n\n".join(markdown_summary([o for o in outcomes if o.framework == fw], fw) for fw in frameworks)
    print(text + "\n\n" + markdown_table(outcomes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "outcomes": [o.to_dict() for o in outcomes],
            "summaries": summaries,
            "seconds": time.perf_counter() - start,
            "keras_error": keras_error,
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    if args.strict:
        return int(any(o.verdict != "ok" for o in outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
