"""Run the zoo and print the markdown report (``--json PATH`` writes every outcome and the totals).

Usage (from the repository root)::

    python -m benchmarks.zoo --framework torch --seeds 0-99             # tuning seeds
    python -m benchmarks.zoo --framework torch --seeds 10000-10599 --workers 2 --json build/bench/zoo-torch.json
    python -m benchmarks.zoo --quick                                     # a small fixed sample
    python -m benchmarks.zoo --seeds 0-99 --only healthy                 # or pathological, a family, a pathology, a kind
    python -m benchmarks.zoo --seed 17                                   # one run, verbosely

Seeds 0-99 are for tuning gradwatch's rules; the next published numbers come from 10000-10599 (10000-10199
in Keras), which nobody looked at while tuning (1000-1599 to 9000-9599 were earlier report sets, most
then studied: NOTE.md). Exit status 0 whatever the score (the numbers are the result); 2 on
a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .evaluate import RunResult, evaluate
from .pathologies import EXPECTED_KINDS, PATHOLOGIES
from .report import failures_markdown, summary_markdown
from .sampler import sample, seeds_covering
from .scoring import summarise
from .spec import FAMILIES, RunSpec
from .workers import FRAMEWORKS, make_runner, run_zoo

TUNING_SEEDS = range(0, 100)
REPORT_SEEDS = range(1000, 1600)


def parse_seeds(text: str) -> list[int]:
    """``"0-99"``, ``"5,7,9"``, ``"0-9,20-29"`` -> the seeds, in order.

    Raises:
        ValueError: for a malformed range.
    """
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"A seed range must go up: received {part!r}.")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(int(part))
    return seeds


def selected(spec: RunSpec, only: list[str]) -> bool:
    """``--only``: healthy, pathological, a family, a pathology or an expected kind."""
    if not only:
        return True
    keys = {"healthy" if spec.healthy else "pathological", spec.family, spec.label}
    if spec.pathology is not None:
        keys.add(spec.pathology.name)
    return bool(keys & set(only))


def verbose(seed: int, framework: str) -> int:
    """Rerun one seed and print everything: the spec, the label check, the findings, the actions."""
    runner = make_runner(framework)
    spec = sample(seed)
    runs: dict[str, RunResult] = {}

    class Keeping:
        framework = runner.framework

        def train(self, s: RunSpec, mode: str) -> RunResult:
            result = runner.train(s, mode)
            runs[("twin " if s != spec else "") + mode] = result
            return result

        def same_params(self, a: Any, b: Any) -> bool:
            return runner.same_params(a, b)

    print(spec)
    print(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
    outcome = evaluate(spec, Keeping())
    print(f"\nstatus: {outcome.status}; label check: {outcome.check}")
    probe = runs["probe"]
    from .labels import global_norm

    norms = global_norm(probe.trace.main)
    every = max(1, len(probe.loss) // 25)
    print("\nunwatched run (probe): step, batch, loss, global grad norm, lr")
    for t in range(0, len(probe.loss), every):
        print(f"  {t:4d} {probe.batch_sizes[t]:4d} {probe.loss[t]:11.4g} {norms[t]:11.4g} {probe.trace.main.lr[t]:9.3g}")
    for mode in ("observe", "auto"):
        if mode not in runs:
            continue
        report = runs[mode].report
        print(f"\n{mode}: {report.summary() if hasattr(report, 'summary') else report}")
    print("\noutcome:")
    print(json.dumps(outcome.to_dict(), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    parser.add_argument("--seeds", default=f"{TUNING_SEEDS.start}-{TUNING_SEEDS.stop - 1}",
                        help="seeds: 0-99 (tuning, the default), 10000-10599 (the next report), or a list 5,7,9")
    parser.add_argument("--quick", action="store_true",
                        help="a small fixed sample: the first tuning seed of each family and of each pathology")
    parser.add_argument("--only", nargs="*", default=[],
                        help=f"healthy, pathological, a family {FAMILIES}, a pathology or a kind {EXPECTED_KINDS}")
    parser.add_argument("--workers", type=int, default=1, help="processes (each torch.set_num_threads(1))")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run's steps (smoke tests)")
    parser.add_argument("--json", type=Path, help="write every outcome and the totals here")
    parser.add_argument("--seed", type=int, help="rerun this one seed verbosely")
    args = parser.parse_args(argv)
    known = set(FAMILIES) | set(PATHOLOGIES) | set(EXPECTED_KINDS) | {"healthy", "pathological"}
    unknown = [w for w in args.only if w not in known]
    if unknown:
        parser.error(f"--only takes {sorted(known)}; received {unknown}")
    if args.seed is not None:
        return verbose(args.seed, args.framework)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(f"--seeds: {exc}")
    if args.quick:
        seeds = seeds_covering(list(TUNING_SEEDS))
    seeds = [s for s in seeds if selected(sample(s), args.only)]
    start = time.perf_counter()
    outcomes = run_zoo(seeds, args.framework, args.workers, args.max_steps)
    seconds = time.perf_counter() - start
    totals = summarise(outcomes, seconds=seconds)
    span = f"seeds {args.seeds}" if not args.quick else "quick sample"
    print(summary_markdown(totals, title=f"Zoo, {span}" + (f", only {' '.join(args.only)}" if args.only else "")))
    print(failures_markdown(outcomes))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"seeds": args.seeds if not args.quick else "quick", "only": args.only, "workers": args.workers,
                   "provenance": provenance(), "totals": totals, "outcomes": [o.to_dict() for o in outcomes]}
        args.json.write_text(json.dumps(_plain(payload), indent=1, default=str, allow_nan=False))
    return 0


def provenance() -> dict[str, Any]:
    """What was measured: gradwatch's version, the commit, and whether gradwatch's own files
    differed from it (a run on a working tree that is being edited says so)."""
    import platform
    import subprocess

    import gradwatch

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"gradwatch": gradwatch.__version__, "commit": git("rev-parse", "HEAD"),
            "gradwatch_files_modified": bool(git("status", "--porcelain", "gradwatch", "integrations")),
            "versions": {name: version for name in ("torch", "keras", "tensorflow-cpu", "jax", "scikit-learn", "numpy")
                         if (version := _version(name)) is not None},
            "python": platform.python_version(), "machine": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    """JSON without NaN: NaN becomes None, infinities the strings "inf" / "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
