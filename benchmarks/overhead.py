"""Overhead benchmark: what watching the gradients costs per training step, against the same loop
unwatched and against what people use today for the same information.

PyTorch methods, each timed on the same model in the same process (CPU, one thread):

* ``unwatched``: the plain loop (zero_grad, forward, backward, step);
* ``floor``: one read of the gradients, ``torch._foreach_norm`` of every gradient and one host
  transfer: the least any per-tensor gradient statistic can cost;
* ``gradwatch``: ``gradwatch.watch(model, opt)`` (default ``auto`` policy, ``record_loss`` each step);
* ``gradwatch-every10``: the same measuring every 10th step;
* ``item-loop``: ``{name: p.grad.norm().item()}`` over the parameters, the hand-written way;
* ``lightning``: Lightning's ``grad_norm(module, 2)`` as called in ``on_before_optimizer_step``, with
  the values turned into floats as a logger does;
* ``wandb``: ``wandb.watch(model, log="gradients", log_freq=1)`` in offline mode plus one
  ``wandb.log`` per step (which commits the histograms); when wandb is installed.

Keras (``KERAS_BACKEND=tensorflow``): ``model.fit`` unwatched, with ``GradWatch()``, and with a
callback that computes the gradient norms on a side batch with ``tf.GradientTape`` after every
batch (a callback never sees the training batch, so that is how it is done without gradwatch).

Each round times a block of steps of every method, the order rotated from round to round; each
step is timed alone and a block is summarised by its median step (a neighbour's burst on a shared
CPU then skews no block). The ratio to ``unwatched`` is taken within the round and the median over
rounds is reported, with the median milliseconds per step. Keras is timed per ``fit`` epoch.
Two scaling studies use MLPs: the number of parameter tensors at a fixed parameter count, and the
parameter count at a fixed number of tensors.

Usage (from the repository root)::

    python -m benchmarks.overhead [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch

Hook = Callable[[torch.Tensor], None]
Model = tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], Callable[..., torch.Tensor]]


def mlp(width: int, depth: int, batch: int = 128, d_in: int = 256) -> Model:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 10))
    x = torch.randn(batch, d_in)
    return nn.Sequential(*layers), (x, torch.randint(0, 10, (batch,))), F.cross_entropy


def cnn(channels: int = 32, batch: int = 32) -> Model:
    torch.manual_seed(0)
    c = channels
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10),
    )
    return model, (torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))), F.cross_entropy


class Transformer(nn.Module):
    def __init__(self, d: int, layers: int, vocab: int = 1000, length: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, length, d))
        block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(t) + self.pos))


def transformer(d: int = 128, layers: int = 4, batch: int = 16) -> Model:
    torch.manual_seed(0)
    t = torch.randint(0, 1000, (batch, 64))

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return Transformer(d, layers), (t, t.roll(-1, 1)), loss


# -- the methods ------------------------------------------------------------------------------


@contextlib.contextmanager
def attach(method: str, model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Hook]:
    """Set up ``method`` on ``model``; yield the hook called after backward; tear it down."""
    params = [p for p in model.parameters() if p.requires_grad]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if method == "unwatched":
        yield lambda loss: None
    elif method == "floor":
        def floor(loss: torch.Tensor) -> None:
            torch.stack(torch._foreach_norm([p.grad for p in params])).cpu()  # type: ignore[misc]

        yield floor
    elif method in ("gradwatch", "gradwatch-every10"):
        w = gradwatch.watch(model, opt, every=10 if method.endswith("10") else 1)
        try:
            yield w.record_loss
        finally:
            w.remove()
    elif method == "item-loop":
        def item_loop(loss: torch.Tensor) -> None:
            {n: p.grad.norm().item() for n, p in named if p.grad is not None}

        yield item_loop
    elif method == "lightning":
        from lightning.pytorch.utilities import grad_norm

        def lightning(loss: torch.Tensor) -> None:
            {k: float(v) for k, v in grad_norm(model, norm_type=2).items()}

        yield lightning
    elif method == "wandb":
        import wandb

        with tempfile.TemporaryDirectory() as tmp:
            run = wandb.init(mode="offline", dir=tmp, project="gradwatch-overhead", reinit="finish_previous")
            wandb.watch(model, log="gradients", log_freq=1)
            try:
                yield lambda loss: run.log({"loss": float(loss.detach())})
            finally:
                wandb.unwatch(model)
                run.finish()
    else:
        raise ValueError(f"unknown method {method!r}")


def available_methods() -> list[str]:
    methods = ["unwatched", "floor", "gradwatch", "gradwatch-every10", "item-loop", "lightning"]
    try:
        import wandb  # noqa: F401
    except ImportError:
        return methods
    return methods + ["wandb"]


def time_loop(model: nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor],
              loss_fn: Callable[..., torch.Tensor], hook: Hook, steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` steps of the plain loop with ``hook`` after backward."""
    x, y = data
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        hook(loss)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(build: Callable[[], Model], methods: list[str], *, rounds: int, block: int, warmup: int = 1) -> dict[str, Any]:
    """Per method: the median step time, and the median over rounds of its ratio to ``unwatched``.

    Each round times a block of ``block`` steps of every method, in an order rotated from round
    to round; per-step medians keep a neighbour's burst on the shared CPU from skewing a block.
    """
    model, data, loss_fn = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    steps: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    added: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        this: dict[str, float] = {}
        for m in order:
            with attach(m, model, opt) as hook:
                times = time_loop(model, opt, data, loss_fn, hook, block, warmup)
            steps[m] += times
            this[m] = statistics.median(times)
        for m in methods:
            ratios[m].append(this[m] / this["unwatched"])
            added[m].append(this[m] - this["unwatched"])
    return {
        "tensors": len(list(model.parameters())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "ms": {m: 1e3 * statistics.median(v) for m, v in steps.items()},
        "ratio": {m: statistics.median(v) for m, v in ratios.items()},
        "overhead_ms": {m: 1e3 * statistics.median(v) for m, v in added.items()},
    }


# -- Keras --------------------------------------------------------------------------------------


def keras_overhead(*, repeats: int, batches: int) -> dict[str, Any]:  # noqa: C901
    """``model.fit`` per-batch time: unwatched, with GradWatch, with a side-batch GradientTape
    callback. TensorFlow backend only (the callback uses ``tf.GradientTape``).

    Each ``fit`` runs two epochs; the second (traced and warmed up) is timed by epoch hooks, so
    Keras keeps its asynchronous batch dispatch. The first epoch, which includes tracing the train
    function (GradWatch re-traces it with its probe at the start of every ``fit``), is reported too.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        return {"skipped": f"needs KERAS_BACKEND=tensorflow, got {keras.backend.backend()}"}
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from gradwatch import GradWatch

    class SideBatchNorms(keras.callbacks.Callback):
        def __init__(self, x: Any, y: Any) -> None:
            super().__init__()
            self.x, self.y = tf.constant(x), tf.constant(y)

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            with tf.GradientTape() as tape:
                pred = self.model(self.x, training=True)
                loss = self.model.compute_loss(x=self.x, y=self.y, y_pred=pred)
            grads = tape.gradient(loss, self.model.trainable_variables)
            {v.path: float(tf.norm(g)) for v, g in zip(self.model.trainable_variables, grads)}

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.start = 0.0
            self.epochs: list[float] = []
            self.fit_start = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter() if epoch else self.fit_start

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.epochs.append(time.perf_counter() - self.start)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128 * batches, 256)).astype("float32")
    y = rng.integers(0, 10, size=(128 * batches,)).astype("int32")

    def build() -> Any:
        keras.utils.set_random_seed(0)
        layers = [keras.Input((256,))] + [keras.layers.Dense(512, activation="relu") for _ in range(6)]
        model = keras.Sequential(layers + [keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.Adam(1e-5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    methods = {"unwatched": lambda: [], "gradwatch": lambda: [GradWatch()],
               "gradwatch-every10": lambda: [GradWatch(every=10)],
               "side-batch-tape": lambda: [SideBatchNorms(x[:128], y[:128])]}
    models = {m: build() for m in methods}
    for m, model in models.items():  # compile and warm up each once
        model.fit(x[:128 * 4], y[:128 * 4], batch_size=128, epochs=1, verbose=0, callbacks=methods[m]())
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    first: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    for r in range(repeats):
        this, this_first = {}, {}
        for m in names[r % len(names):] + names[:r % len(names)]:
            timer = EpochTimer()
            models[m].fit(x, y, batch_size=128, epochs=2, verbose=0, callbacks=methods[m]() + [timer])
            this[m] = timer.epochs[1] / batches
            this_first[m] = timer.epochs[0] / batches
        for m in names:
            seconds[m].append(this[m])
            ratios[m].append(this[m] / this["unwatched"])
            first[m].append(this_first[m] / this_first["unwatched"])
    return {
        "backend": keras.backend.backend(),
        "model": "MLP 6x512, batch 128, Adam",
        "ms": {m: 1e3 * statistics.median(v) for m, v in seconds.items()},
        "ratio": {m: statistics.median(v) for m, v in ratios.items()},
        "first_epoch_ratio": {m: statistics.median(v) for m, v in first.items()},
        "batches": batches,
    }


# -- the run ------------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    methods = available_methods()
    rounds, block = (4, 5) if quick else (10, 10)
    result: dict[str, Any] = {"methods": methods, "rounds": rounds, "block": block, "models": {}, "tensors": {},
                              "size": {}, "mode": "quick" if quick else "full"}
    models: dict[str, Callable[[], Model]] = {
        "MLP 6x512 (b128)": lambda: mlp(512, 6),
        "CNN 4 conv x16-32, 32x32 (b32)": lambda: cnn(16),
        "Transformer 4x128, seq 64 (b8)": lambda: transformer(batch=8),
    }
    if not quick:
        models["MLP 6x2048 (b128)"] = lambda: mlp(2048, 6)
        models["Transformer 8x256, seq 64 (b8)"] = lambda: transformer(256, 8, batch=8)
    for name, build in models.items():
        print(f"  overhead: {name}", file=sys.stderr, flush=True)
        result["models"][name] = measure(build, methods, rounds=rounds, block=block)
    scaling = ["unwatched", "floor", "gradwatch", "item-loop", "lightning"]
    budget = 2**18  # parameters in the hidden layers, about constant
    for depth in ((4, 16, 64) if quick else (4, 16, 64, 256)):
        width = int((budget / depth) ** 0.5)
        name = f"{depth} layers x {width}"
        print(f"  tensors: {name}", file=sys.stderr, flush=True)
        result["tensors"][name] = measure(lambda d=depth, w=width: mlp(w, d, batch=64, d_in=w), scaling,
                                          rounds=rounds, block=block)
    for width in ((64, 256, 1024) if quick else (64, 256, 1024, 2048)):
        name = f"4 layers x {width}"
        print(f"  size: {name}", file=sys.stderr, flush=True)
        result["size"][name] = measure(lambda w=width: mlp(w, 4, batch=64, d_in=w), scaling,
                                       rounds=rounds, block=block)
    print("  keras", file=sys.stderr, flush=True)
    try:
        result["keras"] = keras_overhead(repeats=rounds, batches=50 if quick else 100)
    except ImportError as exc:
        result["keras"] = {"skipped": f"not measured: {exc}"}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The tables: per model, the two scaling studies, Keras."""
    methods = result["methods"]
    out = [f"Mode: {result.get('mode', '?')}. {result['rounds']} rounds of {result['block']} timed steps per method, order rotated each round; "
           "ratio = median step time / median unwatched step time in the same round, median over rounds.", ""]
    out.append("| model | tensors | parameters | unwatched ms/step | " + " | ".join(m for m in methods if m != "unwatched") + " |")
    out.append("| --- | ---: | ---: | ---: | " + " | ".join("---:" for m in methods if m != "unwatched") + " |")
    for name, r in result["models"].items():
        out.append(f"| {name} | {r['tensors']} | {r['parameters']:,} | {r['ms']['unwatched']:.1f} | "
                   + " | ".join(f"x{r['ratio'][m]:.3f}" for m in methods if m != "unwatched") + " |")
    if "wandb" not in methods:
        out.append("")
        out.append("wandb: not measured (not installed).")
    for key, title in (("tensors", "Cost against the number of parameter tensors (about 262k hidden parameters)"),
                       ("size", "Cost against model size (4 hidden layers, 10 tensors)")):
        rows = result[key]
        if not rows:
            continue
        cols = [m for m in next(iter(rows.values()))["ms"] if m != "unwatched"]
        out += ["", f"**{title}**: added ms per step (ratio).", "",
                "| MLP | tensors | parameters | unwatched ms/step | " + " | ".join(cols) + " |",
                "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |"]
        for name, r in rows.items():
            out.append(f"| {name} | {r['tensors']} | {r['parameters']:,} | {r['ms']['unwatched']:.2f} | "
                       + " | ".join(f"{r['overhead_ms'][m]:+.2f} (x{r['ratio'][m]:.2f})" for m in cols) + " |")
    k = result.get("keras", {})
    out.append("")
    if "skipped" in k:
        out.append(f"Keras: {k['skipped']}")
    elif k:
        out += [f"**Keras `fit`** ({k['backend']} backend, {k['model']}): ms per batch in the second epoch "
                f"of each fit, steady state (ratio); the first epoch of {k.get('batches', '?')} batches, which "
                "includes tracing the train function, in the second row.", "",
                "| unwatched | GradWatch() | GradWatch(every=10) | side-batch GradientTape callback |",
                "| ---: | ---: | ---: | ---: |",
                f"| {k['ms']['unwatched']:.1f} | "
                + " | ".join(f"{k['ms'][m]:.1f} (x{k['ratio'][m]:.3f})"
                             for m in ("gradwatch", "gradwatch-every10", "side-batch-tape")) + " |"]
        if "first_epoch_ratio" in k:
            out.append("| first epoch (tracing included) | " + " | ".join(
                f"x{k['first_epoch_ratio'][m]:.3f}" for m in ("gradwatch", "gradwatch-every10", "side-batch-tape")) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds of 5 steps, fewer sizes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    result = run(args.quick)
    result["seconds"] = time.perf_counter() - start
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
