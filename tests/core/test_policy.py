from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch import AutoPolicy, Finding, Monitor, ObservePolicy, StepStats, testing
from gradwatch.policy import resolve_policy


def stats(step, norm=1.0, finite=True, layout=None, params_finite=True):
    layout = layout or testing.make_layout(2)
    grad = np.full(len(layout), norm / math.sqrt(len(layout)))
    if not finite:
        grad[0] = np.nan
    params = np.ones(len(layout))
    if not params_finite:
        params[0] = np.inf
    return StepStats(step=step, layout=layout, grad_norm=grad, param_norm=params)


def exploding(step, level=2.0, severity="warning"):
    return Finding("exploding", severity, step, ("fc0",), "boom", {"clip_threshold": level, "rule": "spike"})


def nonfinite(step, params_bad=False):
    return Finding("nonfinite", "error", step, ("fc0",), "nan", {"params_nonfinite": ["fc0"] if params_bad else []})


def test_resolve_policy():
    assert isinstance(resolve_policy(None), AutoPolicy)
    assert isinstance(resolve_policy("observe"), ObservePolicy)
    with pytest.raises(ValueError, match="policy must be 'auto', 'observe' or a gradwatch.Policy instance. Received policy='agressive'"):
        resolve_policy("agressive")


def test_auto_rejects_bad_factor():
    with pytest.raises(ValueError, match="decay_factor outside \\(0, 1\\). Received decay_factor=1.5"):
        AutoPolicy(decay_factor=1.5)


def test_auto_takes_no_action_without_findings():
    p = AutoPolicy()
    state = p.init()
    for t in range(50):
        d, state = p.decide([], stats(t, norm=1e6), state)
        assert not d.actions and not d.skip and d.clip_norm is None and d.lr_factor == 1.0


def test_auto_skips_nonfinite_steps():
    p = AutoPolicy()
    d, _ = p.decide([nonfinite(0)], stats(0, finite=False), p.init())
    assert d.skip and [a.kind for a in d.actions] == ["skip_step"]
    assert d.actions[0].reason == "nonfinite"


def test_auto_clips_then_decays_when_clipping_does_not_help():
    p = AutoPolicy(cooldown=5)
    state = p.init()
    d, state = p.decide([exploding(0, level=2.0)], stats(0, norm=50.0), state)
    assert d.clip_norm == 2.0 and [a.kind for a in d.actions] == ["clip"]
    assert d.actions[0].before == {"global_norm": pytest.approx(50.0)} and d.actions[0].after == {"global_norm": 2.0}
    # Healthy step below the level: clipping stays in force but changes nothing.
    d, state = p.decide([], stats(1, norm=1.0), state)
    assert d.clip_norm is None and not d.actions and state.clip_norm == 2.0
    # Still exploding within the cool-down: clip only.
    d, state = p.decide([exploding(3, level=3.0)], stats(3, norm=40.0), state)
    assert [a.kind for a in d.actions] == ["clip"] and d.clip_norm == 2.0  # the level never rises
    # After the cool-down: decay the LR.
    d, state = p.decide([exploding(6, level=2.0)], stats(6, norm=40.0), state)
    assert sorted(a.kind for a in d.actions) == ["clip", "lr_decay"]
    assert d.lr_factor == 0.5
    decay = next(a for a in d.actions if a.kind == "lr_decay")
    assert decay.before == {"lr_factor": 1.0} and decay.after == {"lr_factor": 0.5}
    # Another decay only after another cool-down.
    d, state = p.decide([exploding(7)], stats(7, norm=40.0), state)
    assert d.lr_factor == 0.5


def test_auto_decays_at_once_on_unbounded_growth_and_respects_floor():
    p = AutoPolicy(cooldown=0, min_lr_factor=0.2)
    state = p.init()
    factors = []
    for t in range(5):
        d, state = p.decide([exploding(t, severity="error")], stats(t, norm=100.0), state)
        factors.append(d.lr_factor)
    assert factors == [0.5, 0.25, 0.2, 0.2, 0.2]


def test_auto_decays_when_nonfinite_steps_repeat_after_an_explosion():
    p = AutoPolicy(nonfinite_patience=3, nonfinite_window=50, cooldown=100)
    state = p.init()
    _, state = p.decide([exploding(0)], stats(0, norm=50.0), state)
    factor = state.lr_factor
    kinds = []
    for t in (10, 20, 30):
        _, state = p.decide([], stats(t - 1, norm=1.0), state)  # finite steps in between
        d, state = p.decide([nonfinite(t)], stats(t, finite=False), state)
        kinds.append(sorted(a.kind for a in d.actions))
    assert kinds == [["skip_step"], ["skip_step"], ["lr_decay", "skip_step"]]
    assert d.lr_factor == factor * 0.5


def test_every_step_nonfinite_rolls_back_and_lowers_the_lr():
    """Skipping a run whose every step is non-finite saves nothing: after nonfinite_patience
    steps in a row the last healthy snapshot comes back and the LR is cut by step_size_factor."""
    p = AutoPolicy(nonfinite_patience=3, cooldown=10)
    state = p.init()
    for t in range(5):
        _, state = p.decide([], stats(t, norm=1.0), state)
    actions = []
    for t in range(5, 11):
        d, state = p.decide([nonfinite(t)], stats(t, finite=False), state, can_rollback=True)
        actions.append(sorted(a.kind for a in d.actions))
    assert actions[:2] == [["skip_step"], ["skip_step"]]
    assert actions[2] == ["lr_decay", "rollback"] and d.rollback is False
    assert state.lr_factor == p.step_size_factor  # one cut: the next waits for the cool-down


def test_nonfinite_steps_out_of_a_healthy_run_are_only_skipped():
    """One batch in eight makes a NaN (bad data, a sqrt at zero): skipping is the remedy; decaying
    the LR would only stall the run."""
    p = AutoPolicy()
    state = p.init()
    for t in range(200):
        if t % 8 == 0:
            d, state = p.decide([nonfinite(t)], stats(t, finite=False), state)
            assert [a.kind for a in d.actions] == ["skip_step"]
        else:
            d, state = p.decide([], stats(t), state)
        assert d.lr_factor == 1.0


def test_auto_rolls_back_only_when_the_adapter_can():
    p = AutoPolicy()
    d, _ = p.decide([nonfinite(0, params_bad=True)], stats(0, finite=False, params_finite=False), p.init())
    assert not d.rollback and d.skip
    d, _ = p.decide([nonfinite(0, params_bad=True)], stats(0, finite=False, params_finite=False), p.init(), can_rollback=True)
    assert d.rollback and d.skip
    assert sorted(a.kind for a in d.actions) == ["lr_decay", "rollback"]


def test_auto_recommends_batchnorm_once():
    p = AutoPolicy()
    state = p.init()
    f = Finding("vanishing", "warning", 9, ("fc0", "fc1"), "vanish", {"insert_after": ["fc0", "fc1", "fc2"]})
    d, state = p.decide([f], stats(9), state)
    assert [a.kind for a in d.actions] == ["recommend_batchnorm"]
    assert d.actions[0].params["insert_after"] == ["fc0", "fc1", "fc2"]
    d, state = p.decide([f], stats(10), state)
    assert not d.actions


def test_deferred_decisions_follow_the_controls_in_force():
    """Compiled adapters (immediate=False) ran this step under the previous controls."""
    p = AutoPolicy()
    state = p.init()
    d, state = p.decide([exploding(0, level=2.0)], stats(0, norm=50.0), state, immediate=False)
    assert d.clip_norm is None and not d.actions  # the step already ran unclipped
    assert d.controls.clip_norm == 2.0
    d, state = p.decide([], stats(1, norm=10.0), state, immediate=False)
    assert d.clip_norm == 2.0 and [a.kind for a in d.actions] == ["clip"]


def test_observe_never_acts():
    monitor = Monitor(policy="observe")
    for s in testing.exploding_stream(onset=20, steps=60):
        d = monitor.observe(s)
        assert not d.actions and not d.skip and d.clip_norm is None and d.lr_factor == 1.0
    for s in testing.nan_at(step=5, steps=10):
        assert not monitor.observe(s).skip
    assert not monitor.report().actions and not monitor.report().healthy
    assert monitor.controls.skip_nonfinite is False and math.isinf(monitor.controls.clip_norm)


def lr_stats(step, lr, norm=1.0):
    s = stats(step, norm=norm)
    s.lr = lr
    return s


def test_auto_brings_a_jumped_learning_rate_back_and_rolls_back():
    p = AutoPolicy()
    state = p.init()
    for t in range(20):  # a warm-up: the LR rises 2x over these steps
        d, state = p.decide([], lr_stats(t, 1e-3 * (1 + t / 20)), state)
        assert not d.actions
    # The user's LR jumps to 1e3 at step 20; the explosion shows at step 21.
    d, state = p.decide([], lr_stats(20, 1e3), state)
    assert not d.actions
    d, state = p.decide([exploding(21, level=2.0, severity="error")], lr_stats(21, 1e3, norm=500.0), state,
                        can_rollback=True)
    kinds = sorted(a.kind for a in d.actions)
    assert kinds == ["lr_decay", "rollback"]
    assert d.rollback and d.skip
    # the median of the last 10 LRs (the jumped one included: the median shrugs it off)
    reference = sorted([1e-3 * (1 + t / 20) for t in range(11, 20)] + [1e3])[5]
    assert d.lr_factor * 1e3 == pytest.approx(reference)
    assert "jumped" in next(a for a in d.actions if a.kind == "lr_decay").message
    # The factor now stays in force: the effective LR is back at the healthy level.
    d, state = p.decide([], lr_stats(22, 1e3 * d.lr_factor), state)
    assert d.lr_factor * 1e3 == pytest.approx(reference) and not d.actions


def test_lr_jump_without_explosion_is_left_alone():
    """Warm restarts jump the LR by orders of magnitude on healthy runs: no finding, no action."""
    p = AutoPolicy()
    state = p.init()
    for t in range(30):
        lr = 1e-3 if t % 10 == 0 else 1e-8
        d, state = p.decide([], lr_stats(t, lr), state)
        assert not d.actions and d.lr_factor == 1.0


def test_auto_decays_when_clipping_keeps_cutting_hard():
    """The detector adapts to a steady over-the-edge regime; the policy still sees that clipping
    has to cut the norm by over 2x on every step, and lowers the LR."""
    p = AutoPolicy(cooldown=5)
    state = p.init()
    d, state = p.decide([exploding(0, level=1.0)], stats(0, norm=50.0), state)
    factors = []
    for t in range(1, 16):
        d, state = p.decide([], stats(t, norm=3.0), state)  # 3x over the level, no finding
        factors.append(d.lr_factor)
        assert d.clip_norm == 1.0
    # Steps 0-4: the norm fell from 50 to 3 (progress): the stretch is judged again from step 4.
    # Steps 4-8 cut 3x without bringing the norm down: decay; then again 5 steps later.
    assert factors[:7] == [1.0] * 7 and factors[7:12] == [0.5] * 5 and factors[12] == 0.25
    # Mild clipping (under 2x) is left alone.
    p2 = AutoPolicy(cooldown=5)
    state = p2.init()
    _, state = p2.decide([exploding(0, level=1.0)], stats(0, norm=50.0), state)
    for t in range(1, 30):
        d, state = p2.decide([], stats(t, norm=1.5), state)
    assert d.lr_factor == 1.0


def test_the_hold_on_a_jumped_lr_lifts_when_the_users_lr_comes_back():
    """LR x100 for three steps: held at the healthy LR while the jump lasts, untouched after."""
    p = AutoPolicy()
    state = p.init()
    for t in range(20):
        d, state = p.decide([], lr_stats(t, 1e-3), state)
    d, state = p.decide([], lr_stats(20, 1e-1), state)  # the jump; no finding yet
    d, state = p.decide([exploding(21, severity="error")], lr_stats(21, 1e-1, norm=500.0), state)
    assert d.lr_factor == pytest.approx(1e-2)
    # still jumped: the adapter reports the effective LR (scheduled x factor in force)
    d, state = p.decide([], lr_stats(22, 1e-1 * d.lr_factor), state)
    assert d.lr_factor == pytest.approx(1e-2)
    # the user's schedule is back at 1e-3: the hold lifts, the LR is the user's again
    d, state = p.decide([], lr_stats(23, 1e-3 * d.lr_factor), state)
    assert d.lr_factor == 1.0
    assert state.lr_cap == math.inf


def test_heavy_clipping_while_the_loss_falls_is_left_alone():
    """A stable run far from its optimum has large gradients too: clipping cuts them hard, but the
    loss goes down, so the LR stays."""
    p = AutoPolicy(cooldown=5, clip_release=50)
    state = p.init()
    _, state = p.decide([exploding(0, level=1.0)], stats(0, norm=50.0), state)
    for t in range(1, 70):
        s = stats(t, norm=10.0)
        s.loss = 1000.0 * 0.97 ** t
        d, state = p.decide([], s, state)
        assert d.lr_factor == 1.0
        # the level set by the one alarm holds until clip_release quiet steps, then it is lifted
        assert d.clip_norm == (1.0 if t < 50 else None)


def test_a_clip_level_set_by_one_alarm_does_not_throttle_the_rest_of_the_run():
    p = AutoPolicy(clip_release=50)
    state = p.init()
    d, state = p.decide([exploding(0, level=1.0)], stats(0, norm=8.0), state)
    assert d.clip_norm == 1.0
    clipped = 0
    for t in range(1, 300):  # the norm grows slowly, as it does in healthy training
        d, state = p.decide([], stats(t, norm=0.5 * 1.01 ** t), state)
        clipped += d.clip_norm is not None
    assert state.clip_norm == math.inf and d.lr_factor == 1.0 and clipped <= 50
