"""The Report: what a run's gradients looked like, what was wrong, and what was done.

A :class:`Report` is plain data. It renders as text (:meth:`Report.summary`), a dict
(:meth:`Report.to_dict`, with ``schema_version``) and JSON (:meth:`Report.to_json`), and is
rebuilt from either (:meth:`Report.from_dict`, :meth:`Report.from_json`). JUnit XML
(:meth:`Report.to_junit`), HTML (:meth:`Report.to_html`) and figures (:meth:`Report.plot`) are
rendered by :mod:`gradwatch.report.junit`, :mod:`~gradwatch.report.html` and
:mod:`~gradwatch.report.figures`; matplotlib is
imported only when a figure is drawn.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from gradwatch.findings import Action, Finding, severity_rank
from gradwatch.jsonvalues import number_from_json, to_json

SCHEMA_VERSION = 1


FAIL_ON = ("info", "warning", "error", "never")
"""What ``fail_on`` accepts everywhere (``gradwatch check --fail-on``, the pytest marker, JUnit and
HTML verdicts, :meth:`Report.fails`): a severity, or ``"never"`` to report without failing."""


def check_fail_on(fail_on: str) -> str:
    """Validate a ``fail_on`` value.

    Args:
        fail_on: ``"info"``, ``"warning"``, ``"error"`` or ``"never"``.

    Returns:
        The value.

    Raises:
        ValueError: for anything else.
    """
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {FAIL_ON}; received {fail_on!r}.")
    return fail_on


def _fmt(value: float, spec: str = ".3g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _gist(message: str) -> str:
    """A message without its numbers: repeats of one finding with other values group together."""
    return "".join("#" if c.isdigit() else c for c in message)[:60]


def _grouped(items: list[Any], key: Any) -> list[str]:
    """One line per group of items (first-seen order): the first item, and with repeats how many
    and the latest one."""
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    lines = []
    for members in groups.values():
        lines.append(str(members[0]))
        if len(members) > 1:
            lines.append(f"  ... {len(members) - 1} more like it, the latest: {members[-1]}")
    return lines


@dataclass
class Report:
    """A run's gradient health.

    Attributes:
        healthy: No finding of severity ``warning`` or ``error``.
        policy: The policy's name (``"auto"``, ``"observe"``).
        framework: The framework adapter that produced it ("" for synthetic streams).
        steps_measured: Optimizer steps measured.
        first_step: First measured step (-1 if none).
        last_step: Last measured step (-1 if none).
        findings: Findings, repeats merged (``count``, ``last_step``); the most recent ones when
            there were more than the monitor keeps.
        actions: Actions taken, the most recent ones when there were more than the monitor keeps.
        finding_counts: ``{kind: {severity: steps}}`` over the whole run.
        action_counts: ``{kind: count}`` over the whole run.
        skipped_steps: Steps the framework skipped on its own (GradScaler, LossScaleOptimizer).
        skipped: The most recent of those, ``{"step", "reason"}``.
        layers: One dict per layer, forward order: ``layer``, ``tensors``, ``roles``, ``numel``,
            ``grad_norm`` (last), ``grad_norm_max`` (over the steps kept in history), ``param_norm``, ``ratio``, ``dead_fraction``,
            ``nonfinite_steps``.
        history: Recent steps for plots: ``steps``, ``global_norm``, ``loss``, ``lr_factor``,
            ``layer_names`` and ``layer_grad_norm`` (steps x layers).
        rescued: gradwatch changed the run (skip, clip, LR, rollback) and its last steps were
            healthy: no finding of severity warning or error and a finite loss over the last
            ``max(20, 10%)`` measured steps, whose median is below 0.9x the median of the run's first
            seven losses (when losses are recorded). ``healthy`` stays False: the findings were real.
    """

    healthy: bool
    policy: str = ""
    framework: str = ""
    steps_measured: int = 0
    first_step: int = -1
    last_step: int = -1
    findings: list[Finding] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    finding_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    action_counts: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)
    rescued: bool = False

    def worst_severity(self) -> str | None:
        """The most severe finding's severity, or None without findings."""
        severities = [sev for counts in self.finding_counts.values() for sev, n in counts.items() if n]
        severities += [f.severity for f in self.findings]
        return max(severities, key=severity_rank) if severities else None

    def kinds(self, min_severity: str = "info") -> list[str]:
        """Finding kinds seen at or above ``min_severity``, sorted."""
        floor = severity_rank(min_severity)
        kinds = {k for k, counts in self.finding_counts.items() for sev, n in counts.items() if n and severity_rank(sev) >= floor}
        kinds |= {f.kind for f in self.findings if severity_rank(f.severity) >= floor}
        return sorted(kinds)

    def fails(self, fail_on: str = "warning") -> bool:
        """True when a finding at or above ``fail_on`` was made (what ``gradwatch check`` exits 1 on).

        Args:
            fail_on: One of :data:`FAIL_ON`; ``"never"`` never fails. Defaults to ``"warning"``.

        Raises:
            ValueError: for a value not in :data:`FAIL_ON`.
        """
        if check_fail_on(fail_on) == "never":
            return False
        return bool(self.kinds(fail_on))

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with a ``schema_version``; NaN becomes None, inf becomes "inf"."""
        return {
            "schema_version": SCHEMA_VERSION,
            "healthy": self.healthy,
            "policy": self.policy,
            "framework": self.framework,
            "steps_measured": self.steps_measured,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "findings": [f.to_dict() for f in self.findings],
            "actions": [a.to_dict() for a in self.actions],
            "finding_counts": self.finding_counts,
            "action_counts": self.action_counts,
            "skipped_steps": self.skipped_steps,
            "skipped": self.skipped,
            "layers": to_json(self.layers),
            "history": to_json(self.history),
            "rescued": self.rescued,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output.

        Raises:
            ValueError: if the dict is not a gradwatch report of a known schema version.
        """
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"Not a gradwatch report of schema_version {SCHEMA_VERSION}: received schema_version={version!r}."
            )
        layers = [
            {k: (number_from_json(v) if k in ("grad_norm", "grad_norm_max", "param_norm", "ratio", "dead_fraction") else v)
             for k, v in layer.items()}
            for layer in d.get("layers", [])
        ]
        history = dict(d.get("history", {}))
        for key in ("global_norm", "loss", "lr_factor"):
            if key in history:
                history[key] = [number_from_json(x) for x in history[key]]
        if "layer_grad_norm" in history:
            history["layer_grad_norm"] = [[number_from_json(x) for x in row] for row in history["layer_grad_norm"]]
        return cls(
            healthy=bool(d["healthy"]),
            policy=d.get("policy", ""),
            framework=d.get("framework", ""),
            steps_measured=d.get("steps_measured", 0),
            first_step=d.get("first_step", -1),
            last_step=d.get("last_step", -1),
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            actions=[Action.from_dict(a) for a in d.get("actions", [])],
            finding_counts={k: dict(v) for k, v in d.get("finding_counts", {}).items()},
            action_counts=dict(d.get("action_counts", {})),
            skipped_steps=d.get("skipped_steps", 0),
            skipped=list(d.get("skipped", [])),
            layers=layers,
            history=history,
            rescued=bool(d.get("rescued", False)),
        )

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    # -- text ------------------------------------------------------------------------------------

    def layer_table(self, max_layers: int = 40) -> str:
        """A fixed-width table of the layers: last gradient norm, parameter norm, their ratio,
        dead fraction and non-finite steps."""
        if not self.layers:
            return "(no layers measured)"
        name_width = min(max(len(str(layer["layer"])) for layer in self.layers), 40)
        header = f"{'layer':<{name_width}}  {'grad_norm':>10}  {'max':>10}  {'param_norm':>10}  {'grad/param':>10}  {'dead':>5}  {'nonfinite':>9}"
        rows = [header, "-" * len(header)]
        shown = self.layers if len(self.layers) <= max_layers else self.layers[: max_layers // 2] + self.layers[-max_layers // 2:]
        for i, layer in enumerate(shown):
            if len(self.layers) > max_layers and i == max_layers // 2:
                rows.append(f"... {len(self.layers) - max_layers} more layers ...")
            name = "".join(c if c.isprintable() else "?" for c in str(layer["layer"]))
            name = name if len(name) <= name_width else "..." + name[-(name_width - 3):]
            dead = layer.get("dead_fraction", math.nan)
            rows.append(
                f"{name:<{name_width}}  {_fmt(layer['grad_norm']):>10}  {_fmt(layer.get('grad_norm_max', math.nan)):>10}  "
                f"{_fmt(layer['param_norm']):>10}  {_fmt(layer['ratio']):>10}  "
                f"{('-' if math.isnan(dead) else f'{dead:.0%}'):>5}  {layer.get('nonfinite_steps', 0):>9}"
            )
        return "\n".join(rows)

    def verdict(self) -> str:
        """``HEALTHY``, ``RESCUED`` (unhealthy, then healthy after gradwatch's remedies) or
        ``UNHEALTHY``."""
        if self.healthy:
            return "HEALTHY"
        return "RESCUED" if self.rescued else "UNHEALTHY"

    def summary(self, *, table: bool = True) -> str:
        """A readable text summary: verdict, layer table, findings, actions. Repeats are grouped:
        one line per kind of finding (the first and the latest of each), and per kind of action
        the first, the latest and the count, so the action that mattered is never hidden behind
        a run of identical ones."""
        span = f"steps {self.first_step}-{self.last_step}" if self.steps_measured else "no steps"
        lines = [f"gradwatch: {self.verdict()} ({self.steps_measured} measured {span}, policy={self.policy}"
                 + (f", {self.framework}" if self.framework else "") + ")"]
        if self.rescued:
            last = max((f.last_step for f in self.findings if severity_rank(f.severity) >= 1), default=-1)
            lines.append(f"  The run had problems (last at step {last}) and was healthy after gradwatch's remedies "
                         f"({', '.join(sorted(self.action_counts))}).")
        if self.skipped_steps:
            lines.append(f"  {self.skipped_steps} step(s) skipped by the loss scaler (inf/NaN in scaled gradients); not counted as explosions.")
        if table and self.layers:
            lines += ["", self.layer_table()]
        lines.append("")
        if self.findings:
            lines.append("Findings:")
            lines += [f"  {line}" for line in _grouped(self.findings, lambda f: (f.kind, f.severity, _gist(f.message)))]
        else:
            lines.append("Findings: none")
        if self.actions:
            lines.append("Actions:")
            counts = ", ".join(f"{k} x{n}" for k, n in sorted(self.action_counts.items()))
            lines.append(f"  ({counts})")
            lines += [f"  {line}" for line in _grouped(self.actions, lambda a: (a.kind, a.reason))]
        else:
            lines.append("Actions: none")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    # -- renderings (gradwatch.report.junit, gradwatch.report.html, gradwatch.report.figures) ------

    def to_junit(self, *, name: str = "gradwatch", fail_on: str = "warning", time: float = 0.0) -> str:
        """JUnit XML with one test case per finding kind; see :func:`gradwatch.report.junit.to_junit`."""
        from gradwatch.report.junit import to_junit

        return to_junit(self, name=name, fail_on=fail_on, time=time)

    def to_html(self, *, title: str = "", fail_on: str = "warning") -> str:
        """One self-contained HTML page with the figures embedded; needs ``gradwatch[report]``.
        See :func:`gradwatch.report.html.to_html`."""
        from gradwatch.report.html import to_html

        return to_html(self, title=title, fail_on=fail_on)

    def plot(self, kind: str = "global_norm", *, path: str | os.PathLike[str] | None = None,
             dpi: int = 110, width: float = 11.0) -> Any:
        """Draw ``"global_norm"`` (with actions marked) or ``"heatmap"`` (per layer over the steps)
        and save it when ``path`` is given; returns the matplotlib figure. Needs
        ``gradwatch[report]``. See :func:`gradwatch.report.figures.plot`."""
        from gradwatch.report.figures import plot

        return plot(self, kind, path=path, dpi=dpi, width=width)
