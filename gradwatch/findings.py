"""The vocabulary: findings (what is wrong) and actions (what was done about it).

Both are plain records that serialise to dicts and back; they are part of the public API and of
the JSON report schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradwatch.jsonvalues import to_json

SEVERITIES = ("info", "warning", "error")
FINDING_KINDS = ("nonfinite", "exploding", "vanishing", "dead_units", "loss_spike")
"""Built-in finding kinds. Plugins may add their own."""
ACTION_KINDS = ("clip", "lr_decay", "skip_step", "rollback", "recommend_batchnorm")


def severity_rank(severity: str) -> int:
    """0 for ``info``, 1 for ``warning``, 2 for ``error``.

    Raises:
        ValueError: for any other string.
    """
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(f"severity must be one of {SEVERITIES}; received {severity!r}.") from None



@dataclass
class Finding:
    """Something wrong with the run, found at one step (and possibly repeated since).

    Args:
        kind: One of :data:`FINDING_KINDS`, or a plugin's own kind.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        step: The optimizer step where it was first seen.
        layers: The layers involved, named as the framework names them.
        message: One line a person can act on.
        evidence: The numbers behind it.
        count: How many measured steps showed it (the monitor merges repeats). Defaults to 1.
        last_step: The last step that showed it. Defaults to ``step``.

    Raises:
        ValueError: for an unknown severity.
    """

    kind: str
    severity: str
    step: int
    layers: tuple[str, ...] = ()
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    count: int = 1
    last_step: int = -1

    def __post_init__(self) -> None:
        severity_rank(self.severity)
        self.layers = tuple(self.layers)
        self.step = int(self.step)
        if self.last_step < 0:
            self.last_step = self.step

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "step": self.step,
            "last_step": self.last_step,
            "count": self.count,
            "layers": list(self.layers),
            "message": self.message,
            "evidence": to_json(self.evidence),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(
            kind=d["kind"],
            severity=d["severity"],
            step=d["step"],
            layers=tuple(d.get("layers", ())),
            message=d.get("message", ""),
            evidence=dict(d.get("evidence", {})),
            count=d.get("count", 1),
            last_step=d.get("last_step", -1),
        )

    def __str__(self) -> str:
        span = f"step {self.step}" if self.count == 1 else f"steps {self.step}-{self.last_step} (x{self.count})"
        return f"[{self.severity}] {self.kind} at {span}: {self.message}"


@dataclass
class Action:
    """A remedy taken (or, for ``recommend_batchnorm``, advised) at one step.

    Args:
        kind: One of :data:`ACTION_KINDS`.
        step: The optimizer step it applies to.
        reason: The kind of the finding that caused it.
        before: Values before (``{"global_norm": 812.0}``, ``{"lr_factor": 1.0}``).
        after: Values after (``{"global_norm": 3.2}``, ``{"lr_factor": 0.5}``).
        params: What the adapter must do (``{"max_norm": 3.2}``, ``{"factor": 0.5}``,
            ``{"insert_after": [...]}``).
        message: One line for people.
    """

    kind: str
    step: int
    reason: str
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "reason": self.reason,
            "before": to_json(self.before),
            "after": to_json(self.after),
            "params": to_json(self.params),
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Action:
        return cls(
            kind=d["kind"],
            step=d["step"],
            reason=d.get("reason", ""),
            before=dict(d.get("before", {})),
            after=dict(d.get("after", {})),
            params=dict(d.get("params", {})),
            message=d.get("message", ""),
        )

    def __str__(self) -> str:
        return f"{self.kind} at step {self.step} (because {self.reason}): {self.message}"
