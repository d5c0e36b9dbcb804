"""The doctor benchmark's cases: a pathological training setup, a dataset, a framework.

A :class:`Setup` describes a model and its training in no framework's terms; the runners
(``torch_side``, ``keras_side``) build it. Every pathology has a **known-good configuration of
the same architecture** (same depth, width and data; ReLU with He initialisation and zero biases,
Adam at 1e-3; for the recurrent cases an orthogonal recurrent matrix): the accuracy the repaired
run must reach 90 % of.

The doctor's thresholds and candidate order were tuned on the ``tune`` split only (digits,
moons, digits-seq); the ``report`` split (wine, circles, classification, breast_cancer,
classification-seq) was run once the rules were fixed, and is what the targets are scored on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from benchmarks.doctor.data import SEQUENCES

TUNE = ("digits", "moons", "digits-seq")
REPORT = ("wine", "circles", "classification", "breast_cancer", "classification-seq")
EPOCHS = {"digits": 30, "wine": 100, "moons": 40, "circles": 40, "classification": 25, "breast_cancer": 60,
          "digits-seq": 30, "classification-seq": 25}
"""A full training run, per dataset: about the epochs the known-good configuration needs to reach its
plateau accuracy on the test split."""
BATCH = {"wine": 16}
"""Batch size per dataset (32 otherwise)."""


@dataclass(frozen=True)
class Setup:
    """A model and its training, framework-free.

    Args:
        kind: ``"mlp"`` or ``"rnn"`` (one recurrent layer, then a dense head on the last step).
        depth: Hidden layers (MLP).
        width: Units per hidden layer (RNN: hidden size).
        activation: Hidden activation.
        init: ``"default"`` (the framework's), ``"he"``, or ``"normal:<std>"``.
        bias: Initial value of the hidden biases.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: Learning rate.
        recurrent_gain: RNN: the recurrent matrix is ``N(0, gain^2 / hidden)`` (``0``: orthogonal).
        clip: Global norm clipping level, 0 for none.
    """

    kind: str = "mlp"
    depth: int = 3
    width: int = 64
    activation: str = "relu"
    init: str = "he"
    bias: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    recurrent_gain: float = 0.0
    clip: float = 0.0


PATHOLOGIES: dict[str, tuple[str, Setup]] = {
    "deep-sigmoid": ("8 sigmoid layers, default init, SGD 0.1: gradients vanish towards the input",
                     Setup(depth=8, activation="sigmoid", init="default", optimizer="sgd", lr=0.1)),
    "deep-tanh-small-init": ("6 tanh layers initialised N(0, 0.01), SGD 0.1: the signal dies out in depth",
                             Setup(depth=6, activation="tanh", init="normal:0.01", optimizer="sgd", lr=0.1)),
    "relu-large-init": ("6 ReLU layers initialised N(0, 1), SGD 0.01: activations and gradients blow up",
                        Setup(depth=6, activation="relu", init="normal:1.0", optimizer="sgd", lr=0.01)),
    "lr-too-high-sgd": ("3 ReLU layers, He init, SGD at LR 3: diverges", Setup(depth=3, optimizer="sgd", lr=3.0)),
    "lr-too-high-adam": ("3 ReLU layers, He init, Adam at LR 0.3", Setup(depth=3, optimizer="adam", lr=0.3)),
    "lr-too-low": ("3 ReLU layers, He init, SGD at LR 1e-5: the loss barely moves", Setup(depth=3, optimizer="sgd", lr=1e-5)),
    "dying-relu": ("4 ReLU layers whose biases start at -4, SGD 0.05: most units never fire",
                   Setup(depth=4, bias=-4.0, optimizer="sgd", lr=0.05)),
    "exploding-rnn": ("ReLU RNN, 64 units, recurrent gain 4, SGD 0.02: the recurrence amplifies the state and "
                      "the gradients at every step", Setup(kind="rnn", width=64, activation="relu", init="default",
                                                           recurrent_gain=4.0, optimizer="sgd", lr=0.02)),
    "exploding-rnn-mild": ("ReLU RNN, 64 units, recurrent gain 2.5, SGD 0.02: trains, with late loss spikes",
                           Setup(kind="rnn", width=64, activation="relu", init="default", recurrent_gain=2.5,
                                 optimizer="sgd", lr=0.02)),
}
"""name -> (what it is, the setup)."""

HEALTHY = ("healthy", "3 ReLU layers, He init, Adam 1e-3 (the known-good configuration)", Setup())
"""The control: the doctor must find nothing to repair."""


def known_good(setup: Setup) -> Setup:
    """The known-good configuration of the same architecture."""
    if setup.kind == "rnn":
        return replace(setup, activation="relu", init="he", recurrent_gain=0.0, optimizer="adam", lr=1e-3, clip=1.0, bias=0.0)
    return replace(setup, activation="relu", init="he", bias=0.0, optimizer="adam", lr=1e-3, clip=0.0)


@dataclass(frozen=True)
class Case:
    """One benchmark case."""

    framework: str
    pathology: str
    dataset: str
    description: str
    setup: Setup

    @property
    def id(self) -> str:
        return f"{self.framework}/{self.pathology}/{self.dataset}"

    @property
    def split(self) -> str:
        return "tune" if self.dataset in TUNE else "report"

    @property
    def epochs(self) -> int:
        return EPOCHS[self.dataset]

    @property
    def batch_size(self) -> int:
        return BATCH.get(self.dataset, 32)

    @property
    def healthy_control(self) -> bool:
        return self.pathology == "healthy"


def cases(frameworks: tuple[str, ...] = ("torch", "keras"), splits: tuple[str, ...] = ("tune", "report"),
          only: tuple[str, ...] = ()) -> list[Case]:
    """Every case of the frameworks and splits (``only``: ids containing one of the words)."""
    out = []
    for framework in frameworks:
        for dataset in (*TUNE, *REPORT):
            split = "tune" if dataset in TUNE else "report"
            if split not in splits:
                continue
            sequence = dataset in SEQUENCES
            for name, (text, setup) in PATHOLOGIES.items():
                if (setup.kind == "rnn") == sequence:
                    out.append(Case(framework, name, dataset, text, setup))
            if not sequence:
                out.append(Case(framework, HEALTHY[0], dataset, HEALTHY[1], HEALTHY[2]))
    return [c for c in out if not only or any(word in c.id for word in only)]
