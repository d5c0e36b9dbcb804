"""The training loops of a gradient check, one per kind of setup, and the progress display.

Each loop runs the setup's own model, optimizer and data for ``steps`` optimizer steps, watched
under ``policy="observe"`` with ``strict=True``: the check must not change what it measures, and
an internal error in gradwatch must fail the check loudly rather than pass it with an empty report.
No framework is imported here: the objects come from the factory, which imported it, and the
adapters are reached through ``gradwatch.watch`` / ``gradwatch.GradWatch``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from gradwatch.check.spec import CheckSpec
from gradwatch.errors import BadTargetError, GradwatchError
from gradwatch.monitor import Monitor
from gradwatch.report import Report

ProgressFn = Callable[[int, int], None]


class Progress:
    """Progress of a check: a bar redrawn in place on a terminal, a plain line every tenth of the
    run elsewhere (CI logs do not handle carriage returns).

    Args:
        label: Text before the progress. Defaults to ``"gradwatch check"``.
        stream: Where to write. Defaults to ``sys.stderr``.
        tty: Draw a bar. Defaults to None (``stream.isatty()``).
    """

    def __init__(self, label: str = "gradwatch check", *, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 30
            filled = int(width * done / max(total, 1))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps  {elapsed:5.1f}s")
            self._drawn = True
        elif done == total or done % max(1, total // 10) == 0:
            self.stream.write(f"{self.label}: step {done}/{total} ({elapsed:.1f}s)\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (a no-op for plain lines)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _batches(batches: Any, steps: int) -> Iterator[Any]:
    """Up to ``steps`` items, iterating a re-iterable (list, DataLoader) again when it ends."""
    produced = 0
    while produced < steps:
        iterator = iter(batches)
        restartable = iterator is not batches
        epoch = 0
        for item in itertools.islice(iterator, steps - produced):
            epoch += 1
            yield item
        produced += epoch
        if not restartable or epoch == 0:
            return


def _to_device(value: Any, device: str) -> Any:
    if hasattr(value, "to") and callable(value.to):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _forward(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def run_torch(spec: CheckSpec, *, steps: int, device: str | None, progress: ProgressFn | None, origin: str) -> Report:
    """The PyTorch loop: ``zero_grad``, forward, ``loss.backward()``, ``optimizer.step()``."""
    import gradwatch

    model, optimizer = spec.model, spec.optimizer
    if device:
        try:
            model.to(device)
        except Exception as exc:
            raise BadTargetError(f"Cannot move the model to device {device!r}: {type(exc).__name__}: {exc}") from exc
    model.train()
    watch = gradwatch.watch(model, optimizer, policy="observe", strict=True)
    done = 0
    try:
        for batch in _batches(spec.batches, steps):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise BadTargetError(
                    f"The batches of {origin} must be (inputs, targets) pairs; batch {done} is "
                    f"a {type(batch).__name__}{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}."
                )
            inputs, targets = batch
            if device:
                inputs, targets = _to_device(inputs, device), _to_device(targets, device)
            try:
                optimizer.zero_grad()
                loss = spec.loss_fn(_forward(model, inputs), targets)
                loss.backward()
            except GradwatchError:
                raise
            except Exception as exc:
                raise BadTargetError(
                    f"Step {done} of the setup from {origin} raised {type(exc).__name__}: {exc}\n"
                    "The check runs loss_fn(model(inputs), targets).backward() on each (inputs, targets) "
                    "batch: the model, loss_fn and batches must fit together."
                ) from exc
            watch.record_loss(loss)
            optimizer.step()
            done += 1
            if progress is not None:
                progress(done, steps)
        report = watch.report()
    finally:
        watch.remove()
    if done == 0:
        raise BadTargetError(f"The batches of {origin} yielded no batch; give at least one (inputs, targets).")
    return report


def _num_samples(x: Any) -> int | None:
    if isinstance(x, dict):
        x = next(iter(x.values()), None)
    elif isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape"):
        x = x[0]
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) and shape[0] is not None:
        return int(shape[0])
    try:
        return len(x)
    except TypeError:
        return None


def _keras_stopper(keras: Any, steps: int, progress: ProgressFn | None) -> Any:
    class StopAfterSteps(keras.callbacks.Callback):
        """Stops ``fit`` after ``steps`` batches (Keras checks ``stop_training`` after each)."""

        def __init__(self) -> None:
            super().__init__()
            self.done = 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.done += 1
            if progress is not None:
                progress(min(self.done, steps), steps)
            if self.done >= steps:
                self.model.stop_training = True

    return StopAfterSteps()


def run_keras(spec: CheckSpec, *, steps: int, device: str | None, progress: ProgressFn | None, origin: str) -> Report:
    """The Keras loop: ``model.fit`` with the ``GradWatch`` callback, stopped after ``steps`` batches."""
    from gradwatch import GradWatch

    keras = sys.modules.get("keras")
    if keras is None:  # a tf.keras model: Keras 3 is what the adapter supports
        raise BadTargetError(f"{origin} returned a tf.keras (Keras 2) model; gradwatch supports Keras 3 models.")
    callback = GradWatch(policy="observe", strict=True)
    stopper = _keras_stopper(keras, steps, progress)
    kwargs: dict[str, Any] = {"callbacks": [callback, stopper], "verbose": 0}
    args: tuple[Any, ...]
    arrays = spec.y is not None or hasattr(spec.x, "shape") or isinstance(spec.x, (dict, list, tuple))
    if arrays:
        n = _num_samples(spec.x)
        batch_size = spec.batch_size or 32
        kwargs["batch_size"] = batch_size
        per_epoch = math.ceil(n / batch_size) if n else 1
        kwargs["epochs"] = max(1, math.ceil(steps / per_epoch))
        args = (spec.x, spec.y)
    else:
        try:
            per_epoch = len(spec.x)
        except TypeError:  # endless or unknown length (a generator, a repeated tf.data)
            kwargs.update(epochs=1, steps_per_epoch=steps)
        else:
            kwargs["epochs"] = max(1, math.ceil(steps / max(per_epoch, 1)))
        kwargs["shuffle"] = False  # a dataset or generator comes shuffled, or not, as its author wants
        args = (spec.x,)
    context = keras.device(device) if device else contextlib.nullcontext()
    try:
        with context:
            spec.model.fit(*args, **kwargs)
    except GradwatchError:
        raise
    except Exception as exc:
        raise BadTargetError(
            f"model.fit on the setup from {origin} raised {type(exc).__name__}: {exc}"
        ) from exc
    if stopper.done == 0:
        raise BadTargetError(f"The data of {origin} yielded no batch.")
    return callback.report()


def run_stats(spec: CheckSpec, *, steps: int, progress: ProgressFn | None, origin: str) -> Report:
    """Judge a stream of StepStats as it comes."""
    monitor = Monitor(policy="observe")
    done = 0
    for stats in itertools.islice(spec.stats or (), steps):
        try:
            monitor.observe(stats)
        except TypeError as exc:
            raise BadTargetError(f"The stats stream of {origin} yielded {type(stats).__name__}; expected gradwatch.StepStats.") from exc
        done += 1
        if progress is not None:
            progress(done, steps)
    if done == 0:
        raise BadTargetError(f"The stats stream of {origin} yielded nothing.")
    return monitor.report()


def run_spec(spec: CheckSpec, *, steps: int, device: str | None = None, progress: ProgressFn | None = None,
             origin: str = "the factory") -> Report:
    """Run the loop that fits the spec's framework.

    Args:
        spec: A validated spec (see :func:`gradwatch.check.as_spec`).
        steps: Optimizer steps.
        device: Device to train on. Defaults to None (as the factory left it).
        progress: ``progress(done, total)`` after each step. Defaults to None.
        origin: Who made the spec, for error messages. Defaults to ``"the factory"``.

    Returns:
        The report.

    Raises:
        BadTargetError: when the setup fails in its loop.
    """
    framework = spec.framework
    if framework == "torch":
        return run_torch(spec, steps=steps, device=device, progress=progress, origin=origin)
    if framework == "keras":
        return run_keras(spec, steps=steps, device=device, progress=progress, origin=origin)
    return run_stats(spec, steps=steps, progress=progress, origin=origin)
