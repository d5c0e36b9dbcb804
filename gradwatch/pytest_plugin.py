"""pytest plugin of gradwatch, registered under the ``pytest11`` entry point: installing gradwatch
is enough to use it.

* The ``gradwatch`` fixture checks a training setup and returns its report::

      def test_model_trains_healthily(gradwatch):
          report = gradwatch.check(build_mlp(), steps=30)   # same setups as `gradwatch check`
          assert report.healthy, report.summary()

* The ``gradwatch`` marker checks the setup a test returns, and fails the test on findings::

      @pytest.mark.gradwatch(steps=30, fail_on="warning")
      def test_mlp():
          return build_mlp()

* ``gradwatch.doctor(setup)`` runs ``gradwatch doctor`` on a setup and returns the ranked repairs::

      def test_the_doctor_finds_a_repair(gradwatch):
          result = gradwatch.doctor(build_sigmoid_mlp(), steps=40)
          assert result.best is not None and result.best.healthy, result.summary()

* ``--gradwatch-report DIR`` saves every report (JSON, and HTML when matplotlib is installed).

Importing this module imports pytest and the gradwatch core only, never a framework: the setup
under test brings its own.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gradwatch.doctor import DoctorResult
    from gradwatch.report import Report

MARKER_OPTIONS = ("steps", "fail_on", "seed", "device")
"""Keyword arguments the ``gradwatch`` marker takes."""

_RESULTS = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradwatch", "gradient health checks")
    group.addoption(
        "--gradwatch-report", metavar="DIR", default=None,
        help="save the report of every gradwatch check in DIR (JSON, and HTML when matplotlib is installed)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gradwatch(steps=None, fail_on='warning', seed=None, device=None): the test returns a training "
        "setup (what a `gradwatch check` factory returns); train it for `steps` steps and fail the test on "
        "gradient findings at or above `fail_on`.",
    )
    config.stash[_RESULTS] = []


def _save(config: pytest.Config, nodeid: str, report: Report, index: int) -> list[str]:
    directory = config.getoption("gradwatch_report")
    if not directory:
        return []
    os.makedirs(directory, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_") + (f"-{index}" if index else "")
    paths = [os.path.join(directory, stem + ".json")]
    with open(paths[0], "w", encoding="utf-8") as fh:
        fh.write(report.to_json())
    if importlib.util.find_spec("matplotlib") is not None:
        paths.append(os.path.join(directory, stem + ".html"))
        with open(paths[1], "w", encoding="utf-8") as fh:
            fh.write(report.to_html(title=nodeid))
    return paths


class GradwatchFixture:
    """What the ``gradwatch`` fixture gives a test.

    Args:
        config: The pytest config.
        nodeid: The test's id (names saved reports).
    """

    def __init__(self, config: pytest.Config, nodeid: str) -> None:
        self.config = config
        self.nodeid = nodeid
        self.reports: list[Report] = []

    def check(self, setup: Any, *, steps: int | None = None, seed: int | None = None,
              device: str | None = None) -> Report:
        """Train a setup for a few steps under ``policy="observe"`` and return its report.

        Args:
            setup: What a ``gradwatch check`` factory returns (a PyTorch or Keras tuple, a
                :class:`~gradwatch.CheckSpec`), or the factory itself.
            steps: Optimizer steps. Defaults to None (the spec's, else 50).
            seed: Seed for Python, numpy and the imported frameworks. Defaults to None (left alone).
            device: Device to train on. Defaults to None (where the setup is).

        Returns:
            The :class:`~gradwatch.Report`; assert on ``report.healthy`` or ``report.kinds()``.

        Raises:
            BadTargetError: when the setup is not one gradwatch can run.
        """
        from gradwatch.check import run_check

        report = run_check(setup, steps=steps, seed=seed, device=device, name=self.nodeid)
        _save(self.config, self.nodeid, report, len(self.reports))
        self.reports.append(report)
        self.config.stash[_RESULTS].append((self.nodeid, report.healthy))
        return report

    def doctor(self, setup: Any, *, steps: int | None = None, seed: int | None = 0, device: str | None = None,
               **options: Any) -> DoctorResult:
        """Run the doctor on a setup: causes, the repairs they call for tried and ranked.

        Args:
            setup: What a ``gradwatch check`` factory returns, or the factory itself.
            steps: Steps of every trial. Defaults to None (the spec's, else 60).
            seed: Seed of the factory and of every trial. Defaults to 0.
            device: Device to train on. Defaults to None (where the setup is).
            **options: ``budget_s``, ``full_steps``, ``max_trials``, ``pairs`` of
                :func:`gradwatch.doctor.run_doctor`.

        Returns:
            The :class:`~gradwatch.doctor.DoctorResult`; ``result.best`` is the top-ranked repair
            (None when nothing beat the baseline), ``result.best.model`` the repaired model.
            With ``--gradwatch-report DIR`` the result is saved as ``DIR/<test id>-doctor.json``.

        Raises:
            BadTargetError: when the setup is not one gradwatch can run.
        """
        from gradwatch.doctor import run_doctor

        result = run_doctor(setup, steps=steps, seed=seed, device=device, name=self.nodeid, **options)
        directory = self.config.getoption("gradwatch_report")
        if directory:
            os.makedirs(directory, exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.nodeid).strip("_")
            with open(os.path.join(directory, stem + "-doctor.json"), "w", encoding="utf-8") as fh:
                fh.write(result.to_json())
        self.config.stash[_RESULTS].append((self.nodeid, not result.fails("warning")))
        return result


@pytest.fixture
def gradwatch(request: pytest.FixtureRequest) -> GradwatchFixture:
    """Check training setups from a test: ``gradwatch.check(setup, steps=30)`` returns the Report,
    ``gradwatch.doctor(setup)`` the doctor's ranked repairs."""
    return GradwatchFixture(request.config, request.node.nodeid)


def _marker_options(marker: pytest.Mark, nodeid: str) -> dict[str, Any]:
    if marker.args:
        raise pytest.UsageError(
            f"{nodeid}: @pytest.mark.gradwatch takes keyword arguments only ({', '.join(MARKER_OPTIONS)}); "
            f"received positional {marker.args!r}."
        )
    unknown = sorted(set(marker.kwargs) - set(MARKER_OPTIONS))
    if unknown:
        raise pytest.UsageError(
            f"{nodeid}: @pytest.mark.gradwatch does not take {', '.join(unknown)}; it takes {', '.join(MARKER_OPTIONS)}."
        )
    options = dict(marker.kwargs)
    fail_on = options.get("fail_on", "warning")
    if fail_on not in ("info", "warning", "error", "never"):
        raise pytest.UsageError(
            f"{nodeid}: fail_on must be 'info', 'warning', 'error' or 'never'; received {fail_on!r}."
        )
    options["fail_on"] = fail_on
    return options


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run a ``@pytest.mark.gradwatch`` test: call it, check the setup it returns."""
    marker = pyfuncitem.get_closest_marker("gradwatch")
    if marker is None:
        return None
    options = _marker_options(marker, pyfuncitem.nodeid)
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        raise pytest.UsageError(f"{pyfuncitem.nodeid}: @pytest.mark.gradwatch does not support async tests.")
    names = pyfuncitem._fixtureinfo.argnames
    setup = pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names})
    if setup is None:
        pytest.fail(
            "A @pytest.mark.gradwatch test must return a training setup: (model, optimizer, batches, "
            "loss_fn) for PyTorch, (model, x, y) for Keras, or a gradwatch.CheckSpec; it returned None.",
            pytrace=False,
        )
    checker = GradwatchFixture(pyfuncitem.config, pyfuncitem.nodeid)
    fail_on = options.pop("fail_on")
    report = checker.check(setup, **options)
    failing = report.kinds(fail_on) if fail_on != "never" else []
    if failing:
        pytest.fail(
            f"gradwatch: {', '.join(failing)} at or above {fail_on!r}\n\n{report.summary()}", pytrace=False
        )
    return True


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    unhealthy = sum(1 for _, healthy in results if not healthy)
    line = f"gradwatch: {len(results)} gradient check(s), {unhealthy} unhealthy"
    directory = config.getoption("gradwatch_report")
    if directory:
        line += f"; reports in {directory}"
    terminalreporter.write_line(line)
