"""A whole training run, described framework-free: :class:`RunSpec` (and its :class:`Pathology`).

A spec is frozen, printable (``str(spec)`` is one line) and JSON-able (:meth:`RunSpec.to_dict`,
:meth:`RunSpec.from_dict`); :func:`benchmarks.zoo.sampler.sample` draws one from a seed. A runner
(:mod:`benchmarks.zoo.torch_runner`, later a Keras one) turns it into a model, an optimizer, a
schedule and a data loader. ``lr`` is always the *sane* LR; a pathology's factor is applied on
top by the runner, so :meth:`RunSpec.twin` (the same run without the pathology) is exact.

>>> spec = RunSpec(seed=3, family="logistic", dataset="iris", optimizer="sgd", lr=0.1,
...                schedule="constant", batch_size=16, steps=120)
>>> str(spec)
'#3 logistic | iris | sgd lr 0.1 constant | bs 16 x 120 steps | healthy'
>>> RunSpec.from_dict(spec.to_dict()) == spec
True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from . import data
from .pathologies import PATHOLOGIES

FAMILIES = ("mlp", "resmlp", "cnn", "rnn", "transformer", "embedding", "logistic", "linear")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULES = ("constant", "warmup", "cosine", "step", "onecycle")
TOKEN_FAMILIES = ("transformer", "embedding")
TOKEN_BINS = 8


@dataclass(frozen=True)
class Pathology:
    """What is injected, where (see :mod:`benchmarks.zoo.pathologies` for the table).

    Attributes:
        name: A key of :data:`~benchmarks.zoo.pathologies.PATHOLOGIES`.
        onset: The optimizer step where it begins (0: from the start).
        factor: Its size: the LR multiplier (``lr_high``, ``lr_jump``), the init scale
            (``huge_init``, ``tiny_init``), the recurrent gain (``exploding_rnn``), the input
            scale (``poisoned_batch``), the negative bias (``dying_relu``). Defaults to 1.0.
        layer: The hidden layer (``dying_relu``). Defaults to 0.
        share: The share of that layer's units biased (``dying_relu``). Defaults to 1.0.
    """

    name: str
    onset: int = 0
    factor: float = 1.0
    layer: int = 0
    share: float = 1.0

    @property
    def expected(self) -> str:
        """The finding kind it must produce."""
        return PATHOLOGIES[self.name].expected


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        seed: Seeds everything: the data, the split, the init, the data order, dropout.
        family: One of :data:`FAMILIES`.
        dataset: A dataset of :mod:`benchmarks.zoo.data`.
        dataset_options: The generator's options, ``(name, value)`` pairs. Defaults to ().
        depth: Hidden layers (mlp), residual blocks (resmlp), conv layers (cnn), stacked cells
            (rnn), encoder layers (transformer). Defaults to 1.
        width: Hidden units, channels (cnn: of the first conv), model dimension. Defaults to 32.
        activation: ``relu``, ``gelu``, ``tanh`` or ``sigmoid``. Defaults to ``relu``.
        norm: ``none``, ``batch`` or ``layer``. Defaults to ``none``.
        cell: ``rnn`` (tanh), ``rnn_relu``, ``lstm`` or ``gru`` (rnn family). Defaults to "".
        heads: Attention heads (transformer). Defaults to 0.
        input_op: A hand-written op on the input: ``none``, ``log_energy``, ``norm_feature`` or
            ``l2norm`` (see :data:`~benchmarks.zoo.pathologies.ZERO_MATH_OPS`). Defaults to ``none``.
        dropout: Dropout probability. Defaults to 0.0.
        optimizer: One of :data:`OPTIMIZERS`. Defaults to ``sgd``.
        lr: The sane base LR (OneCycle: its peak). Defaults to 0.1.
        momentum: SGD momentum. Defaults to 0.0.
        nesterov: SGD Nesterov momentum. Defaults to False.
        weight_decay: L2 (decoupled for AdamW). Defaults to 0.0.
        schedule: One of :data:`SCHEDULES`. Defaults to ``constant``.
        warmup: Linear warm-up steps (``warmup``, ``cosine``). Defaults to 0.
        batch_size: Mini-batch size (the last batch of an epoch may be shorter). Defaults to 32.
        steps: Optimizer steps. Defaults to 200.
        label_smoothing: Cross-entropy label smoothing. Defaults to 0.0.
        bf16: Forward pass under bfloat16 autocast (CPU). Defaults to False.
        frozen: ``""`` or ``"first"`` (the first layer does not train). Defaults to "".
        pathology: What is injected; None for a healthy run. Defaults to None.
    """

    seed: int
    family: str
    dataset: str
    dataset_options: tuple[tuple[str, Any], ...] = ()
    depth: int = 1
    width: int = 32
    activation: str = "relu"
    norm: str = "none"
    cell: str = ""
    heads: int = 0
    input_op: str = "none"
    dropout: float = 0.0
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    batch_size: int = 32
    steps: int = 200
    label_smoothing: float = 0.0
    bf16: bool = False
    frozen: str = ""
    pathology: Pathology | None = field(default=None)

    @property
    def task(self) -> str:
        return data.task_of(self.dataset)

    @property
    def label(self) -> str:
        """``"healthy"`` or the finding kind the run must produce."""
        return "healthy" if self.pathology is None else self.pathology.expected

    @property
    def healthy(self) -> bool:
        return self.pathology is None

    def twin(self) -> RunSpec:
        """The same run without its pathology (the sane LR, the default init, clean batches)."""
        return dataclasses.replace(self, pathology=None)

    def with_steps(self, steps: int) -> RunSpec:
        """The same run, shorter or longer (a mid-run onset past the end is moved inside)."""
        p = self.pathology
        if p is not None and p.onset >= steps:
            p = dataclasses.replace(p, onset=max(0, steps // 2))
        return dataclasses.replace(self, steps=steps, pathology=p)

    def architecture(self) -> str:
        """The model in a few words."""
        f = self.family
        extras = [self.activation] if f in ("mlp", "resmlp", "cnn") else []
        if self.norm != "none":
            extras.append(f"{self.norm}-norm")
        if self.input_op != "none":
            extras.append(self.input_op)
        if self.dropout:
            extras.append(f"dropout {self.dropout:g}")
        if f in ("mlp", "resmlp"):
            head = f"{f} {self.depth}x{self.width}"
        elif f == "cnn":
            head = f"cnn {self.depth} conv x{self.width}"
        elif f == "rnn":
            head = f"{self.cell} {self.depth}x{self.width}"
        elif f == "transformer":
            head = f"transformer {self.depth}L d{self.width} h{self.heads}"
        elif f == "embedding":
            head = f"embedding d{self.width}"
        else:
            head = f
        return " ".join([head, *extras])

    def __str__(self) -> str:
        opt = f"{self.optimizer} lr {self.lr:.3g}"
        if self.momentum:
            opt += f" m{self.momentum:g}" + (" nesterov" if self.nesterov else "")
        if self.weight_decay:
            opt += f" wd {self.weight_decay:.2g}"
        sched = self.schedule + (f"(warm-up {self.warmup})" if self.warmup else "")
        tail = []
        if self.label_smoothing:
            tail.append(f"ls {self.label_smoothing:g}")
        if self.bf16:
            tail.append("bf16")
        if self.frozen:
            tail.append(f"frozen {self.frozen}")
        what = "healthy"
        if self.pathology is not None:
            p = self.pathology
            about = PATHOLOGIES[p.name].about.format(factor=p.factor, onset=p.onset, share=p.share,
                                                     layer=p.layer, variant=self._variant())
            what = f"{p.name}: {about} -> {p.expected}"
        options = ",".join(f"{k}={v}" for k, v in self.dataset_options if k != "n_samples")
        dataset = self.dataset + (f"({options})" if options else "")
        parts = [f"#{self.seed} {self.architecture()}", dataset, f"{opt} {sched}",
                 f"bs {self.batch_size} x {self.steps} steps", *tail, what]
        return " | ".join(parts)

    def _variant(self) -> str:
        if self.pathology is not None and self.pathology.name == "saturating":
            return self.activation
        return self.input_op

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["dataset_options"] = dict(self.dataset_options)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["dataset_options"] = tuple(sorted(d.get("dataset_options", {}).items()))
        if d.get("pathology") is not None:
            d["pathology"] = Pathology(**d["pathology"])
        return cls(**d)


__all__ = ["FAMILIES", "OPTIMIZERS", "SCHEDULES", "TOKEN_BINS", "TOKEN_FAMILIES", "Pathology", "RunSpec"]
