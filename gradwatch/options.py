"""The options every adapter shares, checked the same way everywhere.

``gradwatch.watch``, the Lightning, Hugging Face and Keras callbacks take the same keyword for the
same meaning (docs/api.md has the table): ``policy``, ``every``, ``strict``, ``sinks``,
``rollback_every``, ``param_norm_every``, ``names``, ``monitor``. Each is validated here, so a
wrong value gets the same message (the rule, the value received, the fix) from every adapter, at
the call that is wrong.

>>> check_every(10)
10
>>> check_every(True)
Traceback (most recent call last):
    ...
ValueError: every must be an int >= 1 (measure every N optimizer steps). Received every=True.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from typing import Any

__all__ = [
    "check_every",
    "check_param_norm_every",
    "check_rollback_every",
    "deprecated_alias",
    "param_norm_every_from",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_every(every: Any) -> int:
    """Validate ``every``: measure every N optimizer steps.

    Args:
        every: An int >= 1 (a bool is refused: ``every=True`` is a mistake, not 1).

    Returns:
        ``every`` as an int.

    Raises:
        ValueError: for anything but an int >= 1.
    """
    if not _is_int(every) or every < 1:
        raise ValueError(f"every must be an int >= 1 (measure every N optimizer steps). Received every={every!r}.")
    return int(every)


def check_param_norm_every(param_norm_every: Any) -> int:
    """Validate ``param_norm_every``: measure parameter norms every N measured steps (0: never).

    Args:
        param_norm_every: An int >= 0.

    Returns:
        It, as an int.

    Raises:
        ValueError: for anything but an int >= 0.
    """
    if not _is_int(param_norm_every) or param_norm_every < 0:
        raise ValueError(
            "param_norm_every must be an int >= 0 (measure parameter norms every N measured steps; "
            f"0: never). Received param_norm_every={param_norm_every!r}."
        )
    return int(param_norm_every)


def check_rollback_every(rollback_every: Any) -> int | str | None:
    """Validate ``rollback_every``: healthy steps between rollback snapshots.

    Args:
        rollback_every: ``"auto"`` (snapshots under a policy that rolls back, within the memory
            budget of the adapter), None (no snapshot) or an int >= 1.

    Returns:
        It (an int, ``"auto"`` or None).

    Raises:
        ValueError: for anything else.
    """
    if rollback_every == "auto" or rollback_every is None:
        return rollback_every
    if not _is_int(rollback_every) or rollback_every < 1:
        raise ValueError(
            "rollback_every must be 'auto', None (no snapshots) or an int >= 1 (healthy steps between "
            f"snapshots). Received rollback_every={rollback_every!r}."
        )
    return int(rollback_every)


def deprecated_alias(owner: str, old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``owner(old=...)`` is now ``owner(new=...)``; the old name works for one release.

    Args:
        owner: The class or function (``"GradWatch"``).
        old: The old keyword.
        new: What to write instead (``"param_norm_every=1"``).
        stacklevel: Passed to :func:`warnings.warn`. Defaults to 3 (the caller's caller).
    """
    warnings.warn(
        f"{owner}({old}=...) is deprecated and goes away in the next release; write {owner}({new}) "
        "instead (the same keyword in every gradwatch adapter).",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def param_norm_every_from(owner: str, param_norms: Any, param_norm_every: Any) -> int:
    """Resolve the old boolean ``param_norms`` of the Lightning and Hugging Face callbacks into
    ``param_norm_every`` (True was "every measured step", False "never").

    Args:
        owner: The callback's name, for the warning.
        param_norms: The old argument (None when not given).
        param_norm_every: The new one.

    Returns:
        The validated ``param_norm_every``.

    Raises:
        TypeError: for a ``param_norms`` that is not a bool.
    """
    if param_norms is None:
        return check_param_norm_every(param_norm_every)
    if not isinstance(param_norms, bool):
        raise TypeError(f"param_norms must be True or False. Received param_norms={param_norms!r}.")
    value = 1 if param_norms else 0
    deprecated_alias(owner, "param_norms", f"param_norm_every={value}", stacklevel=4)
    return value


ROLLBACK_EVERY = 20
"""Healthy measured steps between rollback snapshots under ``rollback_every="auto"``."""
ROLLBACK_BUDGET_BYTES = 1 << 30
"""``rollback_every="auto"`` keeps snapshots only while one copy (counted as three times the
parameters: the parameters and an optimizer state of up to twice their size) fits in this."""


def resolve_rollback_every(rollback_every: int | str | None, policy: Any, parameter_bytes: int) -> int | None:
    """The snapshot period an adapter uses for a validated ``rollback_every``.

    ``"auto"``: :data:`ROLLBACK_EVERY` when ``policy`` rolls back and ``3 * parameter_bytes`` fits
    :data:`ROLLBACK_BUDGET_BYTES`; beyond the budget None, said once on the ``gradwatch`` logger
    (INFO) with the option that keeps one anyway; None under a policy that never rolls back.

    Args:
        rollback_every: The value :func:`check_rollback_every` returned.
        policy: The monitor's policy.
        parameter_bytes: Bytes of the parameters that would be copied.

    Returns:
        Healthy steps between snapshots, or None for no snapshot.

    >>> from gradwatch.policy import AutoPolicy, ObservePolicy
    >>> resolve_rollback_every("auto", AutoPolicy(), 4_000), resolve_rollback_every("auto", ObservePolicy(), 4_000)
    (20, None)
    >>> resolve_rollback_every(5, ObservePolicy(), 4_000)
    5
    """
    if rollback_every != "auto":
        return None if rollback_every is None else int(rollback_every)
    if not getattr(policy, "rollback", False):
        return None  # observe, or a policy that never rolls back: no copy, no cost
    size = 3 * int(parameter_bytes)
    if size > ROLLBACK_BUDGET_BYTES:
        logging.getLogger("gradwatch").info(
            "gradwatch keeps no rollback snapshot: one copy of the parameters and optimizer state "
            "(~%.1f GiB) is over the %.0f GiB budget. Pass rollback_every=%d to keep one anyway.",
            size / 2**30, ROLLBACK_BUDGET_BYTES / 2**30, ROLLBACK_EVERY,
        )
        return None
    return ROLLBACK_EVERY
