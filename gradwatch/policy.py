"""Policies: which findings lead to which actions, with escalation and cool-down.

A policy is a pure pair, like a detector: ``init() -> state`` and
``decide(findings, stats, state, ...) -> (Decision, state)``. Its state holds the *controls* in
force (:class:`Controls`): whether non-finite steps are skipped, the global-norm clip level, and
the learning-rate factor. Adapters whose training step is compiled (Keras under ``tf.function``,
XLA or ``jax.jit``) keep those controls in framework variables and apply them inside the step;
adapters that run Python before each optimizer step (PyTorch) apply the :class:`Decision` directly.

Built-in policies:

* :class:`ObservePolicy` (``"observe"``): never touches training, takes no action.
* :class:`AutoPolicy` (``"auto"``): skip non-finite steps; clip at the run's own norm level when
  the norm explodes; decay the learning rate when clipping does not stop it or non-finite steps
  repeat; roll back when the parameters themselves turn non-finite (if the adapter can); recommend
  BatchNorm where gradients vanish. A healthy run gets no action at all, so it is left bit-for-bit
  as an unwatched run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from gradwatch.findings import Action, Finding
from gradwatch.stats import StepStats


@dataclass(frozen=True)
class Controls:
    """The standing orders in force, mirrored in framework variables by compiled adapters.

    Attributes:
        skip_nonfinite: Skip (do not apply) a step whose gradients are non-finite.
        clip_norm: Clip the global gradient norm to this value; ``inf`` means no clipping.
        lr_factor: Multiply the learning rate (as the user's schedule sets it) by this.
    """

    skip_nonfinite: bool = False
    clip_norm: float = math.inf
    lr_factor: float = 1.0


@dataclass
class Decision:
    """What the adapter must do for one step.

    Attributes:
        step: The optimizer step.
        skip: Do not apply this step: parameters and optimizer state stay as they are.
        clip_norm: Clip this step's gradients to this global norm (None: leave them).
        lr_factor: The learning-rate factor in force from now on (1.0: the user's own LR).
        rollback: Restore the last healthy snapshot (the adapter also skips the step).
        actions: What was done, for the record.
        controls: The standing orders after this step.
        findings: The step's findings (the Monitor fills them in): adapters keep rollback
            snapshots only of steps without a warning or an error.
        hold_snapshots: A detector follows something whose outcome is not known yet (an update
            as large as the weights): no rollback snapshot on this step either (the Monitor
            fills it in from :attr:`gradwatch.detectors.Detector.holds`).
    """

    step: int
    skip: bool = False
    clip_norm: float | None = None
    lr_factor: float = 1.0
    rollback: bool = False
    actions: list[Action] = field(default_factory=list)
    controls: Controls = field(default_factory=Controls)
    findings: list[Finding] = field(default_factory=list)
    hold_snapshots: bool = False

    @property
    def alarm(self) -> bool:
        """A finding of severity warning or error was made on this step."""
        return any(f.severity in ("warning", "error") for f in self.findings)

    def healthy_after(self, stats: StepStats) -> bool:
        """The step may be followed by a rollback snapshot: finite gradients and parameters, no
        alarm, no detector holding the snapshots, and left alone (no skip, rollback, clip or other
        action). The one rule every adapter's snapshots use.

        Args:
            stats: The step's statistics.
        """
        return bool(
            stats.finite and not stats.params_nonfinite.any() and not self.skip and not self.rollback
            and self.clip_norm is None and not self.alarm and not self.actions and not self.hold_snapshots
        )


NEVER = -(10**9)
"""The step of something that has not happened yet (far enough back for every cool-down)."""


class PolicyState(NamedTuple):
    """What a policy carries from one step to the next; build it with keywords
    (``PolicyState(skip_nonfinite=True)``), every field has a default."""

    skip_nonfinite: bool = False
    """Skip steps whose gradients are non-finite."""
    clip_norm: float = math.inf
    """The clip level in force (inf: none)."""
    lr_factor: float = 1.0
    """The LR factor decided by decays (without an LR-jump hold)."""
    last_decay_step: int = NEVER
    """The step of the last LR decay."""
    clip_since: int = -1
    """The step from which the current clip level is in force (-1: none)."""
    nonfinite_steps: tuple = ()
    """Steps of the most recent non-finite gradients (at most ``nonfinite_patience``)."""
    recommended: tuple = ()
    """Layers already named in a BatchNorm recommendation."""
    recent_lr: tuple = ()
    """The user's scheduled learning rate (before gradwatch's factor) on recent healthy steps."""
    clip_streak: int = 0
    """Consecutive measured steps whose norm was over ``heavy_clip_ratio`` times the clip level."""
    clip_streak_norm: float = 0.0
    """The global norm when that streak began."""
    clip_streak_loss: float = math.nan
    """The loss when that streak began (NaN: not known)."""
    last_exploding_step: int = NEVER
    """The last step with an ``exploding`` finding."""
    lr_cap: float = math.inf
    """While the user's LR stays jumped: the scheduled LR it is held to (the healthy one)."""
    jump_factor: float = 1.0
    """The extra factor that holds the jumped LR at ``lr_cap`` (1.0 when no jump is in force)."""
    nonfinite_streak: int = 0
    """Consecutive measured steps with non-finite gradients (0 after a finite one)."""
    last_rollback_step: int = NEVER
    """The step of the last rollback."""

    @property
    def controls(self) -> Controls:
        return Controls(self.skip_nonfinite, self.clip_norm, self.lr_factor * self.jump_factor)


class Policy:
    """Base class: override :meth:`decide`. ``name`` appears in reports."""

    name = "policy"

    def init(self) -> PolicyState:
        return PolicyState()

    def decide(
        self,
        findings: Sequence[Finding],
        stats: StepStats,
        state: PolicyState,
        *,
        can_rollback: bool = False,
        immediate: bool = True,
    ) -> tuple[Decision, PolicyState]:
        """Turn one step's findings into a decision.

        Args:
            findings: This step's findings from all detectors.
            stats: This step's statistics.
            state: The policy state after the previous step.
            can_rollback: The adapter keeps a snapshot it can restore.
            immediate: True when the adapter can still act on this very step (PyTorch's pre-hook);
                False when the step already ran under the previous controls (compiled Keras steps),
                in which case this step's record follows the old controls and the new ones apply
                from the next step.

        Returns:
            The decision and the new state.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class ObservePolicy(Policy):
    """Never changes training: no skip, no clip, no LR change, no recommendation action."""

    name = "observe"

    def decide(
        self, findings: Sequence[Finding], stats: StepStats, state: PolicyState, *,
        can_rollback: bool = False, immediate: bool = True,
    ) -> tuple[Decision, PolicyState]:
        return Decision(step=stats.step, controls=state.controls), state


class AutoPolicy(Policy):
    """Apply the safe remedies, escalating with cool-down.

    Args:
        skip_step: Skip steps with non-finite gradients. Defaults to True.
        clip: Clip the global norm when it explodes, at the level the detector suggests from the
            run's own history. Defaults to True.
        lr_decay: Decay the LR when clipping does not stop an explosion, or when non-finite steps
            repeat. Defaults to True.
        rollback: Restore the last healthy snapshot when parameters turn non-finite, when the
            adapter keeps one. Defaults to True.
        recommend_batchnorm: Record a BatchNorm recommendation for vanishing layers. Defaults to True.
        decay_factor: LR multiplier per decay. Defaults to 0.5.
        min_lr_factor: Never decay below this share of the user's LR. Defaults to 1e-3.
        cooldown: Steps between two LR decays. Defaults to 10.
        nonfinite_patience: Non-finite steps within ``nonfinite_window`` steps that trigger a
            decay, when the norm exploded within that window too (non-finite steps out of a healthy
            run come from the data or the model, and are only skipped). Defaults to 3.
        nonfinite_window: Defaults to 50.
        lr_jump_ratio: When the norm explodes right after the user's scheduled learning rate rose
            more than this many times above its recent median (a mistyped LR, a schedule bug), the
            factor brings the LR back to that median at once — below ``min_lr_factor`` if need be,
            since it only restores the LR the run was healthy with — and the step is rolled back
            when the adapter keeps a snapshot (the update made at the jumped LR is undone).
            Needs the adapter to report ``StepStats.lr``. Defaults to 10.0.
        lr_window: Healthy steps whose LR form that median. Defaults to 10.
        heavy_clip_ratio: Clipping that has to cut the norm by more than this factor on every one
            of ``cooldown`` consecutive steps without progress (the loss, when known, not 1% lower;
            else the norm not halved) is holding back
            an LR that is too high: the LR is decayed (the detector stops calling such a steady
            state an explosion, since it adapts to it; the policy does not). Defaults to 2.0.
        step_size_factor: LR multiplier when a finding says the step size itself is the cause
            (``exploding`` with ``remedy="lr"``: the loss runs away, updates as large as the
            weights, an explosion that ended in NaN) and when every step has been non-finite for
            ``nonfinite_patience`` steps in a row. Such runs were typically started with an LR
            10-1000x too high: halving would take many rounds. When the finding measured how much
            too large the update was (``lr_factor_hint``: what brings it back to ~1% of the
            weights), that smaller factor is used. Defaults to 0.1.
        clip_release: Measured steps without an explosion after which a standing clip level is
            lifted: a level set by one alarm must not throttle the rest of a healthy run.
            Defaults to 50.
        update_bound: After a step-size cut, the clip level keeps a plain gradient step within
            this share of the weights' norm, at the new LR. Defaults to 0.02.

    Raises:
        ValueError: for a factor outside (0, 1) or a negative count.
    """

    name = "auto"

    def __init__(
        self,
        *,
        skip_step: bool = True,
        clip: bool = True,
        lr_decay: bool = True,
        rollback: bool = True,
        recommend_batchnorm: bool = True,
        decay_factor: float = 0.5,
        min_lr_factor: float = 1e-3,
        cooldown: int = 10,
        nonfinite_patience: int = 3,
        nonfinite_window: int = 50,
        lr_jump_ratio: float = 10.0,
        lr_window: int = 10,
        heavy_clip_ratio: float = 2.0,
        step_size_factor: float = 0.1,
        clip_release: int = 50,
        update_bound: float = 0.02,
    ) -> None:
        if not 0.0 < decay_factor < 1.0:
            raise ValueError(f"AutoPolicy does not support a decay_factor outside (0, 1). Received decay_factor={decay_factor}.")
        if not 0.0 < min_lr_factor <= 1.0:
            raise ValueError(f"min_lr_factor must be in (0, 1]. Received min_lr_factor={min_lr_factor}.")
        if cooldown < 0 or nonfinite_patience < 1 or nonfinite_window < 1:
            raise ValueError(
                "cooldown must be >= 0 and nonfinite_patience, nonfinite_window >= 1. Received "
                f"cooldown={cooldown}, nonfinite_patience={nonfinite_patience}, nonfinite_window={nonfinite_window}."
            )
        self.skip_step = skip_step
        self.clip = clip
        self.lr_decay = lr_decay
        self.rollback = rollback
        self.recommend_batchnorm = recommend_batchnorm
        self.decay_factor = decay_factor
        self.min_lr_factor = min_lr_factor
        self.cooldown = cooldown
        self.nonfinite_patience = nonfinite_patience
        self.nonfinite_window = nonfinite_window
        if not lr_jump_ratio > 1.0 or lr_window < 1:
            raise ValueError(
                "lr_jump_ratio must be > 1 and lr_window >= 1. Received "
                f"lr_jump_ratio={lr_jump_ratio}, lr_window={lr_window}."
            )
        self.lr_jump_ratio = lr_jump_ratio
        self.lr_window = lr_window
        if not heavy_clip_ratio >= 1.0:
            raise ValueError(f"heavy_clip_ratio must be >= 1. Received heavy_clip_ratio={heavy_clip_ratio}.")
        self.heavy_clip_ratio = heavy_clip_ratio
        if not 0.0 < step_size_factor < 1.0 or clip_release < 1:
            raise ValueError(
                "step_size_factor must be in (0, 1) and clip_release >= 1. Received "
                f"step_size_factor={step_size_factor}, clip_release={clip_release}."
            )
        self.step_size_factor = step_size_factor
        self.clip_release = clip_release
        if not update_bound > 0:
            raise ValueError(f"update_bound must be > 0. Received update_bound={update_bound}.")
        self.update_bound = update_bound

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def init(self) -> PolicyState:
        return PolicyState(skip_nonfinite=self.skip_step)

    def decide(
        self, findings: Sequence[Finding], stats: StepStats, state: PolicyState, *,
        can_rollback: bool = False, immediate: bool = True,
    ) -> tuple[Decision, PolicyState]:
        by_kind: dict[str, list[Finding]] = {}
        for f in findings:
            by_kind.setdefault(f.kind, []).append(f)
        plan = _Plan(self, stats.step, state)
        self._on_nonfinite(plan, by_kind, stats, can_rollback)
        self._on_lr_jump(plan, by_kind, stats, can_rollback)
        self._on_step_size(plan, by_kind, stats, can_rollback)
        self._on_exploding(plan, by_kind, stats)
        self._release_clip(plan, by_kind)
        self._on_heavy_clipping(plan, stats)
        self._recommend(plan, by_kind)
        return self._finish(plan, stats, state.controls, immediate)

    def _on_nonfinite(self, plan: _Plan, by_kind: dict[str, list[Finding]], stats: StepStats,
                      can_rollback: bool) -> None:
        step, s = plan.step, plan.state
        if "nonfinite" not in by_kind:
            if s.nonfinite_streak:
                plan.state = s._replace(nonfinite_streak=0)
            return
        recent = tuple(t for t in s.nonfinite_steps if step - t < self.nonfinite_window) + (step,)
        streak = s.nonfinite_streak + 1
        plan.state = s = s._replace(nonfinite_steps=recent[-self.nonfinite_patience:], nonfinite_streak=streak)
        params_bad = any(f.evidence.get("params_nonfinite") for f in by_kind["nonfinite"])
        if params_bad and self.rollback and can_rollback:
            plan.roll_back("nonfinite", "parameters were non-finite: restored the last healthy snapshot",
                           {"params_finite": False}, {"params_finite": True})
            # After an explosion (this step's exploding finding blames the step size) the LR cut
            # and the clip level are the explosion's (_on_step_size): halving would take many
            # rounds of NaN and rollback.
            if not any(f.evidence.get("remedy") == "lr" for f in by_kind.get("exploding", [])):
                plan.decay("nonfinite", "parameters turned non-finite")
        elif streak >= self.nonfinite_patience and streak % self.nonfinite_patience == 0:
            # Every step non-finite: skipping saves nothing (the parameters never move again and
            # the next batch is as bad). Go back to the last healthy parameters, smaller steps.
            if self.rollback and can_rollback and step - s.last_rollback_step >= self.cooldown:
                plan.roll_back("nonfinite", f"{streak} non-finite steps in a row: skipping them saves nothing; "
                               "restored the last healthy snapshot")
            plan.decay("nonfinite", f"{streak} non-finite steps in a row", factor=self.step_size_factor)
        elif len(recent) >= self.nonfinite_patience and step - s.last_exploding_step <= self.nonfinite_window:
            # NaNs that follow an explosion come from the step size; NaNs out of a healthy run
            # come from the data or the model (a sqrt at 0): skipping them is the remedy, and
            # a smaller LR would only slow the run down.
            plan.decay("nonfinite", f"{len(recent)} non-finite steps within {self.nonfinite_window} steps "
                       "after the norm exploded")

    def _on_step_size(self, plan: _Plan, by_kind: dict[str, list[Finding]], stats: StepStats,
                      can_rollback: bool) -> None:
        """Findings whose cause is the step size itself (``remedy="lr"``): a smaller LR, the
        last healthy parameters back (the updates made too large are undone), and a clip level
        that keeps the next steps within ``update_bound`` of the weights."""
        causes = [f for f in by_kind.get("exploding", []) if f.evidence.get("remedy") == "lr"]
        if not causes or any(a.kind == "lr_decay" for a in plan.actions):
            return
        before = plan.state.lr_factor
        # A measured update as large as the weights says by how much the step is too large.
        hints = [float(f.evidence["lr_factor_hint"]) for f in causes if f.evidence.get("lr_factor_hint")]
        factor = min([self.step_size_factor, *hints])
        plan.decay("exploding", causes[0].message.split(":")[0].rstrip("."), factor=max(factor, self.min_lr_factor))
        decayed = plan.state.lr_factor < before
        s = plan.state
        if (decayed and self.rollback and can_rollback and not plan.rollback
                and plan.step - s.last_rollback_step >= self.cooldown):
            plan.roll_back("exploding", "restored the last healthy snapshot: undoes the updates made at the "
                           "too-large step size")
        if decayed:
            # After a rollback the weights are those of before the too-large updates.
            before_norms = [float(f.evidence["previous_weight_norm"]) for f in causes if f.evidence.get("previous_weight_norm")]
            self._bound_steps(plan, stats, plan.state.lr_factor / before, min(before_norms, default=math.inf))

    def _bound_steps(self, plan: _Plan, stats: StepStats, lr_ratio: float, weights_before: float = math.inf) -> None:
        """A standing clip level at which a plain gradient step moves the weights by at most
        ``update_bound`` of their norm, at the new LR (clipping relative to the weights, as in
        NFNets' adaptive clipping): gradients too large for any sane LR — a huge init — stay
        bounded after the LR cut. An adaptive optimizer (Adam) normalises its steps anyway, so the
        level rarely binds there. Lifted by ``clip_release`` like any clip level."""
        if not self.clip or stats.lr is None or not stats.lr > 0 or not stats.params_measured:
            return
        weight = stats.layout.role_mask(("weight",)) & stats.has_grad & np.isfinite(stats.param_norm)
        if not weight.any() and not math.isfinite(weights_before):
            return
        norm = min(float(np.sqrt(np.sum(stats.param_norm[weight] ** 2))) if weight.any() else math.inf, weights_before)
        level = self.update_bound * norm / (stats.lr * lr_ratio)
        s = plan.state
        if math.isfinite(level) and 0 < level < s.clip_norm:
            plan.state = s._replace(clip_norm=level, clip_since=plan.step if not math.isfinite(s.clip_norm) else s.clip_since)

    def _release_clip(self, plan: _Plan, by_kind: dict[str, list[Finding]]) -> None:
        """Lift a standing clip level after ``clip_release`` measured steps without an explosion."""
        s = plan.state
        if math.isfinite(s.clip_norm) and not by_kind.get("exploding") and \
                plan.step - max(s.last_exploding_step, s.clip_since) >= self.clip_release:
            plan.state = s._replace(clip_norm=math.inf, clip_since=-1, clip_streak=0)

    def _on_lr_jump(self, plan: _Plan, by_kind: dict[str, list[Finding]], stats: StepStats, can_rollback: bool) -> None:
        """Track the user's scheduled LR; hold it at its healthy median when it jumped right before
        an explosion, and lift the hold when it comes back down."""
        exploding = bool(by_kind.get("exploding"))
        s = plan.state
        if exploding:
            s = s._replace(last_exploding_step=plan.step)
        in_force = s.lr_factor * s.jump_factor
        scheduled_lr = (
            stats.lr / in_force
            if stats.lr is not None and math.isfinite(stats.lr) and stats.lr > 0 and in_force > 0
            else None
        )
        if scheduled_lr is not None and math.isfinite(s.lr_cap):
            if scheduled_lr <= s.lr_cap:  # the user's LR came back down: lift the hold
                s = s._replace(lr_cap=math.inf, jump_factor=1.0)
            else:
                s = s._replace(jump_factor=s.lr_cap / scheduled_lr)
        plan.state = s
        if scheduled_lr is None:
            return
        if not exploding or len(s.recent_lr) < min(3, self.lr_window):
            if not findings_block_lr(by_kind):
                plan.state = s._replace(recent_lr=(s.recent_lr + (scheduled_lr,))[-self.lr_window:])
            return
        reference = sorted(s.recent_lr)[len(s.recent_lr) // 2]
        if not (reference > 0 and scheduled_lr > self.lr_jump_ratio * reference and self.lr_decay):
            return
        before_factor = s.lr_factor * s.jump_factor
        s = s._replace(lr_cap=reference, jump_factor=reference / scheduled_lr, last_decay_step=plan.step,
                       recent_lr=())
        plan.state = s
        after_factor = s.lr_factor * s.jump_factor
        plan.actions.append(Action(
            "lr_decay", plan.step, "exploding", {"lr_factor": before_factor, "lr": stats.lr},
            {"lr_factor": after_factor, "lr": reference * s.lr_factor}, {"factor": after_factor / before_factor},
            f"the learning rate jumped {scheduled_lr / reference:.3g}x (from {reference:.3g} to "
            f"{scheduled_lr:.3g}) just before the explosion: held at {reference:.3g} while the jump lasts",
        ))
        if self.rollback and can_rollback and not plan.rollback:
            plan.roll_back("exploding", "restored the last healthy snapshot: undoes the update made at the jumped LR")

    def _on_exploding(self, plan: _Plan, by_kind: dict[str, list[Finding]], stats: StepStats) -> None:
        # Those whose cause is the step size itself are _on_step_size's (clipping does not help);
        # those that only advise ("report") change nothing.
        exploding = [f for f in by_kind.get("exploding", []) if f.evidence.get("remedy", "clip") == "clip"]
        if not exploding:
            return
        if not self.clip:
            plan.decay("exploding", "the gradient norm explodes")
            return
        if not stats.finite:
            return
        level = min(float(f.evidence.get("clip_threshold", math.inf)) for f in exploding)
        if not (math.isfinite(level) and level > 0):
            return
        s = plan.state
        if math.isfinite(s.clip_norm) and plan.step - s.clip_since >= self.cooldown:
            plan.decay("exploding", "the norm still explodes with clipping in force")
        elif any(f.severity == "error" for f in exploding):
            plan.decay("exploding", "the gradient norm is growing without bound")
        s = plan.state
        if not math.isfinite(s.clip_norm):
            s = s._replace(clip_since=plan.step)
        # Never raise the level while the norm explodes: the detector's baseline drifts up during
        # an explosion (it absorbs clipped values), the healthy level does not.
        plan.state = s._replace(clip_norm=min(s.clip_norm, level))

    def _on_heavy_clipping(self, plan: _Plan, stats: StepStats) -> None:
        s = plan.state
        if not (math.isfinite(s.clip_norm) and stats.finite):
            return
        norm = stats.global_norm
        streak = s.clip_streak + 1 if norm > self.heavy_clip_ratio * s.clip_norm else 0
        loss = stats.loss if stats.loss is not None and math.isfinite(stats.loss) else math.nan
        if streak == 1:
            s = s._replace(clip_streak_norm=norm, clip_streak_loss=loss)
        plan.state = s = s._replace(clip_streak=streak)
        if streak < max(self.cooldown, 1):
            return
        progress = (
            loss < 0.99 * s.clip_streak_loss if math.isfinite(loss) and math.isfinite(s.clip_streak_loss)
            else norm < 0.5 * s.clip_streak_norm
        )
        if progress:
            # The loss went down (or, without a loss, the norm halved) under clipping: the run is
            # coming back from far away, where a stable run has large gradients too. Judge the
            # next stretch from here.
            plan.state = s._replace(clip_streak=1, clip_streak_norm=norm, clip_streak_loss=loss)
            return
        factor_before = s.lr_factor
        plan.decay("exploding", f"clipping cut the norm by over {self.heavy_clip_ratio:g}x on {streak} steps in "
                   "a row without bringing it down: the learning rate is too high for this model")
        if plan.state.lr_factor < factor_before:
            plan.state = plan.state._replace(clip_streak=0)

    def _recommend(self, plan: _Plan, by_kind: dict[str, list[Finding]]) -> None:
        if not self.recommend_batchnorm:
            return
        for f in by_kind.get("vanishing", []):
            insert_after = tuple(f.evidence.get("insert_after", f.layers))
            if insert_after and not set(insert_after) <= set(plan.state.recommended):
                plan.actions.append(Action(
                    "recommend_batchnorm", plan.step, "vanishing", {}, {},
                    {"insert_after": list(insert_after), "layers": list(f.layers)},
                    "insert BatchNorm/LayerNorm after " + ", ".join(insert_after)
                    + " (before the activation); nothing in the model was changed",
                ))
                plan.state = plan.state._replace(
                    recommended=tuple(dict.fromkeys(plan.state.recommended + insert_after))
                )

    def _finish(self, plan: _Plan, stats: StepStats, before: Controls, immediate: bool) -> tuple[Decision, PolicyState]:
        """This step's skip and clip under the controls that apply to it, and the decision."""
        s, step, actions, norm = plan.state, plan.step, plan.actions, stats.global_norm
        applied = s.controls if immediate else before
        skip = plan.rollback or (not stats.finite and applied.skip_nonfinite)
        clip_norm = None
        if not skip and stats.finite and norm > applied.clip_norm:
            clip_norm = applied.clip_norm
            actions.insert(0, Action(
                "clip", step, "exploding", {"global_norm": norm}, {"global_norm": clip_norm},
                {"max_norm": clip_norm}, f"clipped the global norm {norm:.3g} to {clip_norm:.3g}",
            ))
        if skip and not plan.rollback:
            actions.insert(0, Action(
                "skip_step", step, "nonfinite", {"global_norm": norm}, {"applied": False}, {},
                "skipped the step: parameters and optimizer state unchanged",
            ))
        decision = Decision(
            step=step, skip=skip, clip_norm=clip_norm, lr_factor=s.controls.lr_factor, rollback=plan.rollback,
            actions=actions, controls=s.controls,
        )
        return decision, s


class _Plan:
    """What :meth:`AutoPolicy.decide` builds up for one step: the new state and the actions."""

    def __init__(self, policy: AutoPolicy, step: int, state: PolicyState) -> None:
        self.policy = policy
        self.step = step
        self.state = state
        self.actions: list[Action] = []
        self.rollback = False

    def decay(self, reason: str, why: str, factor: float | None = None) -> None:
        """Decay the LR once, after the cool-down and above the floor.

        Args:
            reason: The finding kind behind it.
            why: The message's reason.
            factor: The multiplier. Defaults to the policy's ``decay_factor``.
        """
        p, s = self.policy, self.state
        if not p.lr_decay or self.step - s.last_decay_step < p.cooldown:
            return
        if any(a.kind == "lr_decay" for a in self.actions):
            return  # one decay per step, whatever the reasons
        new = max(s.lr_factor * (factor if factor is not None else p.decay_factor), p.min_lr_factor)
        if new >= s.lr_factor:
            return
        self.actions.append(Action(
            "lr_decay", self.step, reason, {"lr_factor": s.lr_factor}, {"lr_factor": new},
            {"factor": new / s.lr_factor},
            f"learning rate x{new / s.lr_factor:g} (now x{new:g} of the schedule): {why}",
        ))
        self.state = s._replace(lr_factor=new, last_decay_step=self.step)

    def roll_back(self, reason: str, message: str, before: dict | None = None, after: dict | None = None) -> None:
        self.rollback = True
        self.state = self.state._replace(last_rollback_step=self.step)
        self.actions.append(Action("rollback", self.step, reason, before or {}, after or {}, {}, message))


def findings_block_lr(by_kind: dict[str, list[Finding]]) -> bool:
    """A step with these findings does not count as healthy for the LR reference."""
    return any(kind in by_kind for kind in ("exploding", "nonfinite", "loss_spike"))


def resolve_policy(policy: str | Policy | None) -> Policy:
    """Turn ``"auto"``, ``"observe"``, None (auto) or a :class:`Policy` into a policy.

    Raises:
        ValueError: for an unknown name or another type.
    """
    if policy is None or policy == "auto":
        return AutoPolicy()
    if policy == "observe":
        return ObservePolicy()
    if isinstance(policy, Policy):
        return policy
    raise ValueError(
        f"policy must be 'auto', 'observe' or a gradwatch.Policy instance. Received policy={policy!r}."
    )


__all__ = ["AutoPolicy", "Controls", "Decision", "ObservePolicy", "Policy", "PolicyState", "resolve_policy"]
