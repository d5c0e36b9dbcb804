"""The fail-safe every adapter runs gradwatch under: its own errors never break training.

An error raised inside gradwatch (a measurement, a detector, a plugin, a remedy) becomes one
warning, monitoring stops, and training goes on exactly as it would unwatched — unless the user
asked for ``strict=True``, in which case it is raised. Every adapter (``gradwatch.watch``, the
Lightning, Hugging Face and Keras callbacks) wraps its work in one :class:`FailSafe`, so all four
behave alike: the same message, the same single warning, the same cleanup when it stops.

Bad *input* is not gradwatch's own error: a wrong argument raises at once, at the call that is
wrong (a ``TypeError`` or ``ValueError`` naming the rule, the value and the fix), whatever
``strict`` says.

Example:
    >>> import warnings
    >>> safe = FailSafe(owner="gradwatch.watch")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     safe.guard(lambda: 1 / 0)
    ...     safe.guard(lambda: 1 / 0)  # stopped: not run, no second warning
    >>> safe.active, len(caught), type(safe.error).__name__
    (False, 1, 'ZeroDivisionError')
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from gradwatch.errors import GradwatchWarning

__all__ = ["FailSafe"]

T = TypeVar("T")


class FailSafe:
    """Run gradwatch's work so that its own errors stop monitoring instead of training.

    Args:
        strict: Raise gradwatch's own errors (monitoring stops all the same). Defaults to False.
        owner: How the user created the adapter, for the message (``"gradwatch.watch"``,
            ``"GradWatch"``). Defaults to ``"gradwatch"``.
        warn: How to warn, given the message (Lightning's ``rank_zero_warn``, or a function that
            warns on the main process only). Defaults to ``warnings.warn`` with
            :class:`gradwatch.GradwatchWarning`.
        stop_together: For adapters whose ranks must stop at the same step (DDP, FSDP): called
            with the error; returns True when monitoring stopped now on every rank (and the ranks
            already warned), False when the stop is deferred to the next collective (monitoring
            goes on until then). Defaults to None (stop at once).

    Attributes:
        active: False once monitoring stopped.
        error: The first error met, or None.
    """

    def __init__(
        self,
        *,
        strict: bool = False,
        owner: str = "gradwatch",
        warn: Callable[[str], None] | None = None,
        stop_together: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self.strict = bool(strict)
        self.owner = owner
        self.active = True
        self.error: BaseException | None = None
        self._warn = warn
        self._stop_together = stop_together
        self._on_stop: list[Callable[[], Any]] = []

    def on_stop(self, cleanup: Callable[[], Any]) -> None:
        """Run ``cleanup`` when monitoring stops (give clipping back to the trainer, drop a
        pending loss...). A cleanup's own error is swallowed: the run goes on regardless.

        Args:
            cleanup: A function of no arguments.
        """
        self._on_stop.append(cleanup)

    def guard(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Call ``fn`` unless monitoring stopped; an error inside it goes to :meth:`fail`.

        Args:
            fn: gradwatch's work.
            *args: Its positional arguments.
            **kwargs: Its keyword arguments.

        Returns:
            What ``fn`` returned, or None when it raised or monitoring had stopped.

        Raises:
            Exception: ``fn``'s error, with ``strict=True``.
        """
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.fail(exc)
            return None

    def fail(self, exc: BaseException) -> None:
        """gradwatch failed: warn once and stop (or raise, with ``strict=True``).

        Args:
            exc: The error.

        Raises:
            BaseException: ``exc`` itself, with ``strict=True`` (after monitoring stopped).
        """
        first = self.error is None
        if first:
            self.error = exc
        if self.strict:
            self.stop()
            raise exc
        if not self.active:
            return
        if self._stop_together is not None:
            if not self._stop_together(exc):
                return  # the ranks stop together at the next collective; until then, go on
        elif first:
            self._announce(exc)
        self.stop()

    def refuse(self, message: str, error: type[Exception] = TypeError) -> None:
        """The run turned out to be one gradwatch cannot watch (seen only once training runs, such
        as ``optimizer.step(closure)``): say why, once, and stop; with ``strict=True`` raise
        ``error(message)`` instead.

        Args:
            message: The rule, what was seen and the fix.
            error: The exception type for ``strict=True``. Defaults to TypeError.

        Raises:
            Exception: ``error(message)``, with ``strict=True``.
        """
        if not self.active:
            return
        self.error = self.error or error(message)
        self.stop()
        if self.strict:
            raise error(message)
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(GradwatchWarning(message), stacklevel=4)

    def stop(self) -> None:
        """Stop monitoring now, without a warning (the ranks already warned; training ended)."""
        if not self.active:
            return
        self.active = False
        for cleanup in self._on_stop:
            with contextlib.suppress(Exception):  # never break training on the way out
                cleanup()

    def _announce(self, exc: BaseException) -> None:
        message = (
            f"gradwatch hit an internal error and stopped monitoring; training goes on unchanged: "
            f"{type(exc).__name__}: {exc}. Pass {self.owner}(strict=True) to raise instead."
        )
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(GradwatchWarning(message), stacklevel=4)
