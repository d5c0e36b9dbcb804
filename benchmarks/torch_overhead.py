"""What ``gradwatch.watch`` costs a PyTorch training step, as a ratio to the same loop unwatched.

Every variant trains its own copy of the same model on the same batch. The variants take turns,
one step each (so a noisy neighbour slows them all alike); per block of 10 rounds each variant's
time is divided by the unwatched one's, and the median ratio over the blocks is reported. Variants:

* ``unwatched``: the plain loop.
* ``gradwatch every=1`` / ``every=10``: ``gradwatch.watch(model, opt)`` (policy ``auto``).
* ``per-param .item()``: the obvious hand-written monitor, ``p.grad.norm().item()`` for every
  parameter before each step (one host sync per tensor, no judgement at all).

Run::

    python benchmarks/torch_overhead.py                 # both models, 1 thread
    python benchmarks/torch_overhead.py --model mlp --repeats 11 --steps 30 --threads 1

This is a benchmark, not a test: the last result, with the machine, is in docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
from typing import Any

import torch
from torch import nn

import gradwatch


def mlp(width: int = 512, depth: int = 6, d_in: int = 512, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def small_cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, classes),
    )


class TokenTransformer(nn.Module):
    """A 12-layer transformer encoder over 16 tokens (147 parameter tensors)."""

    def __init__(self, layers: int = 12, d: int = 64, vocab: int = 100, tokens: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d * tokens, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).flatten(1))


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(torch.relu(self.norm(x)))


def many_tensors(blocks: int = 125, width: int = 64, d_in: int = 64, classes: int = 10) -> nn.Module:
    """A pre-norm residual MLP of ``blocks`` blocks (LayerNorm + Linear: 4 tensors each)."""
    layers: list[nn.Module] = [Residual(width) for _ in range(blocks)]
    return nn.Sequential(*layers[:-1], nn.Linear(d_in, classes))


MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"build": mlp, "input": (128, 512), "label": "MLP 6x512, batch 128, Adam"},
    "cnn": {"build": small_cnn, "input": (64, 3, 32, 32), "label": "CNN 3 conv+BN, 32x32, batch 64, Adam"},
    "transformer": {"build": TokenTransformer, "input": (32, 16), "tokens": 100,
                    "label": "Transformer 12 layers, d=64, 147 tensors, batch 32x16, Adam"},
    "many": {"build": many_tensors, "input": (64, 64),
             "label": "Residual MLP 124 blocks x64, 498 tensors, batch 64, Adam"},
}


def batch(spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's one batch: token ids for a transformer, Gaussian inputs otherwise."""
    shape = spec["input"]
    x = torch.randint(0, spec["tokens"], shape) if "tokens" in spec else torch.randn(*shape)
    return x, torch.randint(0, 10, (shape[0],))


class Variant:
    """One copy of the model and its optimizer, and what runs around its step."""

    def __init__(self, name: str, model: nn.Module, kind: str, every: int = 1) -> None:
        self.name = name
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.kind = kind
        self.watch = gradwatch.watch(model, self.opt, every=every) if kind == "gradwatch" else None
        self.block_times: list[float] = []
        self.sink = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        if self.watch is not None:
            self.watch.record_loss(loss)
        if self.kind == "item":
            for p in self.model.parameters():
                if p.grad is not None:
                    self.sink += p.grad.norm().item()
        self.opt.step()


def bench(model_name: str, repeats: int, steps: int, warmup: int, clock: Any = time.process_time) -> list[dict[str, Any]]:
    """Round-robin: one step of each variant in turn (rotating who goes first), so that the
    machine's drift hits all variants alike. Steps are grouped in blocks of ``steps`` rounds (a
    whole number of ``every=10`` cycles); per block, each variant's time is divided by the
    unwatched one's, and the median over the ``repeats`` blocks is reported."""
    spec = MODELS[model_name]
    torch.manual_seed(0)
    base = spec["build"]()
    x, y = batch(spec)
    variants = [
        Variant("unwatched", copy.deepcopy(base), "plain"),
        Variant("gradwatch every=1", copy.deepcopy(base), "gradwatch", every=1),
        Variant("gradwatch every=10", copy.deepcopy(base), "gradwatch", every=10),
        Variant("per-param .item()", copy.deepcopy(base), "item"),
    ]
    for _ in range(warmup):
        for v in variants:
            v.step(x, y)
    n = len(variants)
    for _ in range(repeats):
        totals = [0.0] * n
        for r in range(steps):
            for j in range(n):
                k = (r + j) % n
                start = clock()
                variants[k].step(x, y)
                totals[k] += clock() - start
        for v, total in zip(variants, totals):
            v.block_times.append(total / steps)
    reference = variants[0].block_times
    rows = []
    for v in variants:
        ratios = [t / ref for t, ref in zip(v.block_times, reference)]
        row = {
            "model": spec["label"], "variant": v.name, "step_ms": statistics.median(v.block_times) * 1e3,
            "ratio": statistics.median(ratios), "overhead_pct": (statistics.median(ratios) - 1.0) * 100,
        }
        if v.watch is not None:
            report = v.watch.report()
            assert report.healthy and not report.actions, report.summary()
            row["steps_measured"] = report.steps_measured
            v.watch.remove()
        rows.append(row)
    return rows


def breakdown(model_name: str, steps: int = 200, warmup: int = 10) -> dict[str, float]:
    """Where gradwatch's time goes inside real training steps (every=1): medians in microseconds
    of the whole pre-hook, of ``measure`` (reductions, transfer, StepStats), of
    ``Monitor.observe`` (detectors and policy), and of one bare ``_foreach_norm`` of all gradients
    with its transfer (the floor: one read of the gradients)."""
    import gradwatch.integrations.torch.driver as adapter

    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = spec["build"]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = batch(spec)
    times: dict[str, list[float]] = {"pre_hook": [], "measure": [], "observe": [], "snapshots": [],
                                     "floor": []}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name].append(time.perf_counter() - start)
            return out
        return wrapper

    params = list(model.parameters())
    def floor(*args: Any) -> None:
        torch.stack(torch._foreach_norm([p.grad for p in params])).cpu()

    opt.register_step_pre_hook(timed("floor", floor))
    w = gradwatch.watch(model, opt)
    w.monitor.observe = timed("observe", w.monitor.observe)  # type: ignore[method-assign]
    w._pre_step = timed("pre_hook", w._pre_step)  # type: ignore[method-assign]
    w.driver.rollbacks.after = timed("snapshots", w.driver.rollbacks.after)  # type: ignore[method-assign]
    original_measure = adapter.measure
    adapter.measure = timed("measure", original_measure)
    try:
        for t in range(steps + warmup):
            if t == warmup:
                for v in times.values():
                    v.clear()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            w.record_loss(loss)
            opt.step()
    finally:
        adapter.measure = original_measure
        w.remove()
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def machine() -> dict[str, str]:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    except OSError:  # pragma: no cover
        model = ""
    return {
        "cpu": model or platform.processor(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": str(torch.get_num_threads()), "gradwatch": gradwatch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=30, help="blocks; the median ratio over blocks is kept")
    parser.add_argument("--steps", type=int, default=10, help="round-robin rounds per block (a multiple of 10)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true",
                        help="time with the wall clock instead of the process CPU time (CPU time is robust "
                        "to other processes on a shared machine; use --wall on a quiet one or a GPU)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the parts of gradwatch's pre-hook inside real steps")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(MODELS) if args.model == "all" else [args.model]
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += bench(name, args.repeats, args.steps, args.warmup,
                      clock=time.perf_counter if args.wall else time.process_time)
    info = machine()
    info["clock"] = "wall" if args.wall else "process CPU time"
    parts = {name: breakdown(name) for name in names} if args.breakdown else {}
    if args.json:
        print(json.dumps({"machine": info, "rows": rows, "breakdown_us": parts}, indent=2))
        return 0
    print(f"machine: {info}")
    print(f"{'model':<38} {'variant':<20} {'ms/step':>8} {'ratio':>7} {'overhead':>9}")
    for row in rows:
        print(f"{row['model']:<38} {row['variant']:<20} {row['step_ms']:>8.2f} {row['ratio']:>7.3f} "
              f"{row['overhead_pct']:>8.1f}%")
    for name, part in parts.items():
        print(f"{MODELS[name]['label']}: median us per step (wall) - "
              + ", ".join(f"{k} {v:.0f}" for k, v in part.items()))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
