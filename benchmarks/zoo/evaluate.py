"""One zoo run from its seed to its outcome, framework-free: the runner does the training.

:func:`evaluate` trains the same spec several times from the same seed (identical data order):

a. **unwatched, with a probe** (plain-framework measurements, nothing from gradwatch): the label
   check (:mod:`benchmarks.zoo.labels`) reads it; a run whose label is not confirmed is dropped;
d. for a pathological run, **its healthy twin** unwatched with the probe (the same spec without
   the pathology): the yardstick of some label checks and of the rescue criterion;
b. **watched** with ``gradwatch.watch(model, optimizer, policy="observe", strict=True)`` and
   ``record_loss`` every step: detection, false alarms (:func:`benchmarks.detection.scoring.score`),
   and the parameters must end bit-for-bit equal to (a);
c. **watched with the defaults** (``policy="auto"``), as a user writes it: on a healthy run
   anything it changed (an action, or parameters not bit-equal to (a)); on a diverging run,
   whether it rescued it.

A runner implements :class:`Runner` (``benchmarks.zoo.torch_runner.TorchRunner``; a Keras one
next): ``train(spec, mode)`` with mode ``"probe"``, ``"observe"`` or ``"auto"``, and
``same_params(a, b)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from benchmarks.detection.scoring import score
from benchmarks.detection.trace import Trace

from . import labels
from .pathologies import DIVERGING, NONFINITE
from .spec import RunSpec

TRAINING_ACTIONS = ("clip", "lr_decay", "skip_step", "rollback")
"""Actions that change training (``recommend_batchnorm`` is advice: it changes nothing)."""


@dataclass
class RunResult:
    """What one training run left: the numbers every mode has, and the probe's trace or the
    watch's report.

    Attributes:
        mode: ``"probe"``, ``"observe"`` or ``"auto"``.
        loss: The batch loss per step.
        batch_sizes: Rows per step (the last batch of an epoch may be short).
        train_loss_before: Loss on the whole training split before training (eval mode).
        train_loss_after: The same after training.
        test_loss: Loss on the test split after training.
        test_accuracy: Test accuracy after training (NaN for regression).
        chance: Test accuracy of the most frequent class (NaN for regression).
        classifier: The task is classification.
        params: The final parameters, opaque (compared by the runner's ``same_params``).
        trace: The probe's measurements (mode ``"probe"``), else None.
        report: The ``gradwatch.Report`` (watched modes), else None.
        first_weight: Name of the first trainable weight matrix (the vanishing check's).
        last_weight: Name of the last one.
        dead_module: The module whose units a ``dying_relu`` kills ("" otherwise).
        warnings: ``GradwatchWarning`` messages raised during the run.
        seconds: Wall time.
    """

    mode: str
    loss: list[float]
    batch_sizes: list[int]
    train_loss_before: float
    train_loss_after: float
    test_loss: float
    test_accuracy: float
    chance: float
    classifier: bool
    params: Any = None
    trace: Trace | None = None
    report: Any = None
    first_weight: str = ""
    last_weight: str = ""
    dead_module: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def numbers(self) -> dict[str, float]:
        return {"train_loss_before": self.train_loss_before, "train_loss_after": self.train_loss_after,
                "test_loss": self.test_loss, "test_accuracy": self.test_accuracy, "seconds": round(self.seconds, 3)}


class Runner(Protocol):
    """What :func:`evaluate` needs from a framework."""

    framework: str

    def train(self, spec: RunSpec, mode: str) -> RunResult:
        """Train ``spec`` from its seed: ``"probe"`` (unwatched, measured), ``"observe"`` or ``"auto"``."""
        ...

    def same_params(self, a: Any, b: Any) -> bool:
        """Every parameter of ``a`` bit-for-bit equal to ``b``'s."""
        ...


@dataclass
class ZooOutcome:
    """One seed's result, JSON-able (it crosses process boundaries as ``asdict``).

    Attributes:
        seed: The seed.
        framework: The runner's framework.
        spec: :meth:`RunSpec.to_dict`.
        line: ``str(spec)``.
        family: The model family.
        pathology: The pathology's name, or None.
        label: ``"healthy"`` or the expected kind.
        onset: The pathology's onset (None for healthy).
        status: ``"kept"``, ``"dropped"`` (label not confirmed) or ``"error"``.
        reason: Why it was dropped, or the error.
        check: The label check's evidence.
        detected: A warning/error finding of the expected kind at or after the onset (observe).
        latency: Its step minus the onset.
        first_kind: Kind of the first warning/error finding at or after the onset.
        other_kinds: Other warning/error kinds found at or after the onset.
        nonfinite_found: A ``nonfinite`` warning/error at or after the onset (observe).
        probe_nonfinite_step: First non-finite step of the unwatched run.
        false_alarms: Each warning/error finding of the observed run on a healthy run or before
            the onset: ``kind``, ``severity``, ``step``, ``message``, ``context``.
        info: ``kind@step`` of ``info`` findings (never alarms).
        observe_identical: The observed run ended bit-for-bit equal to the unwatched one.
        auto: The auto run: ``actions`` (counts), ``first_actions``, ``identical``, ``kinds``,
            ``warnings`` and its numbers.
        unwatched: The unwatched run's numbers.
        twin: The twin's numbers (pathological runs).
        changed: Healthy runs: ``auto`` took a training action or its parameters differ.
        diverged: The unwatched run diverges (``labels.diverged``); None where not judged.
        needs_rescue: Diverging runs: the unwatched run diverges and fails the rescue criterion.
        rescued: Diverging runs: the auto run meets it.
        rescue_note: The numbers behind it.
        seconds: Wall time of every run of this seed.
    """

    seed: int
    framework: str
    spec: dict[str, Any]
    line: str
    family: str
    pathology: str | None
    label: str
    onset: int | None
    status: str = "kept"
    reason: str = ""
    check: str = ""
    detected: bool = False
    latency: int | None = None
    first_kind: str | None = None
    other_kinds: list[str] = field(default_factory=list)
    nonfinite_found: bool = False
    probe_nonfinite_step: int | None = None
    false_alarms: list[dict[str, Any]] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    observe_identical: bool | None = None
    auto: dict[str, Any] = field(default_factory=dict)
    unwatched: dict[str, float] = field(default_factory=dict)
    twin: dict[str, float] | None = None
    changed: bool | None = None
    diverged: bool | None = None
    needs_rescue: bool | None = None
    rescued: bool | None = None
    rescue_note: str = ""
    rescue_note_unwatched: str = ""
    seconds: float = 0.0

    @property
    def kept(self) -> bool:
        return self.status == "kept"

    @property
    def healthy(self) -> bool:
        return self.pathology is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooOutcome:
        return cls(**d)


def _at(values: list[float] | np.ndarray, step: int) -> float:
    return float(values[step]) if 0 <= step < len(values) else math.nan


def alarm_context(spec: RunSpec, probe: RunResult, kind: str, step: int) -> dict[str, Any]:
    """What the unwatched run looked like at a false alarm's step: plain numbers and tags that
    say which kind of run the judgement failed on (``short batch``, ``zero loss``...)."""
    gt = probe.trace.main
    loss = np.asarray(gt.loss, float)
    norms = labels.global_norm(gt)
    bs = np.asarray(probe.batch_sizes)
    usual = int(np.median(bs)) if bs.size else 0
    lo = max(0, step - 10)
    tags = []
    if 0 <= step < bs.size and bs[step] < 0.5 * usual:
        tags.append("short batch")
    if spec.batch_size <= 4:
        tags.append("tiny batch")
    if float(np.min(loss[lo:step + 1], initial=np.inf)) == 0.0:
        tags.append("zero loss")
    elif _at(loss, step) < 1e-3 * max(float(loss[0]), 1e-30):
        tags.append("near-zero loss")
    if _at(norms, step) < 1e-3 * max(float(norms[0]), 1e-30):
        tags.append("gradients shrunk 1000x")
    lr = np.asarray(gt.lr, float)
    if step > 0 and not 0.5 <= _at(lr, step) / max(float(lr[lo]), 1e-30) <= 2.0:
        tags.append("LR moving")
    if step < 10:
        tags.append("first 10 steps")
    for flag, tag in ((spec.bf16, "bf16"), (bool(spec.frozen), "frozen layer"), (spec.norm == "batch", "batchnorm")):
        if flag:
            tags.append(tag)
    before = norms[lo:step]
    note = (f"batch {int(bs[step]) if step < bs.size else '?'} (usual {usual}), loss {_at(loss, step):.3g} "
            f"(first {loss[0]:.3g}), grad norm {_at(norms, step):.3g} (median of 10 before "
            f"{float(np.median(before)) if before.size else math.nan:.3g}), lr {_at(lr, step):.3g}")
    if kind == "vanishing" and probe.first_weight and probe.last_weight and 0 <= step < len(gt.grad_norm):
        g, p = gt.grads()[step], gt.params()[step]
        i, j = gt.column(probe.first_weight), gt.column(probe.last_weight)
        note += f", probe (||g||/||W||) first/last = {(g[i] / p[i]) / (g[j] / p[j]):.2g}"
    if kind == "dead_units" and probe.trace.dead:
        shares = {m: _at(v, step) for m, v in probe.trace.dead.items()}
        worst = max(shares, key=lambda m: -1 if math.isnan(shares[m]) else shares[m])
        note += f", probe: largest exactly-zero share {shares[worst]:.0%} ({worst})"
    return {"tags": tags, "note": note}


def _actions(report: Any) -> tuple[dict[str, int], list[str]]:
    counts = dict(getattr(report, "action_counts", {}) or {})
    first = [f"{a.kind}@{a.step} ({a.reason})" for a in list(report.actions)[:6]]
    return counts, first


def evaluate(spec: RunSpec, runner: Runner) -> ZooOutcome:
    """Run and score one spec (see the module docstring for the runs).

    Args:
        spec: The run.
        runner: The framework's runner.

    Returns:
        The outcome; ``status="dropped"`` when the label is not confirmed. Exceptions propagate
        (the caller records them as errors).
    """
    start = time.perf_counter()
    p = spec.pathology
    out = ZooOutcome(seed=spec.seed, framework=runner.framework, spec=spec.to_dict(), line=str(spec),
                     family=spec.family, pathology=None if p is None else p.name, label=spec.label,
                     onset=None if p is None else p.onset)
    probe = runner.train(spec, "probe")
    out.unwatched = probe.numbers()
    out.probe_nonfinite_step = labels.first_nonfinite(probe)
    twin = None
    if p is not None and p.name in DIVERGING:
        twin = runner.train(spec.twin(), "probe")
        out.twin = twin.numbers()
    check = labels.confirm(spec, probe, twin)
    out.check = check.evidence
    if not check.ok:
        out.status, out.reason = "dropped", check.evidence
        out.seconds = time.perf_counter() - start
        return out

    observed = runner.train(spec, "observe")
    out.observe_identical = runner.same_params(observed.params, probe.params)
    findings = list(observed.report.findings)
    scored = score(framework=runner.framework, name=f"seed-{spec.seed}", label=spec.label, about=str(spec),
                   onset=out.onset, check=check, findings=findings, identical=out.observe_identical, seconds=0.0)
    out.detected, out.latency, out.first_kind = scored.detected, scored.latency, scored.first_kind
    out.other_kinds, out.info = scored.other_kinds, scored.info
    begin = 0 if out.onset is None else out.onset
    for f in sorted(findings, key=lambda f: f.step):
        if f.severity not in ("warning", "error"):
            continue
        if p is None or f.step < begin:
            out.false_alarms.append({"kind": f.kind, "severity": f.severity, "step": f.step,
                                     "message": f.message, "layers": list(f.layers),
                                     "context": alarm_context(spec, probe, f.kind, f.step)})
        elif f.kind == NONFINITE:
            out.nonfinite_found = True

    auto = runner.train(spec, "auto")
    counts, first = _actions(auto.report)
    identical = runner.same_params(auto.params, probe.params)
    out.auto = {"actions": counts, "first_actions": first, "identical": identical,
                "kinds": auto.report.kinds("warning"), "warnings": auto.warnings, **auto.numbers()}
    if p is None:
        out.changed = any(counts.get(k, 0) for k in TRAINING_ACTIONS) or not identical
    elif p.name in DIVERGING and twin is not None:
        ok_unwatched, note = labels.rescued(probe, twin)
        out.rescue_note_unwatched = ("ok: " if ok_unwatched else "fails: ") + note
        out.diverged = labels.diverged(probe, out.onset or 0)
        out.needs_rescue = not ok_unwatched and out.diverged
        out.rescued, out.rescue_note = labels.rescued(auto, twin)
    out.seconds = time.perf_counter() - start
    return out


def error_outcome(spec: RunSpec, framework: str, exc: BaseException, seconds: float) -> ZooOutcome:
    """The outcome of a seed whose runs raised: listed as an error, never as a pass."""
    p = spec.pathology
    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return ZooOutcome(seed=spec.seed, framework=framework, spec=spec.to_dict(), line=str(spec), family=spec.family,
                      pathology=None if p is None else p.name, label=spec.label,
                      onset=None if p is None else p.onset, status="error", reason=message, seconds=seconds)


__all__ = ["TRAINING_ACTIONS", "RunResult", "Runner", "ZooOutcome", "alarm_context", "error_outcome",
           "evaluate"]
