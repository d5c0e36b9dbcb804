"""Gradient health checks of a training setup: what ``gradwatch check`` and the pytest plugin run.

A check trains a setup for a few steps under ``policy="observe"`` (so the check never changes
what it measures) and returns the :class:`~gradwatch.Report`. A setup is what a *factory*
returns:

* PyTorch: ``(model, optimizer, batches, loss_fn)``, where ``batches`` is any iterable of
  ``(inputs, targets)`` (a ``DataLoader``, a list, an endless generator: ``steps`` are taken);
* Keras 3: ``(model, x, y)`` or ``(model, dataset)`` with a compiled model and a ``tf.data``
  dataset, a ``keras.utils.PyDataset`` or a generator of ``(x, y)``;
* a :class:`CheckSpec`, which says the same with names (and can replay a stream of
  :class:`~gradwatch.StepStats` from a framework gradwatch has no adapter for).

The framework is told from the returned objects' types (their classes' modules), so this module
imports no framework: the factory already did. The loops themselves live in
:mod:`gradwatch.check.loops`, importing targets and seeding in :mod:`gradwatch.check.targets`,
the spec in :mod:`gradwatch.check.spec` and :func:`run_check` in :mod:`gradwatch.check.run`.

A *target* names a factory: ``"package.module:function"`` or ``"path/to/file.py:function"``.

>>> from gradwatch.testing import exploding_stream
>>> report = run_check(CheckSpec(stats=exploding_stream(onset=20, steps=40)))
>>> "exploding" in report.kinds("warning")
True
"""

from __future__ import annotations

from gradwatch.check.loops import Progress, run_spec
from gradwatch.check.run import check_target, run_check
from gradwatch.check.spec import (
    DEFAULT_STEPS,
    EXPECTED_SETUP,
    CheckSpec,
    as_spec,
    detect_framework,
    validate_spec,
)
from gradwatch.check.targets import describe, load_target, seed_everything, seeded

__all__ = [
    "DEFAULT_STEPS",
    "EXPECTED_SETUP",
    "CheckSpec",
    "Progress",
    "as_spec",
    "check_target",
    "describe",
    "detect_framework",
    "load_target",
    "run_check",
    "run_spec",
    "seed_everything",
    "seeded",
    "validate_spec",
]
