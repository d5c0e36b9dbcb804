"""Running many seeds: one runner per process, each PyTorch process on one thread.

Kept apart from ``__main__`` because ``multiprocessing`` (spawn) must import the worker functions
by module name in every child process.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from typing import Any

from .evaluate import ZooOutcome, error_outcome, evaluate
from .sampler import sample

FRAMEWORKS = ("torch", "keras")


class Unsupported(NotImplementedError):
    """Raised by a runner for a spec it cannot train faithfully (the message says why): the seed
    is recorded as ``dropped`` with reason ``"unsupported by <framework>: <why>"``, not as an error."""


def make_runner(framework: str) -> Any:
    if framework == "torch":
        from .torch_runner import TorchRunner, setup_worker

        setup_worker()
        return TorchRunner()
    if framework == "keras":  # the backend is KERAS_BACKEND's
        from .keras_runner import KerasRunner
        from .keras_runner import setup_worker as setup_keras_worker

        setup_keras_worker()
        return KerasRunner()
    raise ValueError(f"Unknown framework {framework!r}; known: {FRAMEWORKS}.")


_RUNNER: Any = None
_INIT_ERROR: BaseException | None = None


def _init_worker(framework: str) -> None:
    # An initializer that raises makes the pool respawn workers forever: keep the error and
    # report it on every seed instead.
    global _RUNNER, _INIT_ERROR
    try:
        _RUNNER = make_runner(framework)
    except Exception as exc:
        _INIT_ERROR = exc


def run_seed(seed: int, framework: str = "torch", max_steps: int | None = None, runner: Any = None) -> dict[str, Any]:
    """Evaluate one seed; an exception becomes an ``error`` outcome. Returns ``ZooOutcome.to_dict()``."""
    spec = sample(seed)
    if max_steps is not None and spec.steps > max_steps:
        spec = spec.with_steps(max_steps)
    start = time.perf_counter()
    try:
        if _INIT_ERROR is not None:
            raise RuntimeError(f"the worker could not start its {framework} runner: {_INIT_ERROR!r}")
        runner = runner or _RUNNER or make_runner(framework)
        return evaluate(spec, runner).to_dict()
    except Unsupported as exc:  # refused by the runner, with its reason: dropped, never an error
        out = error_outcome(spec, getattr(runner, "framework", framework), exc, time.perf_counter() - start)
        out.status, out.reason = "dropped", f"unsupported by {framework}: {exc}"
        return out.to_dict()
    except Exception as exc:  # one broken run must not hide the others' results
        return error_outcome(spec, framework, exc, time.perf_counter() - start).to_dict()


def _progress(o: ZooOutcome, done: int, total: int) -> None:
    if not o.kept:
        verdict = o.status.upper()
    elif o.healthy:
        verdict = "FALSE ALARM" if o.false_alarms else "ok"
    else:
        verdict = ("found" if o.detected else "MISSED") + ("" if o.rescued is None else f", rescued={o.rescued}")
    print(f"  [{done}/{total}] {verdict:<12} {o.seconds:5.1f}s {o.line}", file=sys.stderr, flush=True)


def run_zoo(seeds: list[int], framework: str = "torch", workers: int = 1, max_steps: int | None = None,
            progress: bool = True) -> list[ZooOutcome]:
    """Evaluate every seed (in ``workers`` processes, one thread each). Returns outcomes by seed."""
    results: list[ZooOutcome] = []
    if workers <= 1:
        runner = make_runner(framework)
        for seed in seeds:
            o = ZooOutcome.from_dict(run_seed(seed, framework, max_steps, runner))
            results.append(o)
            if progress:
                _progress(o, len(results), len(seeds))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(framework,)) as pool:
            jobs = [(seed, framework, max_steps) for seed in seeds]
            for d in pool.imap_unordered(_star, jobs):
                o = ZooOutcome.from_dict(d)
                results.append(o)
                if progress:
                    _progress(o, len(results), len(seeds))
    return sorted(results, key=lambda o: o.seed)


def _star(args: tuple[int, str, int | None]) -> dict[str, Any]:
    return run_seed(*args)


__all__ = ["FRAMEWORKS", "Unsupported", "make_runner", "run_seed", "run_zoo"]
