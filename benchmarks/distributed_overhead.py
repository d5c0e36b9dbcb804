"""What ``gradwatch.watch`` costs a DDP training step (2 gloo ranks on the CPU), as a ratio to the
same loop unwatched.

Each rank trains three DDP copies of the same MLP on its own batch, taking turns one step each
(so a noisy neighbour slows them all alike): ``unwatched``, ``distributed`` (``gradwatch.watch``:
the statistics reduced across the ranks in one extra ``all_reduce`` per step) and ``local``
(``distributed=False``: each rank measures alone, as a single process would). Per block of 10
rounds each variant's time is divided by the unwatched one's; the median ratio over the blocks is
reported by rank 0.

Run::

    python benchmarks/distributed_overhead.py            # 6x512 MLP, batch 128 per rank, Adam
    python benchmarks/distributed_overhead.py --width 256 --blocks 5

This is a benchmark, not a test: the last result, with the machine, is in docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradwatch


def _mlp(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def _rank(rank: int, world: int, port: int, args: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, 64, generator=g), torch.randn(args.batch, 1, generator=g)
    variants: dict[str, Any] = {}
    for name in ("unwatched", "distributed", "local"):
        model = nn.parallel.DistributedDataParallel(_mlp(args.width, args.depth))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        w = None
        if name != "unwatched":
            w = gradwatch.watch(model, opt, distributed=(name == "distributed"))
        variants[name] = (model, opt, w)

    def step(name: str) -> float:
        model, opt, w = variants[name]
        start = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if w is not None:
            w.record_loss(loss)
        opt.step()
        return time.perf_counter() - start

    for name in variants:  # warm-up
        for _ in range(3):
            step(name)
    ratios: dict[str, list[float]] = {"distributed": [], "local": []}
    for _ in range(args.blocks):
        totals = dict.fromkeys(variants, 0.0)
        for _ in range(10):
            for name in variants:
                totals[name] += step(name)
        for name in ratios:
            ratios[name].append(totals[name] / totals["unwatched"])
    if rank == 0:
        print(json.dumps({
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
            "torch": torch.__version__, "ranks": world, "backend": "gloo", "threads_per_rank": 1,
            "model": f"MLP {args.depth}x{args.width}", "batch_per_rank": args.batch,
            "step_ms_unwatched": round(1000 * totals["unwatched"] / 10, 2),
            "ratio_distributed": round(statistics.median(ratios["distributed"]), 3),
            "ratio_local": round(statistics.median(ratios["local"]), 3),
        }))
    for _, _, w in variants.values():
        if w is not None:
            w.remove()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=7)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
