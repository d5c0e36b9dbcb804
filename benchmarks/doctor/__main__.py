"""Run the doctor benchmark: ``python -m benchmarks.doctor``.

Usage (from the repository root)::

    python -m benchmarks.doctor --framework torch --split report --json build/bench/doctor-torch.json
    KERAS_BACKEND=tensorflow python -m benchmarks.doctor --framework keras --json build/bench/doctor-keras.json
    python -m benchmarks.doctor --render build/bench/doctor-torch.json build/bench/doctor-keras.json \\
        --docs docs/benchmarks.md

Each framework runs in its own process (``--framework``); ``--render`` merges the JSON files into
markdown and, with ``--docs``, writes the ``## Doctor`` section of that page (replacing only that
section). ``--only WORD ...`` runs the cases whose ids contain a word.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.doctor.cases import cases
from benchmarks.doctor.evaluate import TRIAL_STEPS, run_case
from benchmarks.doctor.report import markdown, write_docs_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=("torch", "keras"), default="torch")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="all")
    parser.add_argument("--only", nargs="*", default=())
    parser.add_argument("--steps", type=int, default=TRIAL_STEPS, help="steps of each doctor trial")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--render", nargs="*", metavar="JSON", help="render saved JSON files instead of running")
    parser.add_argument("--docs", metavar="PAGE", help="with --render: write the Doctor section of this page")
    parser.add_argument("--note", metavar="MARKDOWN", help="with --docs: a markdown file placed after the summary")
    args = parser.parse_args(argv)
    if args.render is not None:
        rows = [row for path in args.render for row in json.loads(Path(path).read_text())["rows"]]
        text = markdown(rows)
        if args.docs:
            write_docs_section(Path(args.docs), rows, Path(args.note).read_text() if args.note else "")
        print(text)
        return 0
    if args.framework == "torch":
        from benchmarks.doctor.torch_side import setup_threads
    else:
        from benchmarks.doctor.keras_side import setup_threads
    setup_threads()
    splits = ("tune", "report") if args.split == "all" else (args.split,)
    rows = []
    start = time.perf_counter()
    for case in cases((args.framework,), splits, tuple(args.only)):
        row = run_case(case, steps=args.steps)
        rows.append(row)
        if "error" in row:
            verdict = "ERROR " + row["error"]
        else:
            verdict = " | ".join(
                f"{'ok  ' if row[f'{m}success'] else 'FAIL'} {row.get(f'{m}repair')} acc "
                f"{row.get(f'{m}repaired_accuracy', float('nan')):.3f} x{row[f'{m}time_ratio']:.2f}"
                for m in ("", "estimate_")) + f" (good {row['good_accuracy']:.3f}, baseline {row['baseline_accuracy']:.3f}" \
                + ("" if row["confirmed"] else ", not confirmed") + ")"
        print(f"{case.id:<45} {verdict}", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}, indent=1, default=str))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
