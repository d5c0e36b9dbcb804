"""Synthetic gradient streams, so detectors and policies are tested without any framework.

Each function yields :class:`~gradwatch.StepStats` for a small made-up MLP (``fc0`` ... ``fcN``,
one weight and one bias per layer) whose numbers follow a pattern seen in real training: healthy
noise, convergence, warm-up transients, frozen layers, sparse embeddings, and the pathologies. All
take ``steps`` and ``seed`` and are deterministic for a given seed.

>>> from gradwatch.testing import healthy
>>> stream = list(healthy(steps=3))
>>> [s.step for s in stream], stream[0].layout.layer_names()[:2]
([0, 1, 2], ('fc0', 'fc1'))
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gradwatch.stats import Layout, StepStats

__all__ = [
    "STREAMS",
    "converging",
    "dying_units_stream",
    "exploding_stream",
    "frozen_layers",
    "healthy",
    "healthy_streams",
    "lr_jump_stream",
    "make_layout",
    "nan_at",
    "noisy_small_batch",
    "sparse_embedding",
    "vanishing_stream",
    "warmup",
    "zero_init_head",
]


def make_layout(layers: int = 5, width: int = 64, embedding: bool = False) -> Layout:
    """Layout of an MLP ``fc0..fc{layers-1}`` (weight + bias each), optionally after an embedding."""
    names, numel = [], []
    if embedding:
        names.append("embed.weight")
        numel.append(1000 * width)
    for i in range(layers):
        names += [f"fc{i}.weight", f"fc{i}.bias"]
        numel += [width * width, width]
    return Layout.from_names(names, numel=numel)


class _Model:
    """Per-tensor baselines: grad norms ~ 0.1 * exp(noise), weight norms ~ 8, bias norms ~ 0.5."""

    def __init__(self, layout: Layout, seed: int, noise: float = 0.15) -> None:
        self.layout = layout
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        roles = np.array(layout.roles)
        self.base_grad = np.where(roles == "bias", 0.02, 0.1) * np.exp(self.rng.normal(0, 0.3, len(layout)))
        self.param = np.where(roles == "bias", 0.5, 8.0) * np.exp(self.rng.normal(0, 0.2, len(layout)))
        self.zero = np.where(roles == "embedding", 0.0, 0.02)

    def stats(self, step: int, scale: np.ndarray | float = 1.0, loss: float | None = None, **overrides) -> StepStats:
        n = len(self.layout)
        grad = self.base_grad * scale * np.exp(self.rng.normal(0, self.noise, n))
        zero = np.clip(self.zero + self.rng.normal(0, 0.01, n), 0, 1)
        fields = dict(grad_norm=grad, param_norm=self.param.copy(), zero_fraction=zero, loss=loss)
        fields.update(overrides)
        return StepStats(step=step, layout=self.layout, **fields)

    def loss(self, step: int, start: float = 2.3, floor: float = 0.1, tau: float = 300.0) -> float:
        return float(floor + (start - floor) * np.exp(-step / tau) * np.exp(self.rng.normal(0, 0.05)))


def healthy(steps: int = 200, *, layers: int = 5, seed: int = 0, loss_spike_at: int | None = None) -> Iterator[StepStats]:
    """A healthy run: gradient norms fluctuate ~15% around a steady level, the loss decreases.

    Args:
        steps: Number of steps. Defaults to 200.
        layers: Layers of the MLP. Defaults to 5.
        seed: Random seed. Defaults to 0.
        loss_spike_at: If given, the loss jumps 5x at this step (the gradients stay healthy).
    """
    model = _Model(make_layout(layers), seed)
    for t in range(steps):
        loss = model.loss(t)
        if t == loss_spike_at:
            loss *= 5.0
        yield model.stats(t, loss=loss)


def converging(steps: int = 400, *, layers: int = 5, seed: int = 1) -> Iterator[StepStats]:
    """A convex-like problem converging: every layer's gradient shrinks together, 1e-4x by the end."""
    model = _Model(make_layout(layers), seed)
    for t in range(steps):
        scale = 10.0 ** (-4.0 * t / steps)
        yield model.stats(t, scale=scale, loss=float(1e-6 + 2.0 * scale))


def warmup(steps: int = 300, *, layers: int = 5, seed: int = 2, warmup_steps: int = 50) -> Iterator[StepStats]:
    """LR warm-up: norms start 3x high, spike once at step 3, then settle as the LR ramps up and
    grow 2.5x again towards the end of warm-up."""
    model = _Model(make_layout(layers), seed)
    for t in range(steps):
        if t < warmup_steps:
            scale = 3.0 * np.exp(-t / 10) + 1.0 + 1.5 * t / warmup_steps
        else:
            scale = 2.5 * np.exp(-(t - warmup_steps) / 100) + 1.0
        if t == 3:
            scale *= 6.0
        yield model.stats(t, scale=scale, loss=model.loss(t))


def frozen_layers(steps: int = 200, *, layers: int = 6, frozen: int = 3, seed: int = 3) -> Iterator[StepStats]:
    """Fine-tuning with a frozen backbone: the first ``frozen`` layers have no gradient at all."""
    layout = make_layout(layers)
    model = _Model(layout, seed)
    has_grad = np.array([int(name[2:].split(".")[0]) >= frozen for name in layout.names])
    for t in range(steps):
        yield model.stats(t, loss=model.loss(t), has_grad=has_grad, grad_norm=np.where(has_grad, model.base_grad, 0.0))


def sparse_embedding(steps: int = 200, *, layers: int = 3, seed: int = 4) -> Iterator[StepStats]:
    """A model with an embedding table: 95% of its rows get exactly-zero gradient every step, and
    its gradient norm is tiny against its (large) weight norm."""
    layout = make_layout(layers, embedding=True)
    model = _Model(layout, seed)
    model.zero[0] = 0.95
    model.base_grad[0] = 1e-4
    model.param[0] = 300.0
    for t in range(steps):
        yield model.stats(t, loss=model.loss(t))


def noisy_small_batch(steps: int = 300, *, layers: int = 5, seed: int = 5) -> Iterator[StepStats]:
    """Batch size 2: gradient norms fluctuate ~60%, ReLU zero fractions ~30% +- 15%."""
    layout = make_layout(layers)
    model = _Model(layout, seed, noise=0.6)
    for t in range(steps):
        zero = np.clip(0.3 + model.rng.normal(0, 0.15, len(layout)), 0, 1)
        yield model.stats(t, loss=model.loss(t) * float(np.exp(model.rng.normal(0, 0.4))), zero_fraction=zero)


def zero_init_head(steps: int = 200, *, layers: int = 5, seed: int = 6) -> Iterator[StepStats]:
    """A zero-initialised output layer: at step 0 its weight norm is 0 and every earlier layer's
    gradient is exactly 0; both grow as the head learns."""
    layout = make_layout(layers)
    model = _Model(layout, seed)
    head = np.array([name.startswith(f"fc{layers - 1}.") for name in layout.names])
    for t in range(steps):
        grow = min(1.0, t / 50.0)
        scale = np.where(head, 1.0, grow)
        params = np.where(head, model.param * grow, model.param)
        zero = np.where(head, 0.02, 1.0 if t == 0 else 0.02)
        yield model.stats(t, scale=scale, loss=model.loss(t), param_norm=params, zero_fraction=zero)


def vanishing_stream(steps: int = 100, *, layers: int = 8, decay: float = 0.2, seed: int = 7) -> Iterator[StepStats]:
    """A deep saturating MLP: each layer's gradient is ``decay`` times the next one's."""
    layout = make_layout(layers)
    model = _Model(layout, seed)
    depth = np.array([int(name[2:].split(".")[0]) for name in layout.names])
    scale = decay ** (layers - 1 - depth)
    for t in range(steps):
        yield model.stats(t, scale=scale, loss=model.loss(t, tau=5000))


def exploding_stream(onset: int = 60, steps: int = 100, *, layers: int = 5, growth: float = 2.0, seed: int = 8) -> Iterator[StepStats]:
    """Healthy until ``onset``, then every gradient grows ``growth``x per step (a too-high LR)."""
    model = _Model(make_layout(layers), seed)
    for t in range(steps):
        scale = growth ** max(0, t - onset + 1) if t >= onset else 1.0
        scale = min(scale, 1e30)
        yield model.stats(t, scale=scale, loss=model.loss(t) * (scale if t >= onset else 1.0))


def lr_jump_stream(jump_at: int = 300, steps: int = 340, *, layers: int = 5, seed: int = 9) -> Iterator[StepStats]:
    """Healthy until ``jump_at``, where the norm jumps 30x and stays there (LR raised 100x)."""
    model = _Model(make_layout(layers), seed)
    for t in range(steps):
        yield model.stats(t, scale=30.0 if t >= jump_at else 1.0, loss=model.loss(t))


def nan_at(step: int = 50, steps: int = 100, *, layers: int = 5, origin: int = 2, seed: int = 10,
           loss_finite: bool = True) -> Iterator[StepStats]:
    """NaN gradients at one step, produced in layer ``fc{origin}``: it and every layer before it
    are non-finite, the layers after it are finite. The loss stays finite unless told otherwise."""
    layout = make_layout(layers)
    model = _Model(layout, seed)
    depth = np.array([int(name[2:].split(".")[0]) for name in layout.names])
    for t in range(steps):
        if t == step:
            grad = np.where(depth <= origin, np.nan, model.base_grad)
            nonfinite = np.where(depth <= origin, 7, 0)
            loss = model.loss(t) if loss_finite else float("nan")
            yield model.stats(t, loss=loss, grad_norm=grad, nonfinite=nonfinite)
        else:
            yield model.stats(t, loss=model.loss(t))


def dying_units_stream(onset: int = 50, steps: int = 100, *, layers: int = 5, layer: int = 1,
                       fraction: float = 0.8, seed: int = 11) -> Iterator[StepStats]:
    """From ``onset`` on, ``fraction`` of the units of ``fc{layer}`` get exactly-zero gradient."""
    layout = make_layout(layers)
    model = _Model(layout, seed)
    member = np.array([name.startswith(f"fc{layer}.") for name in layout.names])
    for t in range(steps):
        stats = model.stats(t, loss=model.loss(t))
        if t >= onset:
            stats.zero_fraction = np.where(member, fraction + 0.02 * model.rng.random(len(layout)), stats.zero_fraction)
        yield stats


def healthy_streams() -> dict[str, Iterator[StepStats]]:
    """Every healthy stream by name: the traps of docs/design.md ("what healthy looks like") and then some."""
    return {
        "healthy": healthy(),
        "converging": converging(),
        "warmup": warmup(),
        "frozen_layers": frozen_layers(),
        "sparse_embedding": sparse_embedding(),
        "noisy_small_batch": noisy_small_batch(),
        "zero_init_head": zero_init_head(),
    }


STREAMS = {
    "healthy": healthy,
    "converging": converging,
    "warmup": warmup,
    "frozen_layers": frozen_layers,
    "sparse_embedding": sparse_embedding,
    "noisy_small_batch": noisy_small_batch,
    "zero_init_head": zero_init_head,
    "vanishing": vanishing_stream,
    "exploding": exploding_stream,
    "lr_jump": lr_jump_stream,
    "nan": nan_at,
    "dying_units": dying_units_stream,
}
"""Every stream factory by name."""
