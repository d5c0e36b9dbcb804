"""The ``gradwatch`` command line.

``gradwatch demo``     run the demonstration (a diagnosis and a remedy, printed)
``gradwatch version``  print the version

Exit codes: 0 success, 1 findings at or above the failing severity, 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_version(args: argparse.Namespace) -> int:
    from gradwatch import __version__

    print(f"gradwatch {__version__}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradwatch.demo import run_demo

    return run_demo(synthetic=args.synthetic)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Watch the gradients of a training run, say what is wrong, fix what can be fixed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)
    p = sub.add_parser("demo", help="train small models that go wrong and show what gradwatch does")
    p.add_argument("--synthetic", action="store_true", help="use synthetic gradient streams (no framework needed)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
