"""Draw a whole training run from a seed: ``spec = sample(seed)``.

Framework-free and deterministic (one :class:`random.Random` per seed, no global state): the same
seed gives the same :class:`~benchmarks.zoo.spec.RunSpec` on any machine and for any runner.
Which seeds are pathological is stratified: every :data:`BLOCK` consecutive seeds (aligned to
multiples of it) hold each pathology of :mod:`benchmarks.zoo.pathologies` once and healthy runs in
the other slots, in a shuffled order (:func:`pathology_of`). So 100 tuning seeds see every
pathology three or four times, and 600 report seeds 20 times. Everything else is what a user trains:
the family, its size, the optimizer with an LR in its sane range (:data:`SANE_LR`), the schedule,
the batch size (1 to 256; with ``drop_last=False`` the last batch of an epoch is ragged), weight
decay, dropout, label smoothing, bf16 autocast, a frozen first layer, and a dataset that ships
with scikit-learn.

>>> sample(7) == sample(7)
True
>>> sample(7).family in FAMILIES
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, TypeVar

from . import data
from .pathologies import PATHOLOGIES, ZERO_MATH_OPS
from .spec import FAMILIES, TOKEN_FAMILIES, Pathology, RunSpec

T = TypeVar("T")

BLOCK = 30
"""Seeds per stratum: 12 pathological slots (one per pathology) and 18 healthy ones. The report
seeds 1000-1599 draw 360 healthy and 240 pathological candidates: at the drop rates seen on the
tuning seeds (about 10 % of healthy and 2-15 % of pathological runs fail their label check) that
leaves over 300 and 200 kept runs."""

FAMILY_WEIGHTS = {"mlp": 0.22, "resmlp": 0.1, "cnn": 0.13, "rnn": 0.14, "transformer": 0.09,
                  "embedding": 0.1, "logistic": 0.13, "linear": 0.09}

DATASETS = {
    "mlp": ("digits", "iris", "wine", "breast_cancer", "diabetes", "classification", "moons", "blobs", "regression"),
    "resmlp": ("digits", "wine", "breast_cancer", "diabetes", "classification", "moons", "regression"),
    "cnn": ("digits",),
    "rnn": ("digits",),
    "transformer": ("wine", "breast_cancer", "classification"),
    "embedding": ("digits", "wine", "breast_cancer", "classification", "diabetes", "regression"),
    "logistic": ("iris", "wine", "breast_cancer", "digits", "classification", "blobs", "separable", "separable"),
    "linear": ("diabetes", "regression"),
}

SANE_LR = {
    "sgd": (0.05, 0.3),
    "sgd_momentum": (0.01, 0.1),
    "adam": (1e-3, 1e-2),
    "adamw": (1e-3, 1e-2),
    "rmsprop": (5e-4, 5e-3),
    "adagrad": (0.03, 0.3),
}
"""Log-uniform ranges of the base LR each optimizer is used with: values that train these small
models in a couple of hundred steps (plain SGD on a convex model: up to 0.5; transformers and
recurrent nets with Adam-like optimizers: at most 3e-3; batches of 4 or fewer: SGD and Adagrad a
third of this)."""

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 50, 64, 100, 128, 200, 256)
BATCH_WEIGHTS = (0.04, 0.05, 0.06, 0.09, 0.12, 0.15, 0.07, 0.13, 0.07, 0.11, 0.04, 0.07)
SAMPLE_BUDGET = 16_000
"""At most this many examples per run (steps x batch size), within the family's step range
(:data:`STEPS`; batches of 8 or fewer: :data:`SMALL_BATCH_STEPS`): runs stay around half a second on one CPU
thread while a batch of 256 still sees 11 epochs of digits."""
STEPS = {"rnn": (100, 200), "transformer": (100, 160)}
BUDGET = {"cnn": 10_000, "rnn": 12_000}
BF16_FAMILIES = ("mlp", "resmlp", "embedding", "logistic", "linear")
"""bf16 autocast on CPU makes convolutions, recurrent cells and attention 2-3x slower; it is
sampled where it is cheap (and LSTM cells refuse it on CPU)."""
DEFAULT_STEPS = (80, 200)
SMALL_BATCH_STEPS = {1: (200, 300), 2: (200, 300), 4: (120, 250), 8: (120, 250)}


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _pick(rng: random.Random, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    return rng.choices(list(options), weights=weights)[0]


def _dataset_options(rng: random.Random, name: str) -> tuple[tuple[str, Any], ...]:
    if name == "classification":
        n_features = rng.randint(6, 20)
        opts = {"n_samples": rng.choice([300, 500, 800]), "n_features": n_features,
                "n_informative": rng.randint(4, min(8, n_features)), "classes": rng.randint(2, 4),
                "class_sep": round(rng.uniform(1.5, 2.5), 2)}
    elif name == "moons":
        opts = {"n_samples": rng.choice([300, 500, 800]), "noise": round(rng.uniform(0.05, 0.25), 2),
                "n_features": 2}
    elif name == "blobs":
        opts = {"n_samples": rng.choice([300, 500, 800]), "classes": rng.randint(3, 5),
                "n_features": rng.randint(2, 8), "cluster_std": round(rng.uniform(1.0, 2.5), 2)}
    elif name == "separable":
        opts = {"n_samples": rng.choice([200, 400]), "classes": rng.choice([2, 2, 3]),
                "n_features": rng.randint(2, 10)}
    elif name == "regression":
        n_features = rng.randint(5, 20)
        opts = {"n_samples": rng.choice([300, 500, 800]), "n_features": n_features,
                "n_informative": rng.randint(2, n_features), "noise": rng.choice([0.0, 1.0, 10.0])}
    else:
        opts = {}
    return tuple(sorted(opts.items()))


def _architecture(rng: random.Random, family: str, pathology: str | None) -> dict[str, Any]:
    arch: dict[str, Any] = {}
    if family == "mlp":
        arch = {"depth": rng.randint(1, 4), "width": rng.choice([16, 32, 64, 128]),
                "activation": _pick(rng, ["relu", "gelu", "tanh"], [0.5, 0.3, 0.2]),
                "norm": _pick(rng, ["none", "batch", "layer"], [0.6, 0.2, 0.2])}
        if pathology == "tiny_init":
            arch.update(depth=rng.randint(6, 10), activation=rng.choice(["relu", "tanh", "gelu"]), norm="none",
                        width=rng.choice([32, 64]))
        elif pathology == "saturating":
            arch.update(depth=rng.randint(6, 12), activation="sigmoid", norm="none", width=rng.choice([32, 64]))
    elif family == "resmlp":
        arch = {"depth": rng.randint(2, 4), "width": rng.choice([32, 64]),
                "activation": rng.choice(["relu", "gelu"]), "norm": rng.choice(["none", "batch", "layer"])}
    elif family == "cnn":
        arch = {"depth": rng.choice([2, 3]), "width": rng.choice([4, 8]),
                "activation": rng.choice(["relu", "relu", "gelu"]), "norm": rng.choice(["none", "none", "batch", "layer"])}
    elif family == "rnn":
        cell = "rnn_relu" if pathology == "exploding_rnn" else _pick(rng, ["rnn", "rnn_relu", "lstm", "gru"], [0.25, 0.15, 0.3, 0.3])
        arch = {"cell": cell, "depth": rng.choice([1, 1, 2]), "width": rng.choice([32, 64])}
    elif family == "transformer":
        width = rng.choice([16, 32])
        arch = {"depth": rng.choice([1, 1, 2]), "width": width, "heads": rng.choice([2, 4]), "norm": "layer"}
    elif family == "embedding":
        arch = {"width": rng.choice([8, 16, 32]), "depth": 1}
    if pathology == "dying_relu":
        arch.update(activation="relu", norm="none")
    if pathology == "poisoned_batch":
        # A normalisation layer or a saturating cell absorbs a x1e4 input: nothing would explode.
        arch.update(norm="none")
        if family == "rnn":
            arch.update(cell="rnn_relu")
        if arch.get("activation") in ("tanh", "sigmoid"):
            arch.update(activation="relu")
    return arch


OPTIMIZER_WEIGHTS = {"transformer": (0.15, 0.35, 0.35, 0.1, 0.05), "rnn": (0.2, 0.35, 0.25, 0.15, 0.05)}
"""sgd, adam, adamw, rmsprop, adagrad: how often each is drawn (default 0.3, 0.3, 0.15, 0.12, 0.13)."""


def _optimizer(rng: random.Random, family: str, batch_size: int, pathology: str | None, cell: str) -> dict[str, Any]:
    weights = list(OPTIMIZER_WEIGHTS.get(family, (0.3, 0.3, 0.15, 0.12, 0.13)))
    if pathology == "tiny_init":
        # An adaptive optimizer's first updates (~lr per weight) dwarf a tiny init: with it the
        # gradients stop vanishing within a few steps, and there is no pathology to find.
        weights = [1.0, 0, 0, 0, 0]
    name = _pick(rng, ["sgd", "adam", "adamw", "rmsprop", "adagrad"], weights)
    out: dict[str, Any] = {"optimizer": name}
    key = name
    if name == "sgd" and rng.random() < 0.5:
        out["momentum"] = 0.9
        out["nesterov"] = rng.random() < 0.3
        key = "sgd_momentum"
    low, high = SANE_LR[key]
    if key == "sgd" and family in ("logistic", "linear"):
        high = 0.5
    if name in ("sgd", "adagrad") and batch_size <= 4:
        low, high = low / 3, high / 3
    if family in ("transformer", "rnn") and name in ("adam", "adamw", "rmsprop"):
        high = min(high, 3e-3)
    if family == "embedding" or (cell in ("lstm", "gru") and name in ("sgd", "adagrad")):
        # Averaged embedding rows and gated cells get small gradients: people train them hotter.
        low, high = 3 * low, 3 * high
    if family in ("logistic", "linear") and name in ("adam", "adamw", "rmsprop"):
        # An adaptive step moves each weight by ~lr: a convex model at 1e-3 needs thousands.
        low, high = 5 * low, 5 * high
    out["lr"] = float(f"{_log_uniform(rng, low, high):.3g}")
    if name == "adamw":
        out["weight_decay"] = rng.choice([0.01, 0.05, 0.1])
    elif rng.random() < 0.25:
        out["weight_decay"] = rng.choice([1e-4, 5e-4, 1e-3])
    return out


def _batch_size(rng: random.Random, spec: dict[str, Any]) -> int:
    n_train = data.train_rows(spec["dataset"], spec["dataset_options"])
    while True:
        bs = _pick(rng, BATCH_SIZES, BATCH_WEIGHTS)
        # BatchNorm1d cannot train on a batch of one (PyTorch raises): a user would not pick it.
        one_row = bs < 8 or (bs < n_train and n_train % bs == 1)
        if not (spec.get("norm") == "batch" and spec["family"] in ("mlp", "resmlp") and one_row):
            return bs


def _pathology(rng: random.Random, name: str, spec: dict[str, Any]) -> Pathology:
    steps = spec["steps"]
    mid = rng.randint(max(1, int(0.15 * steps)), int(0.85 * steps))
    if name == "lr_high":
        return Pathology(name, 0, float(f"{_log_uniform(rng, 30, 1000):.3g}"))
    if name == "lr_jump":
        onset = rng.randint(max(20, int(0.25 * steps)), int(0.7 * steps))
        return Pathology(name, onset, float(f"{_log_uniform(rng, 30, 1000):.3g}"))
    if name == "huge_init":
        return Pathology(name, 0, float(rng.randint(10, 50)))
    if name == "exploding_rnn":
        return Pathology(name, 0, round(rng.uniform(3.0, 5.0), 2))
    if name == "poisoned_batch":
        return Pathology(name, max(20, mid), 1e4)
    if name in ("nan_input", "inf_input", "nan_label", "zero_math"):
        return Pathology(name, mid)
    if name == "tiny_init":
        return Pathology(name, 0, float(f"{_log_uniform(rng, 0.02, 0.1):.2g}"))
    if name == "saturating":
        return Pathology(name, 0)
    if name == "dying_relu":
        return Pathology(name, 0, float(rng.randint(8, 20)), layer=rng.randint(0, spec["depth"] - 1),
                         share=round(rng.uniform(0.6, 1.0), 2))
    raise ValueError(f"Unknown pathology {name!r}; known: {sorted(PATHOLOGIES)}.")


def pathology_of(seed: int) -> str | None:
    """The pathology of ``seed``'s slot in its stratum of :data:`BLOCK` seeds (None: healthy).

    >>> names = [pathology_of(s) for s in range(BLOCK)]
    >>> sorted(n for n in names if n) == sorted(PATHOLOGIES), names.count(None)
    (True, 18)
    """
    block, slot = divmod(seed, BLOCK)
    block_rng = random.Random(f"gradwatch-zoo-block-{block}")
    names = sorted(PATHOLOGIES)
    slots: list[str | None] = [*names, *[None] * (BLOCK - len(names))]
    block_rng.shuffle(slots)
    return slots[slot]


def sample(seed: int) -> RunSpec:
    """The run for ``seed``.

    Args:
        seed: Any integer; seeds 0-99 are for tuning, 1000 and up for the report.

    Returns:
        A frozen :class:`RunSpec`, healthy or with one pathology.
    """
    rng = random.Random(seed)
    pathology = pathology_of(seed)
    families = FAMILIES if pathology is None else PATHOLOGIES[pathology].families
    family = _pick(rng, families, [FAMILY_WEIGHTS[f] for f in families])
    datasets = DATASETS[family]
    if pathology == "nan_label":
        datasets = tuple(d for d in datasets if data.task_of(d) == "regression")
    dataset = rng.choice(datasets)
    s: dict[str, Any] = {"seed": seed, "family": family, "dataset": dataset,
                         "dataset_options": _dataset_options(rng, dataset)}
    s.update(_architecture(rng, family, pathology))
    if pathology == "zero_math":
        s["input_op"] = rng.choice(ZERO_MATH_OPS)
    elif pathology is None and family in ("mlp", "logistic") and rng.random() < 0.08:
        s["input_op"] = rng.choice(ZERO_MATH_OPS)  # harmless on real data: the trap stays closed
    s["batch_size"] = _batch_size(rng, s)
    s.update(_optimizer(rng, family, s["batch_size"], pathology, s.get("cell", "")))
    s["schedule"] = _pick(rng, ["constant", "warmup", "cosine", "step", "onecycle"], [0.3, 0.15, 0.25, 0.15, 0.15])
    low, high = SMALL_BATCH_STEPS.get(s["batch_size"]) or STEPS.get(family, DEFAULT_STEPS)
    s["steps"] = max(low, min(rng.randint(low, high), BUDGET.get(family, SAMPLE_BUDGET) // s["batch_size"]))
    if s["schedule"] == "warmup" or (s["schedule"] == "cosine" and rng.random() < 0.4):
        s["warmup"] = max(2, int(rng.uniform(0.05, 0.2) * s["steps"]))
    plain = pathology not in ("tiny_init", "saturating", "dying_relu")
    if family in ("mlp", "resmlp", "transformer", "cnn") and plain and rng.random() < 0.3:
        s["dropout"] = rng.choice([0.1, 0.2, 0.5] if family != "transformer" else [0.1])
    if family == "rnn" and s.get("depth", 1) > 1 and rng.random() < 0.3:
        s["dropout"] = 0.2
    if data.task_of(dataset) == "classification" and rng.random() < 0.2:
        s["label_smoothing"] = 0.1
    if family in BF16_FAMILIES and rng.random() < 0.15:
        s["bf16"] = True
    frozen_ok = pathology in (None, "lr_high", "lr_jump", "nan_input", "inf_input", "poisoned_batch", "nan_label")
    if frozen_ok and rng.random() < 0.1 and (family in ("resmlp", "cnn") + TOKEN_FAMILIES
                                              or (family == "mlp" and s["depth"] >= 2)):
        s["frozen"] = "first"
    if pathology is not None:
        s["pathology"] = _pathology(rng, pathology, s)
    return RunSpec(**s)


def seeds_covering(seeds: Sequence[int]) -> list[int]:
    """A small fixed subset of ``seeds``: the first seed of each family among the healthy runs and
    the first of each pathology (the ``--quick`` sample)."""
    chosen: list[int] = []
    seen: set[str] = set()
    for seed in seeds:
        spec = sample(seed)
        key = spec.family if spec.pathology is None else spec.pathology.name
        if key not in seen:
            seen.add(key)
            chosen.append(seed)
    return chosen


__all__ = ["BATCH_SIZES", "BLOCK", "DATASETS", "FAMILY_WEIGHTS", "SANE_LR", "pathology_of", "sample", "seeds_covering"]
