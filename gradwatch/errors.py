"""gradwatch's exceptions.

::

    GradwatchError                 base of every error gradwatch raises on purpose
    ├── MissingExtraError          a framework extra is not installed (also an ImportError)
    └── BadTargetError             ``gradwatch check``: a target or factory is not usable

Errors in the user's own code pass through unchanged. Inside a training loop, gradwatch's own
failures never raise unless ``strict=True``: they become one :class:`GradwatchWarning` and
monitoring stops.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class GradwatchError(Exception):
    """Base class of the errors gradwatch raises."""


class MissingExtraError(GradwatchError, ImportError):
    """A framework that an integration needs is not installed. The message names the extra."""


class BadTargetError(GradwatchError, ValueError):
    """A ``gradwatch check`` target cannot be imported or returned something unusable."""


class GradwatchWarning(UserWarning):
    """gradwatch hit a problem of its own and stopped monitoring; training goes on."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install.

    Args:
        module: The module to import (``"torch"``).
        extra: The gradwatch extra that provides it (``"torch"``).

    Returns:
        The module.

    Raises:
        MissingExtraError: if the import fails.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"This part of gradwatch needs {module!r}, which is not installed ({exc}). "
            f"Install it with: pip install 'gradwatch[{extra}]'"
        ) from exc
