"""Running the doctor: :func:`run_doctor` on a setup, :func:`doctor_target` on a target.

The sequence, whatever the framework:

1. the adapter keeps a pristine copy of the model and optimizer, caches the batches the trials
   will share, and describes the model (:class:`~gradwatch.doctor.model.ModelDescription`,
   forward probes included);
2. the **baseline** trial trains an unchanged copy for ``steps`` steps under
   ``policy="observe"`` (the same run as ``gradwatch check``); its findings and numbers give the
   symptoms and the causes (:func:`~gradwatch.doctor.causes.diagnose`). No cause and no finding:
   *nothing to repair*, no trial;
3. one **trial** per candidate the causes call for (:func:`~gradwatch.doctor.repairs.propose`),
   same steps, batches and seed, stopped early when hopeless
   (:class:`~gradwatch.doctor.trials.EarlyStop`), and not started when the time budget would
   be exceeded;
4. the **pair** of the two best candidates that do not change the same thing;
5. the ranking (:func:`~gradwatch.doctor.trials.rank`).

The adapters implement :class:`DoctorAdapter`; this module imports no framework.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

import numpy as np

from gradwatch.check.spec import CheckSpec, as_spec, detect_framework
from gradwatch.check.targets import load_target, seed_everything, seeded
from gradwatch.doctor.causes import Cause, diagnose, symptoms_of
from gradwatch.doctor.model import ModelDescription
from gradwatch.doctor.repairs import Candidate, combine, propose
from gradwatch.doctor.result import DoctorResult
from gradwatch.doctor.trials import EarlyStop, TrialResult, rank
from gradwatch.errors import BadTargetError
from gradwatch.report import Report

__all__ = [
    "DEFAULT_DOCTOR_STEPS",
    "DoctorAdapter",
    "TrialProgress",
    "adapter_for",
    "diagnose_baseline",
    "doctor_target",
    "layer_grad_norms",
    "run_doctor",
]

DEFAULT_DOCTOR_STEPS = 60
"""Steps of each trial when neither the caller nor the :class:`~gradwatch.CheckSpec` says."""

StepProgress = Callable[[int, int], None]
ProgressFn = Callable[[str, int, int], None]


class DoctorAdapter(Protocol):
    """The framework side of the doctor (``gradwatch.integrations.torch.doctor.TorchDoctor``,
    ``gradwatch.integrations.keras.doctor.KerasDoctor``)."""

    framework: str

    def describe(self) -> ModelDescription:
        """The model's layers, activations (forward probes on a few batches) and optimizer."""

    def applicable(self, candidate: Candidate) -> tuple[str, str]:
        """``("", "")`` when the candidate can be applied to a copy of the model; otherwise why
        not, and the change to make in the model's code instead."""

    def trial(self, candidate: Candidate | None, *, steps: int, stop: Callable[[Sequence[float]], str] | None,
              progress: StepProgress | None) -> TrialResult:
        """Train a fresh copy (with the candidate applied; None: the baseline) for ``steps``
        steps, watched under ``policy="observe"``, calling ``stop(losses)`` after every step."""


class TrialProgress:
    """The progress display of a doctor run: one bar (or line) per trial, labelled.

    Args:
        prefix: Text before each trial's label. Defaults to ``"gradwatch doctor"``.
        stream: Where to write. Defaults to ``sys.stderr``.
        tty: Draw bars. Defaults to None (``stream.isatty()``).
    """

    def __init__(self, prefix: str = "gradwatch doctor", *, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.prefix = prefix
        self.stream = stream
        self.tty = tty
        self._label: str | None = None
        self._bar: Any = None

    def __call__(self, label: str, done: int, total: int) -> None:
        from gradwatch.check.loops import Progress

        if label != self._label:
            self.close()
            self._bar = Progress(f"{self.prefix} [{label}]", stream=self.stream, tty=self.tty)
            self._label = label
        self._bar(done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._label = None, None


def adapter_for(spec: CheckSpec, *, seed: int | None, device: str | None, steps: int, origin: str) -> DoctorAdapter:
    """The framework adapter for a spec (imports the integration on first use).

    Raises:
        BadTargetError: for a spec without a PyTorch or Keras model.
    """
    framework = spec.framework
    if framework == "torch":
        from gradwatch.integrations.torch.doctor import TorchDoctor

        return TorchDoctor(spec, seed=seed, device=device, steps=steps, origin=origin)
    if framework == "keras":
        from gradwatch.integrations.keras.doctor import KerasDoctor

        return KerasDoctor(spec, seed=seed, device=device, steps=steps, origin=origin)
    raise BadTargetError(
        f"gradwatch doctor needs a model it can copy, rewrite and train; {origin} gave a "
        f"{'stream of StepStats' if framework == 'stats' else 'setup without a PyTorch or Keras model'}. "
        "Return (model, optimizer, batches, loss_fn) for PyTorch or (model, x, y) for Keras."
    )


def layer_grad_norms(report: Report | None) -> dict[str, float]:
    """Each layer's median gradient norm over a report's history (finite steps only)."""
    history = (report.history if report is not None else None) or {}
    names = [str(n) for n in history.get("layer_names", [])]
    rows = np.asarray(history.get("layer_grad_norm", []), dtype=float)
    if not names or rows.size == 0:
        return {}
    rows = rows.reshape(-1, len(names))
    out = {}
    for i, name in enumerate(names):
        column = rows[:, i]
        column = column[np.isfinite(column)]
        if column.size:
            out[name] = float(np.median(column))
    return out


def _global_norms(report: Report | None) -> list[float]:
    history = (report.history if report is not None else None) or {}
    return [float(v) for v in history.get("global_norm", [])]


def _dead_layers(report: Report | None) -> list[str]:
    if report is None:
        return []
    return list(dict.fromkeys(name for f in report.findings if f.kind == "dead_units" for name in f.layers))


def diagnose_baseline(description: ModelDescription, baseline: TrialResult) -> tuple[tuple[str, ...], list[Cause]]:
    """The symptoms of a baseline trial and the causes that explain them.

    Args:
        description: The model as the adapter described it.
        baseline: The baseline trial (its report, losses and first update ratios).

    Returns:
        ``(symptoms, causes)``: see :func:`~gradwatch.doctor.causes.symptoms_of` and
        :func:`~gradwatch.doctor.causes.diagnose`.
    """
    report = baseline.report
    symptoms = symptoms_of(report.kinds("warning") if report is not None else [], baseline.losses)
    causes = diagnose(description, symptoms=symptoms, dead_layers=_dead_layers(report),
                      grad_norms=layer_grad_norms(report), update_ratios=baseline.update_ratios,
                      global_norms=_global_norms(report))
    return symptoms, causes


def _better_than_baseline(trial: TrialResult, baseline: TrialResult) -> bool:
    if trial.tier > 1:
        return False
    if baseline.tier > 1:
        return True
    return trial.tier < baseline.tier or trial.final_loss < baseline.final_loss


def run_doctor(
    setup: Any,
    *,
    steps: int | None = None,
    seed: int | None = 0,
    device: str | None = None,
    budget_s: float | None = None,
    full_steps: int | None = None,
    max_trials: int = 8,
    pairs: bool = True,
    progress: ProgressFn | None = None,
    name: str = "",
) -> DoctorResult:
    """Diagnose a setup, try the repairs its causes call for, and rank them.

    Args:
        setup: What a ``gradwatch check`` factory returns (a PyTorch or Keras tuple, a
            :class:`~gradwatch.CheckSpec`), or the factory itself (called after seeding).
        steps: Steps of every trial, the baseline's included. Defaults to None: the spec's
            ``steps``, else :data:`DEFAULT_DOCTOR_STEPS`.
        seed: Seed set before the factory is called and before every trial, so that every trial
            starts from the same weights and sees the same batches. Defaults to 0.
        device: Where to train (``"cuda"``, ``"cpu"``). Defaults to None (where the factory put it).
        budget_s: The doctor's time budget in seconds: a trial is not started when the time
            spent plus the longest trial so far would exceed it. Defaults to None (no limit but
            ``max_trials``).
        full_steps: The steps of one full training run of the baseline; the budget is then the
            time that run takes at the baseline trial's pace (its first step once, then its steady
            step time), unless ``budget_s`` is given. Defaults to None.
        max_trials: Most candidate trials, the pair included. Defaults to 8.
        pairs: Also try the best two candidates together. Defaults to True.
        progress: Called as ``progress(label, done, total)`` after every step of every trial.
            Defaults to None.
        name: Origin for messages (the target). Defaults to "".

    Returns:
        The :class:`~gradwatch.doctor.DoctorResult`: causes, the ranked trials with the repaired
        model objects, and the best repair.

    Raises:
        BadTargetError: when the factory raises or returns something the doctor cannot train.
        ValueError: for ``steps < 10`` (the detectors need a window), ``max_trials < 0``,
            ``budget_s <= 0`` or ``full_steps < 1``.
    """
    origin = name or "the factory"
    start = time.perf_counter()
    with seeded(seed):
        if callable(setup) and not isinstance(setup, CheckSpec) and detect_framework(setup) is None:
            try:
                setup = setup()
            except Exception as exc:
                raise BadTargetError(f"{origin} raised {type(exc).__name__}: {exc}") from exc
    spec = as_spec(setup, origin=origin)
    total = steps if steps is not None else (spec.steps or DEFAULT_DOCTOR_STEPS)
    if total < 10:
        raise ValueError(f"gradwatch doctor needs steps >= 10 per trial (the detectors' window); received steps={total}.")
    if max_trials < 0:
        raise ValueError(f"max_trials must be >= 0; received max_trials={max_trials}.")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds; received budget_s={budget_s}.")
    if full_steps is not None and full_steps < 1:
        raise ValueError(f"full_steps must be >= 1; received full_steps={full_steps}.")
    if seed is not None:
        seed_everything(seed)
    adapter = adapter_for(spec, seed=seed, device=device, steps=total, origin=origin)
    description = adapter.describe()

    def bar(label: str) -> StepProgress | None:
        return None if progress is None else (lambda done, n: progress(label, done, n))

    baseline = adapter.trial(None, steps=total, stop=None, progress=bar("baseline"))
    if baseline.error:
        raise BadTargetError(f"The setup from {origin} fails as it is: {baseline.error}")
    symptoms, causes = diagnose_baseline(description, baseline)
    budget = budget_s
    if budget is None and full_steps is not None and baseline.losses:
        run = len(baseline.losses)
        steady = (baseline.seconds - baseline.first_step_seconds) / max(run - 1, 1)
        budget = baseline.first_step_seconds + steady * full_steps
    result = DoctorResult(name=origin, framework=adapter.framework, description=description, symptoms=symptoms,
                          causes=causes, trials=[baseline], steps=total, seed=seed, budget_s=budget)
    if not causes:
        result.seconds = time.perf_counter() - start
        return result

    trials = [baseline]

    def spent() -> float:
        return time.perf_counter() - start

    def longest() -> float:
        return max(t.seconds for t in trials if not t.not_tried)

    def best() -> TrialResult | None:
        done = [t for t in rank(trials) if not t.is_baseline and t.completed]
        return done[0] if done else None

    def attempt(candidate: Candidate) -> TrialResult:
        reason, code = adapter.applicable(candidate)
        if reason:
            return TrialResult(candidate.name, candidate, total, not_tried=reason, code_change=code)
        if budget is not None and spent() + longest() > budget:
            return TrialResult(candidate.name, candidate, total,
                               not_tried=f"time budget: {spent():.1f} s spent of {budget:.1f} s, a trial takes ~{longest():.1f} s")
        leader = best()
        stop = EarlyStop(total, baseline.losses, leader.losses if leader is not None else ())
        return adapter.trial(candidate, steps=total, stop=stop, progress=bar(candidate.name))

    candidates = propose(causes, description)
    tried = 0
    for candidate in candidates:
        if tried >= max_trials:
            trials.append(TrialResult(candidate.name, candidate, total, not_tried=f"max_trials={max_trials} reached"))
            continue
        trial = attempt(candidate)
        tried += 0 if trial.not_tried else 1
        trials.append(trial)
    if pairs and tried < max_trials:
        good = [t for t in rank(trials) if not t.is_baseline and t.candidate is not None and _better_than_baseline(t, baseline)]
        pair = None
        for i, first in enumerate(good):
            for second in good[i + 1:]:
                assert first.candidate is not None and second.candidate is not None
                pair = combine(first.candidate, second.candidate)
                if pair is not None:
                    break
            if pair is not None:
                break
        if pair is not None:
            trials.append(attempt(pair))
    result.trials = rank(trials)
    result.seconds = spent()
    return result


def doctor_target(target: str, **kwargs: Any) -> DoctorResult:
    """Load a target and run the doctor on the setup its factory returns (``gradwatch doctor``,
    in Python).

    Args:
        target: ``"package.module:function"`` or ``"path/to/file.py:function"``.
        **kwargs: Passed on to :func:`run_doctor`.

    Returns:
        The result.

    Raises:
        BadTargetError: see :func:`gradwatch.check.load_target` and :func:`run_doctor`.
    """
    with seeded(kwargs.get("seed", 0)):
        factory = load_target(target)
    kwargs.setdefault("name", target)
    return run_doctor(factory, **kwargs)
