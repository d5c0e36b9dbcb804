"""Where gradwatch's numbers go: JSON Lines, Python logging, TensorBoard, W&B, or your own plugin.

Run: python examples/sinks.py [OUT_DIR]   (CPU, seconds; writes into OUT_DIR or a temp dir)
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import gradwatch
from gradwatch.sinks import JsonlSink, LoggingSink, read_jsonl


class CountingSink:
    """A third-party sink is a plain pluggy plugin: implement the hooks you need."""

    def __init__(self) -> None:
        self.steps = 0
        self.kinds: list[str] = []

    @gradwatch.hookimpl
    def gradwatch_on_step(self, stats, decision, monitor):
        self.steps += 1

    @gradwatch.hookimpl
    def gradwatch_on_finding(self, finding, monitor):
        self.kinds.append(finding.kind)


def train(out: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = x[:, :1] * 2 + x[:, 1:2] ** 2 - 1
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    watch = gradwatch.watch(model, optimizer)

    # Sinks built on gradwatch.sinks.Sink attach to one run's monitor and ignore any other.
    sinks = [JsonlSink(out / "run.jsonl", every=10), LoggingSink()]
    try:
        from gradwatch.sinks import TensorBoardSink

        sinks.append(TensorBoardSink(out / "tensorboard"))
    except ImportError:
        print("tensorboard not installed: no TensorBoard sink")
    for sink in sinks:
        sink.attach(watch.monitor)
    # A plain plugin registers with the monitor's plugin manager (and then sees every monitor
    # that uses that manager).
    counting = CountingSink()
    watch.monitor.hooks.manager.register(counting)

    for _ in range(120):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        watch.record_loss(loss)
        optimizer.step()
    watch.remove()  # hands the final report to every sink
    for sink in sinks:
        sink.detach()
    watch.monitor.hooks.manager.unregister(counting)

    records = read_jsonl(out / "run.jsonl")
    print(f"{out / 'run.jsonl'}: {len(records)} records:",
          {e: sum(r['event'] == e for r in records) for e in ("step", "finding", "action", "report")})
    print(f"CountingSink saw {counting.steps} steps and findings {counting.kinds}")
    if (out / "tensorboard").exists():
        print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(sys.argv) > 1:
        out = Path(sys.argv[1])
        out.mkdir(parents=True, exist_ok=True)
        train(out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            train(Path(tmp))


if __name__ == "__main__":
    main()
