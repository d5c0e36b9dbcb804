"""The Monitor: feeds each step's statistics through the detectors and the policy.

Adapters build one :class:`Monitor`, call :meth:`Monitor.observe` once per measured optimizer step
and carry out the :class:`~gradwatch.policy.Decision` it returns. Everything the monitor keeps is
bounded: ring buffers of ``history`` steps, at most ``max_findings`` findings and ``max_actions``
actions (counts are kept beyond that), so memory is O(layers x history), never O(steps).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any

import numpy as np

from gradwatch.detectors.base import Detector, state_from_dict, state_to_dict
from gradwatch.findings import Action, Finding, severity_rank
from gradwatch.history import History
from gradwatch.plugins import Hooks
from gradwatch.policy import Controls, Decision, Policy, resolve_policy
from gradwatch.report import Report
from gradwatch.sinks.announce import Announcer
from gradwatch.stats import Layout, StepStats

STATE_VERSION = 1
START_LOSSES = 7
"""The run's first finite losses whose median is where it started: a run is "rescued" only when
the median of its last losses is below ``START_MARGIN`` of it."""
START_MARGIN = 0.9
"""Down by a tenth at least: a run back at its starting loss, give or take its batches' noise, has
not been rescued."""


class Monitor:
    """Judge a training run step by step.

    Args:
        policy: ``"auto"`` (default), ``"observe"`` or a :class:`~gradwatch.Policy`.
        detectors: The detectors to run. Defaults to the built-ins plus those of plugins.
        history: Steps of per-layer history kept for reports and plots. Defaults to 256.
        max_findings: Findings kept (older ones are dropped; counts stay). Defaults to 1000.
        max_actions: Actions kept (older ones are dropped; counts stay). Defaults to 1000.
        merge_gap: Measured steps within which a repeat of a finding (same kind and layers) is
            merged into it instead of recorded anew. Defaults to 5.
        framework: Name of the framework, for the report. Defaults to "".
        hooks: The plugin hooks. Defaults to the process-wide plugin manager.
        announce: Say what gradwatch changes while it changes it, and sum up at the end
            (:class:`gradwatch.sinks.announce.Announcer`: the ``gradwatch`` logger, WARNING,
            rate-limited, rank 0). Defaults to True.

    Raises:
        ValueError: for an unknown policy or non-positive sizes.

    Example:
        >>> import gradwatch
        >>> from gradwatch.testing import nan_at
        >>> monitor = gradwatch.Monitor(policy="auto")
        >>> skipped = [monitor.observe(s).skip for s in nan_at(step=5, steps=8)]
        >>> skipped.index(True), monitor.report().healthy
        (5, False)
    """

    def __init__(
        self,
        *,
        policy: str | Policy | None = "auto",
        detectors: list[Detector] | None = None,
        history: int = 256,
        max_findings: int = 1000,
        max_actions: int = 1000,
        merge_gap: int = 5,
        framework: str = "",
        hooks: Hooks | None = None,
        announce: bool = True,
    ) -> None:
        if history < 1 or max_findings < 1 or max_actions < 1 or merge_gap < 0:
            raise ValueError(
                "history, max_findings and max_actions must be >= 1 and merge_gap >= 0. Received "
                f"history={history}, max_findings={max_findings}, max_actions={max_actions}, merge_gap={merge_gap}."
            )
        self.policy = resolve_policy(policy)
        self.hooks = hooks if hooks is not None else Hooks()
        config = {"policy": self.policy.name, "history": history, "framework": framework}
        self.detectors = list(detectors) if detectors is not None else self.hooks.detectors(config)
        for d in self.detectors:
            if not isinstance(d, Detector):
                raise TypeError(
                    f"Each detector must be a gradwatch.detectors.Detector(kind, init, update); "
                    f"received {type(d).__name__}: {d!r}."
                )
        self.history = history
        self.max_findings = max_findings
        self.max_actions = max_actions
        self.merge_gap = merge_gap
        self.framework = framework
        self.layout: Layout | None = None
        self._policy_state = self.policy.init()
        self._controls = self._policy_state.controls
        self.announcer = Announcer() if announce else None
        self._reset_run()

    # -- state ---------------------------------------------------------------------------------

    def _reset_run(self) -> None:
        self._detector_states: list[Any] = []
        self._findings: deque[Finding] = deque(maxlen=self.max_findings)
        self._open: dict[tuple, tuple[Finding, int]] = {}
        self._actions: deque[Action] = deque(maxlen=self.max_actions)
        self._finding_counts: dict[str, dict[str, int]] = {}
        self._action_counts: dict[str, int] = {}
        self._measured = 0
        self._first_step = -1
        self._last_step = -1
        self._skipped_by_framework: deque[tuple[int, str]] = deque(maxlen=self.max_actions)
        self._skipped_count = 0
        self._start_losses: list[float] = []
        """The run's first finite losses (up to START_LOSSES): where it started, for "rescued"."""
        self._history = History(self.history)
        self._layer_names: tuple[str, ...] = ()

    def _set_layout(self, layout: Layout) -> None:
        self.layout = layout
        self._detector_states = [d.init(layout) for d in self.detectors]
        self._layer_names = layout.layer_names()
        self._history.set_layout(layout)

    @property
    def controls(self) -> Controls:
        """The standing orders in force after the last decision, plugins included: what every
        adapter applies on the steps that follow (compiled adapters mirror them in variables)."""
        return self._controls

    @property
    def steps_measured(self) -> int:
        return self._measured

    # -- the step ------------------------------------------------------------------------------

    def observe(self, stats: StepStats, *, immediate: bool = True, can_rollback: bool = False) -> Decision:
        """Judge one measured optimizer step.

        Args:
            stats: The step's statistics.
            immediate: The adapter can still act on this step (see
                :meth:`gradwatch.Policy.decide`). Defaults to True.
            can_rollback: The adapter holds a snapshot it can restore. Defaults to False.

        Returns:
            The decision for the adapter to carry out.

        Raises:
            TypeError: if ``stats`` is not a :class:`StepStats`.
        """
        if not isinstance(stats, StepStats):
            raise TypeError(f"Monitor.observe expects a gradwatch.StepStats; received {type(stats).__name__}.")
        if stats.layout is not self.layout and stats.layout != self.layout:
            # First step, or new parameters (a param group added, a model resized): windows restart.
            self._set_layout(stats.layout)
        findings: list[Finding] = []
        states = self._detector_states
        for i, detector in enumerate(self.detectors):
            found, states[i] = detector.update(stats, states[i])
            findings.extend(found)
        decision, self._policy_state = self.policy.decide(
            findings, stats, self._policy_state, can_rollback=can_rollback, immediate=immediate
        )
        decision.findings = findings
        policy_factor = decision.lr_factor
        decision = self.hooks.select_actions(findings, stats, decision, self)
        decision.findings = findings
        self._controls = _final_controls(decision, policy_factor)
        decision.controls, decision.lr_factor = self._controls, self._controls.lr_factor
        decision.hold_snapshots = any(d.holds is not None and d.holds(s) for d, s in zip(self.detectors, states))
        self._record(stats, findings, decision)
        self.hooks.on_step(stats, decision, self)
        return decision

    def note_skipped(self, step: int, reason: str = "grad_scaler") -> None:
        """Count a step the framework skipped on its own (GradScaler or LossScaleOptimizer found
        inf/NaN in the scaled gradients). It is not an explosion and fires no detector.

        Args:
            step: The optimizer step that was skipped.
            reason: Who skipped it. Defaults to ``"grad_scaler"``.
        """
        self._skipped_count += 1
        self._skipped_by_framework.append((int(step), str(reason)))

    def _record(self, stats: StepStats, findings: list[Finding], decision: Decision) -> None:
        step = stats.step
        self._measured += 1
        if self._first_step < 0:
            self._first_step = step
        self._last_step = step
        for f in findings:
            counts = self._finding_counts.setdefault(f.kind, {})
            counts[f.severity] = counts.get(f.severity, 0) + 1
            key = (f.kind, f.severity)
            previous = self._open.get(key)
            if previous is not None and self._measured - previous[1] <= self.merge_gap + 1:
                merged = previous[0]
                merged.count += 1
                merged.last_step = step
                layers = tuple(dict.fromkeys(merged.layers + f.layers))
                if layers != merged.layers:
                    # New layers joined the episode: the latest message describes it best.
                    merged.message = f.message
                merged.layers = layers
                merged.evidence = f.evidence
                self._open[key] = (merged, self._measured)
                continue
            self._findings.append(f)
            self._open[key] = (f, self._measured)
            self.hooks.on_finding(f, self)
        if len(self._open) > 4 * self.max_findings:
            horizon = self._measured - self.merge_gap - 1
            self._open = {k: v for k, v in self._open.items() if v[1] >= horizon}
        for a in decision.actions:
            self._actions.append(a)
            self._action_counts[a.kind] = self._action_counts.get(a.kind, 0) + 1
            self.hooks.on_action(a, self)
            if self.announcer is not None and self.hooks.speaks:
                self.announcer.write_action(a, self)
        self._history.record(stats, decision.lr_factor)
        if len(self._start_losses) < START_LOSSES and stats.loss is not None and math.isfinite(stats.loss):
            self._start_losses.append(float(stats.loss))

    def _layer_history(self, keep: np.ndarray) -> np.ndarray:
        """Per-layer gradient norms (kept steps x layers): NaN for a layer without gradient on
        that step, inf for a non-finite one."""
        assert self.layout is not None
        rows = self._history.tensors[keep]
        everything = np.ones(rows.shape[1], dtype=bool)
        with np.errstate(invalid="ignore", over="ignore"):
            rss = self.layout.per_layer_rss(np.nan_to_num(rows, nan=0.0, posinf=np.inf), everything)
            present = self.layout.per_layer_rss((~np.isnan(rows)).astype(float), everything) > 0
        return np.where(present, rss, np.nan)

    # -- results -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """No finding of severity warning or error so far."""
        return not any(
            severity_rank(sev) >= 1 and n > 0 for counts in self._finding_counts.values() for sev, n in counts.items()
        )

    def findings(self) -> list[Finding]:
        return list(self._findings)

    def actions(self) -> list[Action]:
        return list(self._actions)

    def report(self) -> Report:
        """A snapshot :class:`~gradwatch.Report` of the run so far."""
        history = self._history
        keep = history.kept()
        layers = []
        layer_hist = np.zeros((0, len(self._layer_names)))
        if self.layout is not None:
            layout = self.layout
            layer_hist = self._layer_history(keep)
            n = len(self._layer_names)
            last = layer_hist[-1] if len(layer_hist) else np.full(n, np.nan)
            finite_hist = np.where(np.isfinite(layer_hist), layer_hist, -np.inf)
            highest = finite_hist.max(0) if len(layer_hist) else np.full(n, -np.inf)
            param = layout.per_layer_rss(history.last_param, np.ones(len(layout), dtype=bool))
            dead = np.full(n, -1.0)
            measured = ~np.isnan(history.last_zero)
            np.maximum.at(dead, layout.layer_ids[measured], history.last_zero[measured])
            for i, name in enumerate(self._layer_names):
                members = [j for j, layer in enumerate(layout.layers) if layer == name]
                grad_last, param_last = float(last[i]), float(param[i])
                layers.append({
                    "layer": name,
                    "tensors": [layout.names[j] for j in members],
                    "roles": sorted({layout.roles[j] for j in members}),
                    "numel": int(sum(layout.numel[j] for j in members)),
                    "grad_norm": grad_last,
                    "grad_norm_max": float(highest[i]) if highest[i] > -np.inf else math.nan,
                    "param_norm": param_last,
                    "ratio": grad_last / param_last if math.isfinite(param_last) and param_last > 0 else math.nan,
                    "dead_fraction": float(dead[i]) if dead[i] >= 0 else math.nan,
                    "nonfinite_steps": int(history.layer_nonfinite_steps[i]),
                })
        return Report(
            rescued=self._rescued(),
            healthy=self.healthy,
            policy=self.policy.name,
            framework=self.framework,
            steps_measured=self._measured,
            first_step=self._first_step,
            last_step=self._last_step,
            findings=[Finding.from_dict(f.to_dict()) for f in self._findings],
            actions=[Action.from_dict(a.to_dict()) for a in self._actions],
            finding_counts={k: dict(v) for k, v in self._finding_counts.items()},
            action_counts=dict(self._action_counts),
            skipped_steps=self._skipped_count,
            skipped=[{"step": s, "reason": r} for s, r in self._skipped_by_framework],
            layers=layers,
            history={
                **history.step_fields(keep),
                "layer_names": list(self._layer_names),
                "layer_grad_norm": layer_hist.tolist(),
            },
        )

    def _rescued(self) -> bool:
        """Remedies were applied, the last ``max(20, 10%)`` measured steps were healthy, and their
        loss (when known) is below where the run started."""
        if self.healthy or not any(k in self._action_counts for k in ("clip", "skip_step", "lr_decay", "rollback")):
            return False
        quiet = max(20, self._measured // 10)
        if self._measured < quiet:
            return False
        last_alarm = max((f.last_step for f in self._findings if severity_rank(f.severity) >= 1), default=-1)
        history = self._history
        keep = history.kept()
        steps, losses = history.rings["steps"][keep], history.rings["loss"][keep]
        recent = steps[-quiet:] if len(steps) >= quiet else steps
        if len(recent) < quiet or last_alarm >= recent[0]:
            return False
        recent_loss = losses[-quiet:]
        if np.all(np.isnan(recent_loss)):
            return True  # no loss recorded: the gradients' health is all there is to go on
        if not np.all(np.isfinite(recent_loss)):
            return False
        # Quiet is not rescued: a run rolled back into a dead end (units dead, the loss at chance)
        # raises no alarm either. The loss must have come down from where the run started.
        return not self._start_losses or float(np.median(recent_loss)) < START_MARGIN * float(np.median(self._start_losses))

    def finish(self) -> Report:
        """The final report, also handed to every ``gradwatch_on_report`` plugin."""
        report = self.report()
        self.hooks.on_report(report, self)
        if self.announcer is not None and self.hooks.speaks:
            self.announcer.write_report(report, self)
        return report

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly: plain Python values only (safe for
        ``torch.save(..., weights_only=True)``, JSON and Keras checkpoints).

        Returns:
            The state.
        """
        positions = {id(f): i for i, f in enumerate(self._findings)}
        return {
            "version": STATE_VERSION,
            "policy": self.policy.name,
            "layout": None if self.layout is None else self.layout.to_dict(),
            "detectors": [
                {"kind": d.kind, "state": state_to_dict(s)} for d, s in zip(self.detectors, self._detector_states)
            ],
            "policy_state": state_to_dict(self._policy_state),
            "controls": dataclasses.asdict(self._controls),
            "findings": [f.to_dict() for f in self._findings],
            "open": [[list(k), positions.get(id(v[0]), -1), v[1]] for k, v in self._open.items()],
            "actions": [a.to_dict() for a in self._actions],
            "finding_counts": {k: dict(v) for k, v in self._finding_counts.items()},
            "action_counts": dict(self._action_counts),
            "measured": self._measured,
            "first_step": self._first_step,
            "last_step": self._last_step,
            "skipped": [list(x) for x in self._skipped_by_framework],
            "skipped_count": self._skipped_count,
            "start_losses": list(self._start_losses),
            "history": self._history.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the run continues with the same history, the same
        detector windows and the same remedy state (clip level, LR factor, cool-downs).

        Args:
            state: What :meth:`state_dict` returned (possibly through JSON or ``torch.save``).

        Raises:
            ValueError: if the state comes from another version, policy or set of detectors.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Not a gradwatch Monitor state of version {STATE_VERSION}: received "
                f"{type(state).__name__} with version {state.get('version') if isinstance(state, dict) else None!r}."
            )
        kinds = [d["kind"] for d in state["detectors"]]
        if state["layout"] is not None and kinds != [d.kind for d in self.detectors]:
            raise ValueError(
                f"The saved monitor ran detectors {kinds}; this one runs {[d.kind for d in self.detectors]}. "
                "Build the Monitor with the same detectors (and plugins) to resume."
            )
        if state["policy"] != self.policy.name:
            raise ValueError(
                f"The saved monitor used policy {state['policy']!r}; this one uses {self.policy.name!r}."
            )
        self._reset_run()
        self.layout = None
        if state["layout"] is not None:
            self._set_layout(Layout.from_dict(state["layout"]))
            self._detector_states = [
                state_from_dict(template, saved["state"])
                for template, saved in zip(self._detector_states, state["detectors"])
            ]
        self._policy_state = state_from_dict(self.policy.init(), state["policy_state"])
        saved = state.get("controls")
        self._controls = (
            Controls(bool(saved["skip_nonfinite"]), float(saved["clip_norm"]), float(saved["lr_factor"]))
            if saved is not None else self._policy_state.controls
        )
        self._findings.extend(Finding.from_dict(f) for f in state["findings"])
        findings = list(self._findings)
        for key, index, measured in state["open"]:
            if 0 <= index < len(findings):
                self._open[(key[0], key[1])] = (findings[index], measured)
        self._actions.extend(Action.from_dict(a) for a in state["actions"])
        self._finding_counts = {k: dict(v) for k, v in state["finding_counts"].items()}
        self._action_counts = dict(state["action_counts"])
        self._measured = state["measured"]
        self._first_step = state["first_step"]
        self._last_step = state["last_step"]
        self._skipped_by_framework.extend((int(s), str(r)) for s, r in state["skipped"])
        self._skipped_count = state["skipped_count"]
        self._start_losses = [float(x) for x in state.get("start_losses", [])]  # absent from older states
        self._history.load_state_dict(state["history"], None if self.layout is None else len(self.layout))


def _final_controls(decision: Decision, policy_factor: float) -> Controls:
    """The standing orders after a step, plugins included: ``decision.controls``, with the LR
    factor of ``decision.lr_factor`` when a ``gradwatch_select_actions`` plugin changed that."""
    controls = decision.controls
    if decision.lr_factor != policy_factor and decision.lr_factor != controls.lr_factor:
        controls = dataclasses.replace(controls, lr_factor=float(decision.lr_factor))
    return controls
