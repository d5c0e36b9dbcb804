"""Write only the ``## Zoo`` section of ``docs/benchmarks.md`` (and ``docs/zoo-<framework>.md``)
from the report-seed zoo files of a folder, leaving the rest of the page as it is.

Usage (from the repository root)::

    python -m benchmarks.zoo.docs build/bench docs/benchmarks.md [--note NOTE.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.docs_page import zoo_section

HEADING = "## Zoo"


def replace_section(text: str, heading: str, new: str, before: str = "## Doctor") -> str:
    """``text`` with its ``heading`` section replaced by ``new`` (added before ``before``, or at
    the end, when it has none)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        at = next((i for i, line in enumerate(lines) if line.rstrip() == before), len(lines))
        head = "".join(lines[:at]).rstrip("\n") + "\n\n"
        return head + new.rstrip("\n") + "\n" + ("\n" + "".join(lines[at:]) if at < len(lines) else "")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + new.rstrip("\n") + "\n" + ("\n" + tail if tail else "")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    note = ""
    if "--note" in args:
        at = args.index("--note")
        if at + 1 >= len(args):
            print("--note takes a markdown file", file=sys.stderr)
            return 2
        note = Path(args[at + 1]).read_text()
        del args[at:at + 2]
    if len(args) != 2:
        print("usage: python -m benchmarks.zoo.docs RESULTS_FOLDER PAGE.md [--note NOTE.md]", file=sys.stderr)
        return 2
    folder, page = Path(args[0]), Path(args[1])
    section = zoo_section(folder, docs=page, note=note)
    if not section:
        print(f"no zoo results on report seeds in {folder} (make zoo writes them)", file=sys.stderr)
        return 1
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    page.write_text(replace_section(text, HEADING, section))
    print(f"wrote the {HEADING} section of {page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
