"""What a gradient check trains: :class:`CheckSpec`, and how a factory's return value becomes one.

A setup is what a *factory* returns (see :mod:`gradwatch.check`); the framework is told from the
returned objects' types (their classes' modules), so this module imports no framework.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gradwatch.check.targets import describe
from gradwatch.errors import BadTargetError
from gradwatch.stats import StepStats

__all__ = ["DEFAULT_STEPS", "EXPECTED_SETUP", "CheckSpec", "as_spec", "detect_framework", "validate_spec"]

DEFAULT_STEPS = 50
"""Steps a check runs when neither the caller nor the :class:`CheckSpec` says."""

EXPECTED_SETUP = """A factory must return one of:
  PyTorch:  (model, optimizer, batches, loss_fn)   batches: an iterable of (inputs, targets)
  Keras:    (model, x, y) or (model, dataset)      model compiled; dataset: tf.data.Dataset,
                                                   keras.utils.PyDataset or a generator of (x, y)
  or a gradwatch.CheckSpec(...)"""


@dataclass
class CheckSpec:
    """A training setup to check, with its parts named.

    Give the fields of one framework: ``model``, ``optimizer``, ``batches``, ``loss_fn`` for
    PyTorch; ``model``, ``x`` (and ``y``) for Keras; or ``stats`` alone.

    Args:
        model: A ``torch.nn.Module``, or a compiled ``keras.Model``. Defaults to None (``stats``).
        optimizer: PyTorch: the optimizer over the model's parameters. Defaults to None.
        batches: PyTorch: an iterable of ``(inputs, targets)``; inputs that are a tuple are passed
            as ``model(*inputs)``, a dict as ``model(**inputs)``. It may be endless. When it ends
            before ``steps`` it is iterated again if it can be (a ``DataLoader``, a list), else the
            check stops there. Defaults to None.
        loss_fn: PyTorch: ``loss_fn(outputs, targets)`` returns the scalar loss. Defaults to None.
        x: Keras: the inputs (arrays), or a dataset of ``(x, y)`` batches. Defaults to None.
        y: Keras: the targets when ``x`` holds arrays. Defaults to None.
        batch_size: Keras: the batch size for arrays. Defaults to None (Keras' 32).
        stats: An iterable of :class:`~gradwatch.StepStats` to judge as they come, for loops
            gradwatch has no adapter for. Defaults to None.
        steps: Steps to run when the caller does not say. Defaults to None (:data:`DEFAULT_STEPS`).
        name: A name for reports. Defaults to "".

    Example:
        >>> from gradwatch.testing import healthy
        >>> run_check(CheckSpec(stats=healthy(steps=30))).healthy
        True
    """

    model: Any = None
    optimizer: Any = None
    batches: Any = None
    loss_fn: Any = None
    x: Any = None
    y: Any = None
    batch_size: int | None = None
    stats: Iterable[StepStats] | None = None
    steps: int | None = None
    name: str = ""

    @property
    def framework(self) -> str:
        """``"torch"``, ``"keras"``, ``"stats"``, or ``""`` when it cannot be told."""
        if self.stats is not None and self.model is None:
            return "stats"
        return detect_framework(self.model) or ""


def detect_framework(obj: Any) -> str | None:
    """Tell the framework of a model from its class hierarchy, importing nothing.

    Args:
        obj: A model (or any object).

    Returns:
        ``"torch"`` for a ``torch.nn.Module``, ``"keras"`` for a Keras 3 (or ``tf.keras``) model,
        else None.
    """
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", "") or ""
        root = module.split(".", 1)[0]
        if root == "torch":
            return "torch"
        if root in ("keras", "tf_keras") or module.startswith("tensorflow.python.keras"):
            return "keras"
    return None


def _peek_stats(value: Any) -> Iterable[StepStats] | None:
    """``value`` again (re-chained) when it is an iterable whose first item is a StepStats."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        return None
    if isinstance(value, (list, tuple)):
        return value if value and all(isinstance(v, StepStats) for v in value) else None
    if detect_framework(value):
        return None
    iterator = iter(value)
    try:
        first = next(iterator)
    except StopIteration:
        return None
    except Exception:  # a dataset that cannot be iterated here is not a stats stream
        return None
    return itertools.chain([first], iterator) if isinstance(first, StepStats) else None


def as_spec(setup: Any, *, origin: str = "the factory") -> CheckSpec:
    """Turn what a factory returned into a :class:`CheckSpec`.

    Args:
        setup: A :class:`CheckSpec`, a PyTorch or Keras tuple (see the module docstring), or an
            iterable of :class:`~gradwatch.StepStats`.
        origin: Who returned it, for error messages. Defaults to ``"the factory"``.

    Returns:
        The spec.

    Raises:
        BadTargetError: when ``setup`` is none of these; the message says what was expected and
            what was received.
    """
    if isinstance(setup, CheckSpec):
        spec = setup
    elif isinstance(setup, (tuple, list)) and setup and detect_framework(setup[0]) == "torch":
        if len(setup) != 4:
            raise BadTargetError(
                f"{origin} returned a PyTorch model in {describe(setup)}; expected 4 items "
                f"(model, optimizer, batches, loss_fn).\n{EXPECTED_SETUP}"
            )
        spec = CheckSpec(model=setup[0], optimizer=setup[1], batches=setup[2], loss_fn=setup[3])
    elif isinstance(setup, (tuple, list)) and setup and detect_framework(setup[0]) == "keras":
        if len(setup) not in (2, 3):
            raise BadTargetError(
                f"{origin} returned a Keras model in {describe(setup)}; expected (model, x, y) or "
                f"(model, dataset).\n{EXPECTED_SETUP}"
            )
        spec = CheckSpec(model=setup[0], x=setup[1], y=setup[2] if len(setup) == 3 else None)
    else:
        stream = _peek_stats(setup)
        if stream is None:
            raise BadTargetError(f"{origin} returned {describe(setup)}.\n{EXPECTED_SETUP}")
        spec = CheckSpec(stats=stream)
    validate_spec(spec, origin=origin)
    return spec


def validate_spec(spec: CheckSpec, *, origin: str = "the factory") -> None:
    """Check that a spec's parts fit its framework.

    Args:
        spec: The spec.
        origin: Who made it, for error messages. Defaults to ``"the factory"``.

    Raises:
        BadTargetError: naming the part that does not fit, what it is and what was expected.
    """
    framework = spec.framework
    if framework == "stats":
        return
    if framework == "torch":
        problems = []
        if not all(hasattr(spec.optimizer, a) for a in ("step", "zero_grad", "param_groups")):
            problems.append(f"optimizer is {describe(spec.optimizer)}; expected a torch.optim.Optimizer")
        if spec.batches is None or not hasattr(spec.batches, "__iter__") or isinstance(spec.batches, (str, bytes)):
            problems.append(f"batches is {describe(spec.batches)}; expected an iterable of (inputs, targets)")
        if not callable(spec.loss_fn):
            problems.append(f"loss_fn is {describe(spec.loss_fn)}; expected loss_fn(outputs, targets) -> loss")
        if problems:
            raise BadTargetError(
                f"{origin} returned a PyTorch setup that does not fit (model, optimizer, batches, loss_fn): "
                + "; ".join(problems) + "."
            )
        return
    if framework == "keras":
        if spec.x is None:
            raise BadTargetError(f"{origin} returned a Keras model without data; expected (model, x, y) or (model, dataset).")
        if getattr(spec.model, "optimizer", None) is None or not getattr(spec.model, "compiled", True):
            raise BadTargetError(
                f"{origin} returned a Keras model that is not compiled; call "
                "model.compile(optimizer=..., loss=...) in the factory before returning it."
            )
        return
    raise BadTargetError(
        f"{origin} returned a CheckSpec whose model is {describe(spec.model)}, which is neither a "
        f"torch.nn.Module nor a keras.Model, and no stats.\n{EXPECTED_SETUP}"
    )
