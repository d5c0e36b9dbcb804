"""The ``gradwatch`` command line.

``gradwatch check TARGET``   train a factory's setup for a few steps and judge its gradients
``gradwatch doctor TARGET``  name the causes, try the repairs they call for, rank them
``gradwatch report FILE``    render a saved JSON report again (text, ``--html``, ``--junit``)
``gradwatch demo``           run the demonstration (a diagnosis and a remedy, printed)
``gradwatch version``        print the version

Exit codes: 0 success (healthy), 1 findings at or above ``--fail-on``, 2 usage errors (a bad
target, an import error, a factory that raises or returns the wrong thing, a missing extra), with
a message that says what was expected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
FAIL_ON = ("info", "warning", "error", "never")


def _cmd_version(args: argparse.Namespace) -> int:
    from gradwatch import __version__

    print(f"gradwatch {__version__}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradwatch.demo import run_demo

    return run_demo(synthetic=args.synthetic)


def _usage_error(command: str, message: str) -> int:
    print(f"gradwatch {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _require_matplotlib() -> None:
    """Fail before a long check, not after it, when ``--html`` cannot be rendered."""
    from gradwatch.errors import require

    require("matplotlib", "report")


def _verdict(report: Any, fail_on: str) -> tuple[int, str]:
    if fail_on == "never":
        return EXIT_OK, f"PASSED (--fail-on never; worst severity: {report.worst_severity() or 'none'})"
    failing = report.kinds(fail_on)
    if failing:
        return EXIT_FINDINGS, f"FAILED: {', '.join(failing)} at or above {fail_on!r}"
    return EXIT_OK, f"PASSED: no finding at or above {fail_on!r}"


def _what_to_do(report: Any) -> str:
    from gradwatch.advice import advice_for

    kinds = list(dict.fromkeys(f.kind for f in report.findings))
    if not kinds:
        return ""
    return "\n".join(["", "", "What to do:"] + [f"  {kind}: {advice_for(kind)}" for kind in kinds])


def _outputs(report: Any, args: argparse.Namespace, name: str, elapsed: float, meta: dict[str, Any]) -> list[str]:
    written = []
    if getattr(args, "json", None):
        data = report.to_dict()
        data["check"] = meta
        _write(args.json, json.dumps(data, indent=2, allow_nan=False) + "\n")
        written.append(args.json)
    if args.junit:
        _write(args.junit, report.to_junit(name=name, fail_on=args.fail_on or "warning", time=elapsed))
        written.append(args.junit)
    if args.html:
        _write(args.html, report.to_html(title=name, fail_on=args.fail_on or "warning"))
        written.append(args.html)
    return written


def _cmd_check(args: argparse.Namespace) -> int:
    from gradwatch.check import Progress, check_target
    from gradwatch.errors import GradwatchError

    if args.steps is not None and args.steps < 1:
        return _usage_error("check", f"--steps must be >= 1; received {args.steps}.")
    progress = None if args.quiet or args.no_progress else Progress(f"gradwatch check {args.target}")
    start = time.perf_counter()
    try:
        if args.html:
            _require_matplotlib()
        report = check_target(args.target, steps=args.steps, seed=args.seed, device=args.device, progress=progress)
    except (GradwatchError, ValueError) as exc:
        if progress is not None:
            progress.close()
        if args.traceback:
            traceback.print_exc()
        return _usage_error("check", str(exc))
    except Exception:
        if progress is not None:
            progress.close()
        traceback.print_exc()
        return _usage_error("check", "gradwatch failed inside the check (see the traceback above); please report it.")
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - start
    code, verdict = _verdict(report, args.fail_on)
    meta = {"target": args.target, "steps": args.steps, "seed": args.seed, "device": args.device,
            "fail_on": args.fail_on, "exit_code": code, "seconds": round(elapsed, 3)}
    try:
        written = _outputs(report, args, args.target, elapsed, meta)
    except (GradwatchError, OSError) as exc:
        return _usage_error("check", str(exc))
    if not args.quiet:
        print(report.summary() + _what_to_do(report))
        print()
    print(f"gradwatch check {args.target}: {verdict} ({report.steps_measured} steps, {elapsed:.1f}s)")
    for path in written:
        print(f"  wrote {path}")
    return code


def _cmd_doctor(args: argparse.Namespace) -> int:
    from gradwatch.doctor import TrialProgress, doctor_target
    from gradwatch.errors import GradwatchError

    for option, value, low in (("--steps", args.steps, 10), ("--full-steps", args.full_steps, 1), ("--max-trials", args.max_trials, 0)):
        if value is not None and value < low:
            return _usage_error("doctor", f"{option} must be >= {low}; received {value}.")
    if args.budget is not None and not args.budget > 0:
        return _usage_error("doctor", f"--budget must be > 0 seconds; received {args.budget}.")
    progress = None if args.quiet or args.no_progress else TrialProgress(f"gradwatch doctor {args.target}")
    start = time.perf_counter()
    try:
        if args.html:
            _require_matplotlib()
        result = doctor_target(args.target, steps=args.steps, seed=args.seed, device=args.device, budget_s=args.budget,
                               full_steps=args.full_steps, max_trials=args.max_trials, pairs=not args.no_pairs,
                               progress=progress)
    except (GradwatchError, ValueError) as exc:
        if progress is not None:
            progress.close()
        if args.traceback:
            traceback.print_exc()
        return _usage_error("doctor", str(exc))
    except Exception:
        if progress is not None:
            progress.close()
        traceback.print_exc()
        return _usage_error("doctor", "gradwatch failed inside the doctor (see the traceback above); please report it.")
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - start
    failed = result.fails(args.fail_on)
    code = EXIT_FINDINGS if failed else EXIT_OK
    best = result.best
    if result.nothing_to_repair and not failed:
        verdict = "nothing to repair"
    elif best is not None:
        verdict = f"{'FAILED' if failed else 'PASSED'}: best repair {best.name!r} ({'healthy' if best.healthy else 'still with findings'})"
    else:
        verdict = f"{'FAILED' if failed else 'PASSED'}: no repair did better than the baseline" if result.causes else (
            f"{'FAILED' if failed else 'PASSED'}: findings without a cause the doctor can repair")
    written = []
    try:
        if args.json:
            data = result.to_dict()
            data["doctor"] = {"target": args.target, "steps": args.steps, "seed": args.seed, "device": args.device,
                              "fail_on": args.fail_on, "exit_code": code, "seconds": round(elapsed, 3)}
            _write(args.json, json.dumps(data, indent=2, allow_nan=False) + "\n")
            written.append(args.json)
        if args.html:
            _write(args.html, result.to_html(title=args.target))
            written.append(args.html)
    except (GradwatchError, OSError) as exc:
        return _usage_error("doctor", str(exc))
    if not args.quiet:
        print(result.summary())
        print()
    print(f"gradwatch doctor {args.target}: {verdict} ({elapsed:.1f}s)")
    for path in written:
        print(f"  wrote {path}")
    return code


def _cmd_report(args: argparse.Namespace) -> int:
    from gradwatch.errors import GradwatchError
    from gradwatch.report import Report

    try:
        with open(args.report, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return _usage_error("report", f"No file {args.report!r}; give the JSON written by `gradwatch check --json`.")
    except (OSError, json.JSONDecodeError) as exc:
        return _usage_error("report", f"{args.report!r} is not a JSON report ({exc}).")
    try:
        report = Report.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        return _usage_error("report", f"{args.report!r} is not a gradwatch report: {exc}")
    check = data.get("check") if isinstance(data.get("check"), dict) else {}
    name = args.title or check.get("target") or os.path.splitext(os.path.basename(args.report))[0]
    try:
        written = _outputs(report, args, str(name), float(check.get("seconds") or 0.0), check)
    except (GradwatchError, OSError) as exc:
        return _usage_error("report", str(exc))
    if not written and not args.quiet:
        print(report.summary() + _what_to_do(report))
    for path in written:
        print(f"wrote {path}")
    if args.fail_on:
        code, verdict = _verdict(report, args.fail_on)
        print(f"gradwatch report {args.report}: {verdict}")
        return code
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Watch the gradients of a training run, say what is wrong, fix what can be fixed.",
        epilog="Exit codes: 0 healthy, 1 findings at or above --fail-on, 2 usage errors.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)
    p = sub.add_parser("demo", help="train small models that go wrong and show what gradwatch does")
    p.add_argument("--synthetic", action="store_true", help="use synthetic gradient streams (no framework needed)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "check", help="train a factory's setup for a few steps and judge its gradients",
        description=(
            "Import TARGET ('package.module:function' or 'path/to/file.py:function'), call it, train the "
            "setup it returns for --steps steps under policy='observe', print the layers and findings, "
            "and exit 0 when healthy, 1 on findings at or above --fail-on, 2 on usage errors. The factory "
            "returns (model, optimizer, batches, loss_fn) for PyTorch, (model, x, y) or (model, dataset) "
            "for a compiled Keras model, or a gradwatch.CheckSpec."
        ),
    )
    p.add_argument("target", metavar="TARGET", help="the factory: 'package.module:function' or 'path/to/file.py:function'")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps to run (default: the spec's, else 50)")
    p.add_argument("--fail-on", choices=FAIL_ON, default="warning",
                   help="lowest finding severity that fails the check (default: warning)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (Report.to_dict() plus a 'check' section)")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML: one test case per finding kind")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with figures (needs gradwatch[report])")
    p.add_argument("--seed", type=int, default=0, help="seed Python, numpy and the target's frameworks (default: 0)")
    p.add_argument("--device", default=None, help="train on this device, e.g. cuda, cuda:1, cpu (default: where the factory put it)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the verdict line")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--traceback", action="store_true", help="print the traceback of a usage error")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "doctor", help="name the causes of unhealthy gradients, try the repairs they call for, rank them",
        description=(
            "Import TARGET (as `gradwatch check`), train a copy of its setup for --steps steps under "
            "policy='observe', name the causes of its findings from the model's structure and numbers, try "
            "each repair they call for on a copy of the model (same steps, batches and seed), and rank the "
            "trials by health and the loss reached. Exit 0 when there is nothing at or above --fail-on, 1 "
            "when the setup has findings or causes at or above it (the best repair is printed), 2 on usage errors."
        ),
    )
    p.add_argument("target", metavar="TARGET", help="the factory: 'package.module:function' or 'path/to/file.py:function'")
    p.add_argument("--steps", type=int, default=None, help="steps of every trial (default: the spec's, else 60)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time budget: no trial is started that would end past it (default: none)")
    p.add_argument("--full-steps", type=int, default=None, metavar="N",
                   help="steps of one full training run: the budget is the time that run takes at the baseline's pace")
    p.add_argument("--max-trials", type=int, default=8, help="most repairs to try, the pair included (default: 8)")
    p.add_argument("--no-pairs", action="store_true", help="do not try the best two repairs together")
    p.add_argument("--fail-on", choices=FAIL_ON, default="warning",
                   help="lowest severity of a finding or cause that fails (default: warning)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON (causes, ranked trials with their reports)")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with figures (needs gradwatch[report])")
    p.add_argument("--seed", type=int, default=0, help="seed of the factory and of every trial (default: 0)")
    p.add_argument("--device", default=None, help="train on this device, e.g. cuda, cpu (default: where the factory put it)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the verdict line")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--traceback", action="store_true", help="print the traceback of a usage error")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("report", help="render a saved JSON report again",
                       description="Print a report saved by `gradwatch check --json`, or render it with --html/--junit.")
    p.add_argument("report", metavar="REPORT_JSON", help="the JSON written by `gradwatch check --json`")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report (needs gradwatch[report])")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML")
    p.add_argument("--title", default=None, help="title of the HTML page (default: the checked target)")
    p.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help="also exit 1 when a finding is at or above this severity (default: exit 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but what was written")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script.

    Args:
        argv: The arguments. Defaults to None (``sys.argv[1:]``).

    Returns:
        The exit code: 0 healthy, 1 findings at or above ``--fail-on``, 2 usage errors.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed what was expected; return its code, no traceback
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
