"""Write ``docs/benchmarks.md`` from the JSON the three benchmarks saved, with the machine.

Usage (from the repository root)::

    python -m benchmarks.docs_page build/bench docs/benchmarks.md

Reads ``detection*.json`` (several: one per Keras backend, say), ``remedy.json`` and
``overhead.json`` from the folder; a section whose file is missing is kept as the page had it
(or says "Not run."). The zoo
(``zoo-<framework>.json`` from ``make zoo``, report seeds only) gets the ``## Zoo`` section and
its full list of failures on ``docs/zoo-<framework>.md``; when no report-seed zoo file is in the
folder, the page's ``## Zoo`` section is kept as it was, and so is the ``## Doctor`` section
(written by ``python -m benchmarks.doctor --render``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.detection.scoring import LabelCheck, Outcome, markdown_summary, markdown_table

PACKAGES = ("torch", "keras", "tensorflow-cpu", "jax", "lightning", "wandb", "numpy")


def machine() -> str:
    """``lscpu | head -20``, Python and package versions, thread settings."""
    try:
        cpu = subprocess.run("lscpu | head -20", shell=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        cpu = "(lscpu not available)"
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    try:
        import gradwatch

        versions.insert(0, f"gradwatch {gradwatch.__version__}")
    except (ImportError, AttributeError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return "\n".join([
        "```text",
        cpu.rstrip(),
        "```",
        "",
        f"Python {platform.python_version()} on {platform.platform()}; " + ", ".join(versions) + ".",
        f"Threads: PyTorch `torch.set_num_threads(1)` in every benchmark; TensorFlow intra/inter-op 1 in the "
        f"overhead benchmark; {os.cpu_count()} logical CPUs shared with other jobs (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} when the page was written).",
    ])


def _outcome(d: dict[str, Any]) -> Outcome:
    check = LabelCheck(**d["check"])
    fields = {k: v for k, v in d.items() if k not in ("check", "verdict")}
    return Outcome(check=check, **fields)


def _detection_files(folder: Path) -> list[Path]:
    """``detection.json`` (PyTorch and the default Keras backend) first, then the other backends."""
    return sorted(folder.glob("detection*.json"), key=lambda p: (p.name != "detection.json", p.name))


def detection_section(folder: Path) -> str:
    files = _detection_files(folder)
    if not files:
        return "Not run."
    outcomes: list[Outcome] = []
    notes = []
    seconds = 0.0
    for f in files:
        data = json.loads(f.read_text())
        outcomes += [_outcome(d) for d in data["outcomes"]]
        seconds += data.get("seconds", 0.0)
        if data.get("keras_error"):
            notes.append(data["keras_error"])
    frameworks = list(dict.fromkeys(o.framework for o in outcomes))
    parts = [markdown_summary([o for o in outcomes if o.framework == fw], fw) for fw in frameworks]
    parts += notes
    parts.append(f"Wall time: {seconds:.0f} s.")
    return "\n\n".join(parts) + "\n\n" + markdown_table(outcomes)


def remedy_section(folder: Path) -> str:
    path = folder / "remedy.json"
    if not path.exists():
        return "Not run."
    from benchmarks.remedy import markdown

    result = json.loads(path.read_text())
    return markdown(result) + f"\n\nWall time: {result.get('seconds', 0):.0f} s."


def overhead_section(folder: Path) -> str:
    path = folder / "overhead.json"
    if not path.exists():
        return "Not run."
    from benchmarks.overhead import markdown

    result = json.loads(path.read_text())
    return markdown(result) + f"\n\nWall time: {result.get('seconds', 0):.0f} s."


HEADER = """# Benchmarks

Every number gradwatch claims comes from a script in `benchmarks/` that anyone can rerun; this page
holds the last results and the machine they came from. `make bench` reruns all three in quick mode
(Keras on the TensorFlow backend) and rewrites this page; `benchmarks/README.md` says how to run
each one in full (more timing rounds and sizes, every Keras backend).

* **Detection**: labelled training scenarios on synthetic data. Each scenario's label is checked
  by an independent measurement in the scenario itself (plain autograd / the backend's autodiff,
  the unwatched loss, the layer outputs), then the run is watched with `policy="observe"` and
  scored: detected or not, the kind, the latency in steps from the onset, false alarms (any
  warning or error finding on a healthy scenario, or before the onset). Targets: no false alarm,
  every pathology found, median latency within 10 steps.
* **Remedies**: each diverging or non-finite PyTorch scenario trained unwatched, with gradwatch
  (`auto`), with `clip_grad_norm_(1.0)`, with AutoClip (10th percentile) and with ZClip
  (z-score on an EMA, written from the papers in `benchmarks/clipping.py`). Targets: gradwatch
  rescues at least 90% and ends within 10% of the best clipping rule's final loss.
* **Overhead**: per-step cost against the same loop unwatched, in the same process, and against
  what people use today for the same information.

Where a target is missed, the tables say so; nothing is left out.
"""


def targets(folder: Path) -> str:
    """The issue's targets, each marked met or missed, from the saved results."""
    from benchmarks.detection.scoring import summarise

    lines = ["| target | result | met |", "| --- | --- | --- |"]
    outcomes: list[Outcome] = []
    for f in _detection_files(folder):
        outcomes += [_outcome(d) for d in json.loads(f.read_text())["outcomes"]]
    for fw in dict.fromkeys(o.framework for o in outcomes):
        t = summarise([o for o in outcomes if o.framework == fw])
        alarms = t["false_alarm_scenarios"]
        lines.append(f"| {fw}: no false alarm on a healthy scenario | {len(alarms)} of {t['healthy']} with one"
                     + (f" ({', '.join(alarms)})" if alarms else "") + f" | {'yes' if not alarms else '**no**'} |")
        lines.append(f"| {fw}: every pathology found | {t['detected']}/{t['pathological']}"
                     + (f" (missed: {', '.join(t['missed'])})" if t["missed"] else "")
                     + f" | {'yes' if not t['missed'] else '**no**'} |")
        med = t["median_latency"]
        shown = "-" if med is None else f"{med:g}"
        lines.append(f"| {fw}: median latency within 10 steps | {shown} | "
                     f"{'yes' if med is not None and med <= 10 else '**no**'} |")
    remedy = folder / "remedy.json"
    if remedy.exists():
        r = json.loads(remedy.read_text())
        n, rescued, within = r["scenarios"], r["rescued"]["gradwatch"], r["gradwatch_within_10pct"]
        lines.append(f"| remedies: `auto` rescues at least 90% | {rescued}/{n} | {'yes' if rescued >= 0.9 * n else '**no**'} |")
        lines.append(f"| remedies: `auto` within 10% of the best clipping rule | {within}/{n} | "
                     f"{'yes' if within == n else '**no**'} |")
    return "\n".join(lines)


ZOO_NOTE = Path(__file__).resolve().parent / "zoo" / "NOTE.md"
"""What the published zoo seeds went through (markdown), shown after the section's introduction."""
ZOO_REPORT_SEEDS_FROM = 1000
"""The zoo's rules are tuned on seeds 0-99; only runs on seeds from here on are published."""


def kept_section(previous: str, heading: str) -> str:
    """The ``heading`` section of a page as it was (empty when it has none)."""
    lines = previous.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start:end]).rstrip("\n")


def _zoo_files(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for f in sorted(folder.glob("zoo-*.json")):
        try:
            data = json.loads(f.read_text())
            first = int(str(data["seeds"]).split("-")[0].split(",")[0])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        if first >= ZOO_REPORT_SEEDS_FROM and not data.get("only"):
            out.append((first, f, data))
    return [(f, data) for _, f, data in sorted(out, key=lambda x: x[0], reverse=True)]


def zoo_section(folder: Path, docs: Path | None, note: str = "") -> str:
    """``## Zoo`` from the report-seed zoo files in ``folder``, newest seeds first (empty when there
    is none); with ``docs``, every failure of each file goes to ``docs/<file name>.md``; ``note``
    (markdown, by default ``benchmarks/zoo/NOTE.md``) goes after the introduction."""
    from benchmarks.zoo.report import summary_markdown

    files = _zoo_files(folder)
    if not files:
        return ""
    parts = ["## Zoo", "",
             "Whole training runs sampled at random (`benchmarks/zoo`: MLPs, CNNs, RNN/LSTM/GRU, small "
             "transformers, residual and normalised nets, embeddings; five optimizers, five schedules, "
             "batches of 1-256 with ragged last batches, weight decay, dropout, label smoothing, bf16, "
             "frozen parts; scikit-learn's offline datasets), pathologies injected at random onsets, "
             "each label confirmed by the unwatched run (unconfirmed runs are dropped). "
             f"The rules and thresholds were tuned on seeds 0-99; the tables below are seeds "
             f"{ZOO_REPORT_SEEDS_FROM}+, which nobody looked at while tuning. Rerun with `make zoo`.", ""]
    if not note and ZOO_NOTE.exists():
        note = ZOO_NOTE.read_text()
    if note:
        parts += [note.strip(), ""]
    for path, data in files:
        totals = data["totals"]
        fw = totals["framework"]
        prov = data.get("provenance", {})
        text = summary_markdown(totals, title=f"Seeds {data['seeds']}", level=3)
        parts += [text, ""]
        parts.append(f"Commit {str(prov.get('commit', '?'))[:10]}"
                     + (" (with uncommitted changes)" if prov.get("gradwatch_files_modified") else "")
                     + f", {prov.get('date', '?')}, {prov.get('machine', '?')}, "
                     + ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items()) + "."
                     + (f" Note: {prov['note']}." if prov.get("note") else ""))
        failures = path.with_suffix(".md")
        if docs is not None and failures.exists():
            page = docs.parent / f"{path.stem}.md"
            page.write_text(f"# Zoo, every run that failed: {fw}, seeds {data['seeds']}\n\nFrom `make zoo` "
                            f"(see [benchmarks](benchmarks.md#zoo)).\n\n" + failures.read_text())
            parts.append(f"Every false alarm, miss, failed rescue and dropped run: [{page.name}]({page.name}).")
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def render(folder: Path, previous: str = "", docs: Path | None = None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    zoo = zoo_section(folder, docs) or kept_section(previous, "## Zoo")
    doctor = kept_section(previous, "## Doctor")
    extra = [part for section in (zoo, doctor) if section for part in (section, "")]
    return "\n".join([
        HEADER,
        f"Last run: {stamp}.",
        "",
        *_section_or_kept(previous, "## Targets", targets(folder) if _detection_files(folder)
                          or (folder / "remedy.json").exists() else "Not run."),
        "## Machine",
        "",
        machine(),
        "",
        *_section_or_kept(previous, "## Detection", detection_section(folder)),
        *_section_or_kept(previous, "## Remedies", remedy_section(folder)),
        *_section_or_kept(previous, "## Overhead", overhead_section(folder)),
        *extra,
    ])


def _section_or_kept(previous: str, heading: str, body: str) -> list[str]:
    """A section from this run's results, or (``Not run.``) the page's section as it was."""
    kept = kept_section(previous, heading) if body == "Not run." else ""
    if not kept:
        return [heading, "", body, ""]
    mark = "_Not rerun by the last `make bench`: the results below are those of the run before._"
    lines = kept.splitlines()
    if mark not in kept:
        lines[1:1] = ["", mark]
    return ["\n".join(lines), ""]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.docs_page RESULTS_FOLDER OUTPUT.md", file=sys.stderr)
        return 2
    folder, out = Path(args[0]), Path(args[1])
    previous = out.read_text() if out.exists() else ""
    out.write_text(render(folder, previous, docs=out))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
