from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest

from gradwatch import Monitor, Report, StepStats, testing


def feed(monitor, stream):
    return [monitor.observe(s) for s in stream]


def test_healthy_stream_healthy_report():
    monitor = Monitor()
    decisions = feed(monitor, testing.healthy(steps=100))
    assert not any(d.actions for d in decisions)
    r = monitor.report()
    assert r.healthy and r.steps_measured == 100 and (r.first_step, r.last_step) == (0, 99)
    assert [layer["layer"] for layer in r.layers] == ["fc0", "fc1", "fc2", "fc3", "fc4"]
    assert len(r.history["steps"]) == 100 and r.history["steps"][0] == 0


def test_findings_are_merged_into_episodes():
    monitor = Monitor()
    feed(monitor, testing.vanishing_stream(steps=60))
    r = monitor.report()
    vanishing = [f for f in r.findings if f.kind == "vanishing"]
    assert len(vanishing) == 1
    assert vanishing[0].count == 60 - 9 and vanishing[0].last_step == 59
    assert r.finding_counts["vanishing"]["warning"] == 51
    assert r.action_counts == {"recommend_batchnorm": 1}


def test_note_skipped_is_counted_not_judged():
    monitor = Monitor()
    feed(monitor, testing.healthy(steps=30))
    monitor.note_skipped(30)
    monitor.note_skipped(31, reason="loss_scale_optimizer")
    r = monitor.report()
    assert r.healthy and r.skipped_steps == 2
    assert r.skipped[-1] == {"step": 31, "reason": "loss_scale_optimizer"}
    assert "2 step(s) skipped by the loss scaler" in r.summary()


def test_layout_change_restarts_windows():
    monitor = Monitor()
    feed(monitor, testing.healthy(steps=20, layers=3))
    feed(monitor, (StepStats(step=20 + s.step, layout=s.layout, grad_norm=s.grad_norm, param_norm=s.param_norm)
                   for s in testing.healthy(steps=20, layers=6)))
    r = monitor.report()
    assert r.healthy and len(r.layers) == 6


def test_observe_rejects_other_types():
    with pytest.raises(TypeError, match="expects a gradwatch.StepStats; received dict"):
        Monitor().observe({"grad_norm": 1})


def test_monitor_rejects_bad_detectors():
    with pytest.raises(TypeError, match="Each detector must be a gradwatch.detectors.Detector"):
        Monitor(detectors=[lambda s: None])


@pytest.mark.parametrize("through_json", [False, True])
def test_state_dict_round_trips_exactly(through_json):
    stream = list(testing.exploding_stream(onset=50, steps=90)) + [
        StepStats(step=90 + s.step, layout=s.layout, grad_norm=s.grad_norm, param_norm=s.param_norm,
                  nonfinite=s.nonfinite, loss=s.loss)
        for s in testing.nan_at(step=3, steps=10)
    ]
    reference = Monitor()
    resumed_source = Monitor()
    for s in stream[:60]:
        reference.observe(s)
        resumed_source.observe(s)
    saved = resumed_source.state_dict()
    if through_json:
        saved = json.loads(json.dumps(saved))
    resumed = Monitor()
    resumed.load_state_dict(saved)
    # NaN != NaN, so compare the serialised forms.
    assert json.dumps(resumed.state_dict()) == json.dumps(saved)
    for s in stream[60:]:
        a = reference.observe(s)
        b = resumed.observe(s)
        assert (a.skip, a.clip_norm, a.lr_factor) == (b.skip, b.clip_norm, b.lr_factor)
        assert [x.to_dict() for x in a.actions] == [x.to_dict() for x in b.actions]
    assert reference.report().to_json() == resumed.report().to_json()
    assert json.dumps(reference.state_dict()) == json.dumps(resumed.state_dict())


def test_load_state_dict_refuses_mismatches():
    m = Monitor()
    feed(m, testing.healthy(steps=5))
    state = m.state_dict()
    with pytest.raises(ValueError, match="used policy 'auto'; this one uses 'observe'"):
        Monitor(policy="observe").load_state_dict(state)
    from gradwatch.detectors import exploding

    with pytest.raises(ValueError, match="ran detectors"):
        Monitor(detectors=[exploding()]).load_state_dict(state)
    with pytest.raises(ValueError, match="Not a gradwatch Monitor state"):
        Monitor().load_state_dict({"version": 99})


def _resident_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_memory_stays_flat_over_100k_steps():
    """History, findings and actions are bounded: memory is O(layers x window), not O(steps)."""
    layout = testing.make_layout(5)
    rng = np.random.default_rng(0)
    base = rng.random(len(layout)) + 0.5
    params = np.full(len(layout), 8.0)
    monitor = Monitor(history=128, max_findings=100, max_actions=100)

    def step(t):
        # findings and actions every few steps (spikes and NaNs) exercise the bounded lists
        grad = base * np.exp(rng.normal(0, 0.1, len(layout)))
        if t % 97 == 0:
            grad = grad * 1e3
        if t % 89 == 0:
            grad[0] = np.nan
        return StepStats(step=t, layout=layout, grad_norm=grad, param_norm=params, loss=1.0)

    for t in range(20_000):
        monitor.observe(step(t))
    monitor.report()
    rss_early = _resident_bytes()
    state_early = len(json.dumps(monitor.state_dict()))
    for t in range(20_000, 100_000):
        monitor.observe(step(t))
    monitor.report()
    rss_late = _resident_bytes()
    state_late = len(json.dumps(monitor.state_dict()))
    assert monitor.steps_measured == 100_000
    assert len(monitor.findings()) <= 100 and len(monitor.actions()) <= 100
    # A leak of one float per step would be >= 2.5 MB over these 80,000 steps.
    assert rss_late - rss_early < 1_000_000, f"resident memory grew by {rss_late - rss_early} bytes"
    assert abs(state_late - state_early) < 0.05 * state_early, (state_early, state_late)


def test_report_round_trips_through_json():
    monitor = Monitor()
    feed(monitor, testing.nan_at(step=10, steps=30))
    r = monitor.report()
    again = Report.from_json(r.to_json())
    assert again.to_dict() == r.to_dict()
    assert not again.healthy and again.kinds() == ["nonfinite"]
    assert again.fails("error") and not Report(healthy=True).fails()
    with pytest.raises(ValueError, match="schema_version"):
        Report.from_dict({"healthy": True})


def test_summary_reads_well():
    monitor = Monitor()
    feed(monitor, testing.nan_at(step=10, steps=30))
    text = monitor.report().summary()
    assert text.startswith("gradwatch: UNHEALTHY (30 measured steps 0-29, policy=auto)")
    assert "grad/param" in text and "fc2" in text
    assert "[error] nonfinite at step 10" in text
    assert "skip_step at step 10" in text


@pytest.mark.parametrize(("after", "rescued"), [(0.4, True), (2.3, False)])
def test_rescued_needs_the_loss_below_where_the_run_started(after, rescued):
    """A NaN batch skipped at step 10, then 40 quiet steps: rescued when the loss has come down
    from the run's first losses; a run sitting at its starting loss (a rollback into a dead end,
    the loss at chance) is quiet but not rescued."""
    layout = testing.make_layout(3)
    monitor = Monitor(policy="auto")
    rng = np.random.default_rng(0)
    for step in range(50):
        grad = np.full(len(layout), np.nan if step == 10 else 0.1 * (1 + 0.05 * rng.standard_normal()))
        loss = float("nan") if step == 10 else (2.3 if step < 10 else after) * (1 + 0.01 * rng.standard_normal())
        monitor.observe(StepStats(step=step, layout=layout, grad_norm=grad, loss=loss))
    report = monitor.report()
    assert report.action_counts.get("skip_step") == 1
    assert report.rescued is rescued
    assert report.verdict() == ("RESCUED" if rescued else "UNHEALTHY")
    restored = Monitor(policy="auto")
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert restored.report().rescued is rescued
