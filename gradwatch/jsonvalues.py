"""One JSON convention for numbers wherever gradwatch writes JSON (reports, sink lines, step
records, saved states): NaN is ``null``, infinities are the strings ``"inf"`` and ``"-inf"``, so
every file gradwatch writes is strict JSON (``allow_nan=False``) and reads back to the same values.

>>> to_json({"norm": float("inf"), "loss": float("nan"), "steps": (1, 2)})
{'norm': 'inf', 'loss': None, 'steps': [1, 2]}
>>> [number_from_json(v) for v in ("inf", "-inf", 2)]
[inf, -inf, 2.0]
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["number_from_json", "to_json"]


def to_json(value: Any) -> Any:
    """A value made JSON-safe: non-finite floats as above, numpy scalars as Python numbers,
    tuples as lists, dict keys as strings (recursively).

    Args:
        value: A number, string, list, tuple, dict or numpy scalar.

    Returns:
        The value, safe for ``json.dumps(..., allow_nan=False)``.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return to_json(value.item())
    return value


def number_from_json(value: Any) -> float:
    """A number read back from JSON written by :func:`to_json`: None is NaN, ``"inf"`` is inf.

    Args:
        value: None, a number, or ``"inf"`` / ``"-inf"`` / ``"nan"``.

    Returns:
        The float.
    """
    if value is None:
        return math.nan
    return float(value)
