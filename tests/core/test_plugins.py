from __future__ import annotations

import textwrap

import numpy as np
import pytest

import gradwatch
from gradwatch import Decision, Monitor, testing
from gradwatch.plugins import AUTOLOAD_ENV, Hooks, make_plugin_manager

PLUGIN_SOURCE = textwrap.dedent(
    '''
    import math

    import gradwatch
    from gradwatch.detectors import Detector


    def _budget(limit):
        def init(layout):
            return ()

        def update(stats, state):
            if stats.finite and stats.global_norm > limit:
                return [gradwatch.Finding("norm_budget", "warning", stats.step, (), f"norm {stats.global_norm:.3g} over budget {limit}")], state
            return [], state

        return Detector("norm_budget", init, update)


    @gradwatch.hookimpl
    def gradwatch_add_detectors(config):
        return [_budget(5.0)]
    '''
)


@pytest.fixture
def plugin_distribution(tmp_path, monkeypatch):
    """A throwaway distribution whose ``gradwatch`` entry point names a module with a detector."""
    (tmp_path / "gw_budget_plugin.py").write_text(PLUGIN_SOURCE)
    dist = tmp_path / "gw_budget_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gw-budget-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gradwatch]\nbudget = gw_budget_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_point_plugin_detector_appears_in_report(plugin_distribution, monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    hooks = Hooks(make_plugin_manager())
    monitor = Monitor(hooks=hooks)
    assert [d.kind for d in monitor.detectors] == [
        "nonfinite", "exploding", "vanishing", "dead_units", "loss_spike", "norm_budget"
    ]
    for s in testing.exploding_stream(onset=30, steps=40):
        monitor.observe(s)
    report = monitor.report()
    assert "norm_budget" in report.kinds("warning")
    assert any("over budget" in f.message for f in report.findings)


def test_autoload_can_be_turned_off(plugin_distribution, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    monitor = Monitor(hooks=Hooks(make_plugin_manager()))
    assert "norm_budget" not in [d.kind for d in monitor.detectors]
    assert len(monitor.detectors) == 5


class Recorder:
    def __init__(self):
        self.steps, self.findings, self.actions, self.reports = [], [], [], []

    @gradwatch.hookimpl
    def gradwatch_on_step(self, stats, decision, monitor):
        self.steps.append(stats.step)

    @gradwatch.hookimpl
    def gradwatch_on_finding(self, finding, monitor):
        self.findings.append(finding)

    @gradwatch.hookimpl
    def gradwatch_on_action(self, action, monitor):
        self.actions.append(action)

    @gradwatch.hookimpl
    def gradwatch_on_report(self, report):
        self.reports.append(report)


def test_sink_hooks_see_steps_episodes_actions_and_the_final_report():
    pm = make_plugin_manager(autoload=False)
    recorder = Recorder()
    pm.register(recorder)
    monitor = Monitor(hooks=Hooks(pm))
    for s in testing.vanishing_stream(steps=30):
        monitor.observe(s)
    assert recorder.steps == list(range(30))
    assert [f.kind for f in recorder.findings] == ["vanishing"]  # one episode, not 21 findings
    assert [a.kind for a in recorder.actions] == ["recommend_batchnorm"]
    report = monitor.finish()
    assert recorder.reports == [report]


def test_select_actions_hook_replaces_the_decision():
    class NeverSkip:
        @gradwatch.hookimpl
        def gradwatch_select_actions(self, findings, stats, decision, monitor):
            if decision.skip:
                return Decision(step=decision.step, controls=decision.controls, lr_factor=decision.lr_factor)
            return None

    pm = make_plugin_manager(autoload=False)
    pm.register(NeverSkip())
    monitor = Monitor(hooks=Hooks(pm))
    decisions = [monitor.observe(s) for s in testing.nan_at(step=5, steps=8)]
    assert not any(d.skip for d in decisions)
    assert not monitor.report().healthy  # the finding is still recorded


def test_a_plugin_implementing_an_unknown_hook_is_refused():
    import pluggy

    class Typo:
        @gradwatch.hookimpl
        def gradwatch_on_findings(self, finding):
            pass

    pm = make_plugin_manager(autoload=False)
    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_builtin_detectors_come_first_and_once():
    monitor = Monitor(hooks=Hooks(make_plugin_manager(autoload=False)))
    assert [d.kind for d in monitor.detectors] == ["nonfinite", "exploding", "vanishing", "dead_units", "loss_spike"]
    assert np.all([callable(d.update) for d in monitor.detectors])
