"""Run scenario functions on N gloo ranks (spawned once) and collect their JSON results.

A scenario is a function ``(rank, world) -> dict`` in a module the children can import; each
rank's result (plus the warnings it raised and what it printed) is written to
``outdir/<scenario>.<rank>.json``. The parent waits with a hard timeout: a deadlock fails the
test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import json
import os
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30
"""A collective that waits longer than this raises on its rank (a deadlock becomes an error)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, module: str, names: list[str], outdir: str, backend: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GRADWATCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    scenarios = importlib.import_module(module)
    try:
        for name in names:
            out: dict[str, Any]
            printed = io.StringIO()
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
                warnings.simplefilter("always")
                try:
                    out = {"result": getattr(scenarios, name)(rank, world)}
                except Exception:
                    out = {"error": traceback.format_exc()}
            out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
            out["stdout"] = printed.getvalue()
            Path(outdir, f"{name}.{rank}.json").write_text(json.dumps(out))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_scenarios(
    module: str, names: list[str], outdir: Path, *, world: int = 2, timeout_s: float = 120, backend: str = "gloo"
) -> dict[str, list[dict[str, Any]]]:
    """Run ``names`` from ``module`` on ``world`` ranks; return per scenario the ranks' outputs.

    A rank that dies on its way out, after every rank wrote every result (gloo's threads can abort
    the process at teardown: "terminate called without an active exception"), does not void the
    results. A rank that dies before that is retried once on a fresh port (the port picked free can
    be taken before the store binds it), then fails the test.

    Raises:
        TimeoutError: when the ranks have not finished within ``timeout_s`` (they are killed).
        torch.multiprocessing.ProcessExitedException: when a rank died before writing its results,
            twice.
    """
    for attempt in (1, 2):
        for stale in Path(outdir).glob("*.json"):
            stale.unlink()
        try:
            _spawn_and_wait(module, names, outdir, world, timeout_s, backend)
        except mp.ProcessExitedException:
            if not _complete(names, outdir, world):
                if attempt == 2:
                    raise
                continue
        break
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        results[name] = [json.loads(Path(outdir, f"{name}.{r}.json").read_text()) for r in range(world)]
    return results


def _complete(names: list[str], outdir: Path, world: int) -> bool:
    return all(Path(outdir, f"{name}.{r}.json").exists() for name in names for r in range(world))


def _spawn_and_wait(module: str, names: list[str], outdir: Path, world: int, timeout_s: float, backend: str) -> None:
    ctx = mp.start_processes(
        _child, args=(world, free_port(), module, names, str(outdir), backend), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"the {world} ranks did not finish {names} within {timeout_s} s (deadlock?)")


def result(outputs: list[dict[str, Any]], rank: int) -> Any:
    """One rank's result of a scenario; a scenario that raised fails with its traceback."""
    out = outputs[rank]
    assert "error" not in out, f"rank {rank} raised:\n{out['error']}"
    return out["result"]
