"""Running a gradient check: :func:`run_check` on a setup, :func:`check_target` on a target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradwatch.check.loops import run_spec
from gradwatch.check.spec import DEFAULT_STEPS, CheckSpec, as_spec, detect_framework
from gradwatch.check.targets import load_target, seed_everything, seeded
from gradwatch.errors import BadTargetError
from gradwatch.report import Report

__all__ = ["check_target", "run_check"]


def run_check(
    setup: Any,
    *,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    name: str = "",
) -> Report:
    """Train a setup for a few steps under ``policy="observe"`` and return its report.

    Args:
        setup: A :class:`CheckSpec`, what a factory returns (see the module docstring), or the
            factory itself (called after seeding).
        steps: Optimizer steps to run. Defaults to None: the spec's ``steps``, else
            :data:`DEFAULT_STEPS`.
        seed: Seed for Python, numpy and the frameworks, set before the factory is called (a
            framework the factory imports is seeded as it is imported) and again before training.
            Defaults to None (the random state is left alone).
        device: Where to train (``"cuda"``, ``"cpu"``, ``"cuda:1"``; for Keras a ``keras.device``
            name). Defaults to None (where the factory put it).
        progress: Called as ``progress(done, total)`` after each step. Defaults to None.
        name: Origin for error messages (the target). Defaults to "".

    Returns:
        The report.

    Raises:
        BadTargetError: when the factory raises, returns something unusable, or its setup fails
            in the first steps (the message says which and why).
        ValueError: for ``steps < 1``.
    """
    origin = name or "the factory"
    with seeded(seed):
        if callable(setup) and not isinstance(setup, CheckSpec) and detect_framework(setup) is None:
            try:
                setup = setup()
            except Exception as exc:
                raise BadTargetError(f"{origin} raised {type(exc).__name__}: {exc}") from exc
    spec = as_spec(setup, origin=origin)
    total = steps if steps is not None else (spec.steps or DEFAULT_STEPS)
    if total < 1:
        raise ValueError(f"steps must be >= 1; received steps={total}.")
    if seed is not None:
        seed_everything(seed)  # again: frameworks the factory imported, and training-time randomness
    return run_spec(spec, steps=total, device=device, progress=progress, origin=origin)


def check_target(target: str, **kwargs: Any) -> Report:
    """Load a target and check the setup its factory returns (``gradwatch check``, in Python).

    Args:
        target: ``"package.module:function"`` or ``"path/to/file.py:function"``.
        **kwargs: Passed on to :func:`run_check` (``steps``, ``seed``, ``device``, ``progress``).

    Returns:
        The report.

    Raises:
        BadTargetError: see :func:`load_target` and :func:`run_check`.
    """
    with seeded(kwargs.get("seed")):  # module-level code of the target runs seeded too
        factory = load_target(target)
    kwargs.setdefault("name", target)
    return run_check(factory, **kwargs)
