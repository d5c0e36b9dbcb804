"""The shape every detector has: a pure ``init`` / ``update`` pair, optax-style.

A detector is a :class:`Detector` tuple ``(kind, init, update)``:

* ``init(layout) -> state`` builds the state for the parameter tensors of ``layout``;
* ``update(stats, state) -> (findings, new_state)`` looks at one step and returns what is wrong.

States are ``NamedTuple`` instances of numbers and numpy arrays, so the monitor can save and restore
them without knowing what they mean (:func:`state_to_dict`, :func:`state_from_dict`). Detectors hold
no reference to framework objects and keep O(layers x window) memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from gradwatch.findings import Finding
from gradwatch.stats import Layout, StepStats

InitFn = Callable[[Layout], Any]
UpdateFn = Callable[[StepStats, Any], "tuple[list[Finding], Any]"]


class Detector(NamedTuple):
    """A named pair of pure functions.

    Attributes:
        kind: The finding kind it reports (``"exploding"``).
        init: ``init(layout) -> state``.
        update: ``update(stats, state) -> (findings, state)``.
        holds: ``holds(state) -> bool``, optional: True while the detector follows something
            whose outcome is not known yet (``exploding`` after an update as large as the
            weights). Adapters take no rollback snapshot then (:attr:`gradwatch.Decision.hold_snapshots`):
            a rollback called later must restore the parameters from before it.
    """

    kind: str
    init: InitFn
    update: UpdateFn
    holds: Callable[[Any], bool] | None = None


def state_to_dict(state: Any) -> dict[str, Any]:
    """Turn a NamedTuple state into plain Python (lists, floats, ints) that round-trips exactly."""
    out: dict[str, Any] = {}
    for key, value in state._asdict().items():
        if isinstance(value, np.ndarray):
            out[key] = {"ndarray": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
        elif isinstance(value, np.generic):
            out[key] = value.item()
        elif isinstance(value, tuple):
            out[key] = {"tuple": list(value)}
        else:
            out[key] = value
    return out


def state_from_dict(template: Any, data: dict[str, Any]) -> Any:
    """Rebuild a state of the same type as ``template`` from :func:`state_to_dict` output.

    Raises:
        ValueError: if ``data`` lacks a field of the state.
    """
    values = {}
    for key in template._fields:
        if key not in data:
            raise ValueError(
                f"Saved detector state of {type(template).__name__} lacks field {key!r}; "
                f"it has {sorted(data)}. Was it saved by another gradwatch version?"
            )
        value = data[key]
        if isinstance(value, dict) and "ndarray" in value:
            arr = np.array(value["ndarray"], dtype=value["dtype"])
            values[key] = arr.reshape(value["shape"])
        elif isinstance(value, dict) and "tuple" in value:
            values[key] = tuple(value["tuple"])
        else:
            values[key] = value
    return type(template)(**values)


def push(ring: np.ndarray, index: int, row: np.ndarray | float) -> tuple[np.ndarray, int]:
    """Write ``row`` at ``index`` of a ring buffer (first axis) and return it with the next index.

    The buffer is copied so that states stay immutable values.
    """
    ring = ring.copy()
    ring[index % ring.shape[0]] = row
    return ring, (index + 1) % ring.shape[0]


def ordered(ring: np.ndarray, index: int, filled: int) -> np.ndarray:
    """The ``filled`` most recent rows of a ring buffer, oldest first."""
    size = ring.shape[0]
    if filled < size:
        return ring[:filled]
    return np.concatenate([ring[index:], ring[:index]])


def median(values: np.ndarray) -> float:
    """Median of a small 1-D array (a sort is much cheaper than ``np.median`` at this size)."""
    ordered_values = np.sort(values)
    mid = ordered_values.size // 2
    if ordered_values.size % 2:
        return float(ordered_values[mid])
    return float(0.5 * (ordered_values[mid - 1] + ordered_values[mid]))


def median_of_few(values: Sequence[float]) -> float:
    """:func:`median` of a handful of finite floats (a tuple or list), in plain Python: for a few
    values cheaper than a numpy call. NaN-free input only (Python's sort does not order NaN)."""
    ordered_values = sorted(values)
    mid = len(ordered_values) // 2
    if len(ordered_values) % 2:
        return float(ordered_values[mid])
    return float(0.5 * (ordered_values[mid - 1] + ordered_values[mid]))


def ema(mean: float, var: float, value: float, alpha: float) -> tuple[float, float]:
    """One step of an exponentially weighted mean and variance (West 1979)."""
    delta = value - mean
    mean = mean + alpha * delta
    var = (1.0 - alpha) * (var + alpha * delta * delta)
    return mean, var


def check_positive(name: str, value: float, *, below: float | None = None) -> None:
    """Raise a ValueError stating the rule when a hyper-parameter is out of range."""
    if not value > 0 or (below is not None and not value < below):
        rule = f"0 < {name} < {below}" if below is not None else f"{name} > 0"
        raise ValueError(f"{name} must satisfy {rule}. Received {name}={value!r}.")

