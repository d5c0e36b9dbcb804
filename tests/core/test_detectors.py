"""Each detector fires on its pathology within a documented number of steps and stays silent on
every healthy stream, including the traps of docs/design.md ("what healthy looks like")."""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch import detectors, testing
from gradwatch.detectors import default_detectors, state_from_dict, state_to_dict


def run(detector, stream):
    stream = list(stream)
    state = detector.init(stream[0].layout)
    found = []
    for stats in stream:
        new, state = detector.update(stats, state)
        found.extend(new)
    return found, state


HEALTHY = ["healthy", "converging", "warmup", "frozen_layers", "sparse_embedding", "noisy_small_batch", "zero_init_head"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stream_name", HEALTHY)
@pytest.mark.parametrize("detector", default_detectors(), ids=lambda d: d.kind)
def test_silent_on_healthy_streams(detector, stream_name, seed):
    found, _ = run(detector, testing.STREAMS[stream_name](seed=seed))
    assert not found, [str(f) for f in found]


def test_nonfinite_names_origin_and_finite_layers():
    found, _ = run(detectors.nonfinite(), testing.nan_at(step=50, steps=60, layers=5, origin=2))
    assert len(found) == 1
    f = found[0]
    assert (f.kind, f.severity, f.step) == ("nonfinite", "error", 50)
    assert f.evidence["origin"] == "fc2"
    assert f.evidence["nonfinite_layers"] == ["fc0", "fc1", "fc2"]
    assert f.evidence["finite_layers"] == ["fc3", "fc4"]
    assert f.evidence["loss_finite"] is True
    assert "starts at 'fc2'" in f.message and "loss is finite" in f.message


def test_nonfinite_everywhere_points_at_the_loss():
    found, _ = run(detectors.nonfinite(), testing.nan_at(step=3, steps=5, layers=4, origin=3, loss_finite=False))
    assert "does not come from one layer: look at this step's input batch, its labels and the loss" in found[0].message
    assert "loss itself is non-finite" in found[0].message


def test_nonfinite_loss_with_finite_gradients():
    layout = testing.make_layout(2)
    from gradwatch import StepStats

    s = StepStats(step=0, layout=layout, grad_norm=np.ones(4), loss=float("inf"))
    found, _ = detectors.nonfinite().update(s, detectors.nonfinite().init(layout))
    assert found and found[0].evidence["loss_finite"] is False


@pytest.mark.parametrize("onset", [0, 60, 300])
def test_exploding_found_within_ten_steps_of_onset(onset):
    found, _ = run(detectors.exploding(), testing.exploding_stream(onset=onset, steps=onset + 30))
    assert found, "explosion not detected"
    assert onset <= found[0].step <= onset + 10
    assert any(f.severity == "error" and f.evidence["rule"] == "growth" for f in found)
    assert all(f.evidence["clip_threshold"] > 0 for f in found)


def test_exploding_growth_is_judged_before_the_window_fills():
    # An LR far too high from step 0: x10 per step, non-finite after a handful of steps. With the
    # growth rule waiting for a full window (10 steps) the run would be non-finite before any
    # explosion was called; judged over the steps seen so far it is called at step 4: the two newest
    # norms are 100x the median of the earlier ones (one noisy step alone proves nothing).
    found, _ = run(detectors.exploding(), testing.exploding_stream(onset=0, steps=6, growth=10.0))
    growth = [f for f in found if f.evidence["rule"] == "growth"]
    assert growth and growth[0].step == 4 and growth[0].severity == "error"
    # The same rule stays silent on every healthy trap's first steps (warm-up spikes included).
    for name, stream in testing.healthy_streams().items():
        early, _ = run(detectors.exploding(), list(stream)[:12])
        assert early == [], name


def test_exploding_lr_jump_is_a_spike_with_a_clip_level_from_history():
    found, _ = run(detectors.exploding(), testing.lr_jump_stream(jump_at=300, steps=305))
    first = found[0]
    # 30x and staying there: called on its second step (one 30x step alone is what a batch of
    # one sample can do; an explosion does not come back down).
    assert first.step == 301 and first.evidence["rule"] == "spike"
    # the suggested level is the run's healthy level, far below the spike
    assert first.evidence["clip_threshold"] < first.evidence["global_norm"] / 5


def test_exploding_update_ratio_rule():
    from gradwatch import StepStats

    layout = testing.make_layout(2)
    det = detectors.exploding()
    state = det.init(layout)
    s = StepStats(step=0, layout=layout, grad_norm=np.ones(4), param_norm=np.ones(4),
                  update_norm=[5.0, 0.0, 0.1, 0.0])
    found, _ = det.update(s, state)
    assert [f.evidence["rule"] for f in found] == ["update_ratio"]
    assert found[0].layers == ("fc0",)


def test_vanishing_found_and_names_early_layers():
    found, _ = run(detectors.vanishing(), testing.vanishing_stream(steps=30, layers=8, decay=0.2))
    assert found and found[0].step <= 10
    assert found[0].layers[0] == "fc0"
    assert "fc0" in found[0].evidence["insert_after"]
    assert "BatchNorm" in found[0].message


def test_vanishing_needs_enough_layers():
    found, _ = run(detectors.vanishing(min_layers=3), testing.vanishing_stream(steps=30, layers=2, decay=1e-4))
    assert not found


def test_dead_units_found_after_window():
    found, _ = run(detectors.dead_units(), testing.dying_units_stream(onset=20, steps=40, layer=1))
    assert found[0].step == 29  # onset + window - 1
    assert found[0].layers == ("fc1",)
    assert found[0].severity == "warning"
    found, _ = run(detectors.dead_units(), testing.dying_units_stream(onset=0, steps=15, fraction=0.97))
    assert found[0].severity == "error"


def test_loss_spike_found_once():
    found, _ = run(detectors.loss_spike(), testing.healthy(steps=60, loss_spike_at=40))
    assert [f.step for f in found] == [40]


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (detectors.exploding, {"alpha": 1.5}, "0 < alpha < 1.0"),
        (detectors.exploding, {"min_ratio": 0.5}, "1 <= min_ratio <= big_ratio"),
        (detectors.vanishing, {"ratio_threshold": 2.0}, "0 < ratio_threshold < 1.0"),
        (detectors.dead_units, {"window": 0}, "window >= 1"),
        (detectors.loss_spike, {"z_threshold": -1}, "z_threshold > 0"),
    ],
)
def test_bad_arguments_state_the_rule_and_value(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


@pytest.mark.parametrize("detector", default_detectors(), ids=lambda d: d.kind)
def test_detector_state_round_trips(detector):
    stream = list(testing.exploding_stream(onset=30, steps=50))
    state = detector.init(stream[0].layout)
    for s in stream[:35]:
        _, state = detector.update(s, state)
    restored = state_from_dict(detector.init(stream[0].layout), state_to_dict(state))
    for s in stream[35:]:
        a, state = detector.update(s, state)
        b, restored = detector.update(s, restored)
        assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert repr(state_to_dict(state)) == repr(state_to_dict(restored))


def test_exploding_catches_a_slow_divergence():
    """1.43x per step (a linear regression at 2.4/lambda_max): 25x over a 10-step window is under
    the 100x of the short span, ~900x over 20 steps is over the 316x (100 ** 1.25) of the long one."""
    found, _ = run(detectors.exploding(), testing.exploding_stream(onset=0, steps=40, growth=1.43))
    growth = [f for f in found if f.evidence["rule"] == "growth"]
    assert growth and growth[0].severity == "error" and growth[0].step <= 20 and growth[0].evidence["window"] == 20
    # The loss, which the stream makes grow with the norm, says it earlier (3x its start).
    assert found[0].evidence["rule"] == "loss_rise" and found[0].step < growth[0].step


# -- what a small batch, an adaptive optimizer's first step and a fitted run look like -------------


def _stats(step, layout, *, loss=None, weights=None, zero=None, dead=None):
    from gradwatch import StepStats

    n = len(layout)
    param = None if weights is None else np.full(n, weights / np.sqrt(n))
    return StepStats(step=step, layout=layout, grad_norm=np.full(n, 0.1), param_norm=param, loss=loss,
                     zero_fraction=None if zero is None else np.full(n, zero),
                     dead_fraction=None if dead is None else np.full(n, dead))


def _feed(detector, layout, rows):
    state = detector.init(layout)
    found = []
    for step, row in enumerate(rows):
        new, state = detector.update(_stats(step, layout, **row), state)
        found += new
    return found


@pytest.mark.parametrize(("norms", "losses", "expected"), [
    # Adagrad/Adam's first update moves every weight by ~lr: +150 %, then relatively less.
    ([1.0, 2.5, 2.6, 2.7], [1.0, 2.0, 1.6, 1.2], []),
    # A step size that is really too large makes the next update larger still.
    ([1.0, 2.5, 6.5, 20.0], [1.0, 2.0, 4.0, 9.0], [2, 3]),
    # Adagrad at lr 0.6 on a GRU: five times the weights, the loss x2.4, then it recovers.
    ([1.0, 5.9, 6.0, 6.1], [2.3, 5.5, 4.0, 3.0], []),
    # Ten times the weights in one update and the loss x900, stuck there (Adam at lr 1.0).
    ([1.0, 12.0, 14.0, 15.0, 16.0], [2.3, 2100.0, 3500.0, 3400.0, 5800.0], [4]),
    # Adagrad at lr 0.3 on a CNN: the loss x50 after the first update, then halving step by step.
    ([1.0, 5.6, 5.7, 5.8, 5.9, 6.0], [2.3, 125.0, 40.0, 10.0, 4.0, 2.5], []),
    # A large first update that the loss takes well is how a small convex model starts.
    ([1.0, 2.5, 6.5], [1.0, 0.5, 0.3], []),
    # One large update, then the loss stays 4x up (a saturated softmax: the gradients go quiet).
    ([1.0, 3.0, 3.1, 3.2, 3.3], [2.3, 10.0, 10.0, 9.8, 9.9], [4]),
])
def test_exploding_updates_as_large_as_the_weights(norms, losses, expected):
    layout = testing.make_layout(2)
    found = _feed(detectors.exploding(), layout, [{"weights": w, "loss": loss} for w, loss in zip(norms, losses)])
    assert [f.step for f in found if f.evidence["rule"] == "update_ratio"] == expected


def test_exploding_loss_rise_needs_every_recent_batch_above_it():
    """Batches of one or two samples: the median of seven losses wanders 5x up while a batch the
    model fits still scores near 0. A divergence lifts every batch."""
    layout = testing.make_layout(2)
    noisy = [1.0] * 7 + [5.0, 5.0, 0.05, 5.0, 5.0, 5.0, 0.02] * 4
    rule = [f for f in _feed(detectors.exploding(), layout, [{"loss": x} for x in noisy]) if f.evidence["rule"] == "loss_rise"]
    assert rule == []
    rising = [1.0] * 7 + [5.0] * 7
    rule = [f for f in _feed(detectors.exploding(), layout, [{"loss": x} for x in rising]) if f.evidence["rule"] == "loss_rise"]
    assert [f.step for f in rule] == [13]


@pytest.mark.parametrize(("spike", "severity"), [(0.5, "info"), (3.0, "warning")])
def test_loss_spike_warns_only_above_the_run_s_first_losses(spike, severity):
    """A fitted run (loss 0.01) whose batch holds one confidently wrong sample scores far above its
    recent losses but below where training started: info. Worse than the untrained model: warning."""
    layout = testing.make_layout(2)
    rng = np.random.default_rng(0)
    losses = list(1.0 + 0.1 * rng.random(20)) + list(0.01 * (1 + 0.1 * rng.random(50))) + [spike]
    found = _feed(detectors.loss_spike(), layout, [{"loss": x} for x in losses])
    assert [(f.step, f.severity) for f in found] == [(70, severity)]


def test_dead_units_followed_one_by_one_are_judged_on_the_same_units():
    """With a batch of one sample, 60 % of a ReLU layer is off on every batch (zero_fraction), but no
    unit stays off step after step (dead_fraction 0): not dead. Where the adapter follows units, a
    layer whose units stay dead is found as soon as their streak says so."""
    layout = testing.make_layout(3)
    alive = _feed(detectors.dead_units(), layout, [{"zero": 0.6, "dead": 0.0, "loss": 1.0}] * 40)
    assert alive == []
    shares_only = _feed(detectors.dead_units(), layout, [{"zero": 0.6, "loss": 1.0}] * 40)
    assert shares_only and shares_only[0].kind == "dead_units"  # what per-step shares alone cannot tell
    dead = _feed(detectors.dead_units(), layout, [{"zero": 0.8, "dead": 0.0, "loss": 1.0}] * 5
                 + [{"zero": 0.8, "dead": 0.8, "loss": 1.0}] * 30)
    assert dead and dead[0].step == 5 and dead[0].severity == "warning"  # the streak covers the window
    assert set(dead[0].layers) == {"fc0", "fc1"}


def test_losses_of_exactly_zero_then_a_positive_one_are_judged_without_dividing_by_zero():
    """A run fitted to exactly 0 loss (a logistic regression on separable data), then one batch it
    does not fit, with an update as large as the weights in between (found by the zoo: the
    message divided by the largest recent loss, 0)."""
    layout = testing.make_layout(2)
    losses = [1.0] * 20 + [0.0] * 50 + [0.5, 0.4, 0.3, 0.3, 0.3]
    norms = [1.0] * 70 + [3.0, 3.1, 3.2, 3.3, 3.4]
    rows = [{"loss": x, "weights": w} for x, w in zip(losses, norms)]
    spikes = _feed(detectors.loss_spike(), layout, rows)
    assert spikes[0].step == 70 and "exactly 0" in spikes[0].message
    _feed(detectors.exploding(), layout, rows)  # no ZeroDivisionError
