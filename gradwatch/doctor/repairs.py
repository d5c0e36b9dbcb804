"""Candidate repairs: the changes a cause calls for, and nothing else.

A :class:`Change` is one edit of the model or its training setup, in no framework's terms; a
:class:`Candidate` is the set of changes one trial applies. :func:`propose` turns causes into
candidates, each cause into the classic remedies that address it:

=========================  ===============================================================
cause                      candidates
=========================  ===============================================================
``saturating_activation``  swap the activation to ReLU (He init) and to SELU (LeCun init)
``init_scale``             re-initialise the named layers as their activation wants
                           (orthogonal recurrent matrices)
``dying_relu``             re-initialise them (He, zero bias); swap ReLU to LeakyReLU
``no_normalisation``       insert BatchNorm (LayerNorm in sequence models) after the layers
``sgd_across_depth``       switch to Adam (AdamW with weight decay)
``lr_too_high``            scale the LR down by the factor the first updates call for;
                           switch plain SGD to Adam
``lr_too_low``             switch to Adam; scale the LR up likewise
``unclipped_norm``         clip the global norm at the run's starting level
=========================  ===============================================================

:func:`combine` joins two candidates into the pair the doctor tries last.

>>> from gradwatch.doctor.causes import Cause
>>> cause = Cause("lr_too_high", ("fc1",), "...", {"factor": 0.01})
>>> [c.name for c in propose([cause])]
['LR x0.01']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gradwatch.doctor.causes import Cause
from gradwatch.doctor.model import ModelDescription, init_for
from gradwatch.jsonvalues import to_json

__all__ = [
    "CHANGE_KINDS",
    "Candidate",
    "Change",
    "ClipNorm",
    "InsertNorm",
    "Reinit",
    "ScaleLR",
    "SwapActivation",
    "SwitchOptimizer",
    "combine",
    "propose",
]

CHANGE_KINDS = ("swap_activation", "insert_norm", "reinit", "scale_lr", "switch_optimizer", "clip_norm")
"""What a change can be, in the order a trial applies them (structure first, then training)."""

INIT_SCHEMES = ("he", "lecun", "glorot", "orthogonal")
NORMS = ("batch", "layer")


@dataclass(frozen=True)
class Change:
    """One edit of a model or its training (a subclass says which)."""

    kind: ClassVar[str] = ""

    def describe(self) -> str:
        """One line for people."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()})
        return to_json(out)


@dataclass(frozen=True)
class SwapActivation(Change):
    """Swap the activation after ``layers`` to ``activation``, re-initialising the layers with
    ``init`` (the scheme that fits the new activation) and zero biases."""

    kind: ClassVar[str] = "swap_activation"
    layers: tuple[str, ...]
    activation: str
    init: str

    def describe(self) -> str:
        return f"activation after {', '.join(self.layers)} -> {self.activation} ({self.init} init)"


@dataclass(frozen=True)
class InsertNorm(Change):
    """Insert a normalisation layer after each of ``layers``, before its activation."""

    kind: ClassVar[str] = "insert_norm"
    layers: tuple[str, ...]
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"InsertNorm.norm must be one of {NORMS}; received norm={self.norm!r}.")

    def describe(self) -> str:
        return f"{'BatchNorm' if self.norm == 'batch' else 'LayerNorm'} after {', '.join(self.layers)}"


@dataclass(frozen=True)
class Reinit(Change):
    """Re-initialise the weights of ``layers`` with ``init``, biases at zero."""

    kind: ClassVar[str] = "reinit"
    layers: tuple[str, ...]
    init: str

    def __post_init__(self) -> None:
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"Reinit.init must be one of {INIT_SCHEMES}; received init={self.init!r}.")

    def describe(self) -> str:
        return f"re-initialise {', '.join(self.layers)} ({self.init}, zero bias)"


@dataclass(frozen=True)
class ScaleLR(Change):
    """Multiply the learning rate by ``factor``."""

    kind: ClassVar[str] = "scale_lr"
    factor: float

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"ScaleLR.factor must be > 0; received factor={self.factor!r}.")

    def describe(self) -> str:
        return f"LR x{self.factor:g}"


@dataclass(frozen=True)
class SwitchOptimizer(Change):
    """Train with ``optimizer`` (``"adam"`` or ``"adamw"``) at ``lr`` instead."""

    kind: ClassVar[str] = "switch_optimizer"
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0

    def describe(self) -> str:
        name = {"adam": "Adam", "adamw": "AdamW"}.get(self.optimizer, self.optimizer)
        return f"{name}(lr={self.lr:g}" + (f", weight_decay={self.weight_decay:g})" if self.weight_decay else ")")


@dataclass(frozen=True)
class ClipNorm(Change):
    """Clip the global gradient norm at ``level``."""

    kind: ClassVar[str] = "clip_norm"
    level: float

    def __post_init__(self) -> None:
        if not self.level > 0:
            raise ValueError(f"ClipNorm.level must be > 0; received level={self.level!r}.")

    def describe(self) -> str:
        return f"clip the global norm at {self.level:.3g}"


@dataclass(frozen=True)
class Candidate:
    """A repair to try: a name, its changes, and the causes that called for it.

    Args:
        name: A short label (``"sigmoid->relu"``).
        changes: The changes, applied in :data:`CHANGE_KINDS` order.
        because: The cause kinds it addresses.
    """

    name: str
    changes: tuple[Change, ...]
    because: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        return "; ".join(change.describe() for change in self.changes)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(change.kind for change in self.changes)

    def ordered(self) -> tuple[Change, ...]:
        """The changes in the order a trial applies them."""
        return tuple(sorted(self.changes, key=lambda c: CHANGE_KINDS.index(c.kind)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.describe(), "because": list(self.because),
                "changes": [change.to_dict() for change in self.changes]}


def _swap_name(model: ModelDescription | None, layers: Sequence[str], to: str) -> str:
    before = {layer.activation for name in layers if model is not None and (layer := model.layer(name)) is not None}
    return f"{'/'.join(sorted(before)) or 'activation'}->{to}"


def _for_cause(cause: Cause, model: ModelDescription | None) -> list[Candidate]:
    because = (cause.kind,)
    layers = cause.layers
    if cause.kind == "saturating_activation":
        return [Candidate(_swap_name(model, layers, "relu"), (SwapActivation(layers, "relu", "he"),), because),
                Candidate(_swap_name(model, layers, "selu"), (SwapActivation(layers, "selu", "lecun"),), because)]
    if cause.kind == "init_scale":
        out = []
        plain = tuple(n for n in layers if n not in cause.evidence.get("recurrent_gain", {}))
        recurrent = tuple(n for n in layers if n in cause.evidence.get("recurrent_gain", {}))
        changes: list[Change] = []
        if plain:
            schemes = {}
            for name in plain:
                layer = model.layer(name) if model is not None else None
                schemes[name] = init_for(layer.activation if layer is not None else "linear")
            for scheme in sorted(set(schemes.values())):
                changes.append(Reinit(tuple(n for n in plain if schemes[n] == scheme), scheme))
        if recurrent:
            changes.append(Reinit(recurrent, "orthogonal"))
        if changes:
            out.append(Candidate("re-initialise", tuple(changes), because))
        return out
    if cause.kind == "dying_relu":
        return [Candidate("re-initialise (He)", (Reinit(layers, "he"),), because),
                Candidate(_swap_name(model, layers, "leaky_relu"), (SwapActivation(layers, "leaky_relu", "he"),), because)]
    if cause.kind == "no_normalisation":
        norm = "layer" if model is not None and model.sequence_model else "batch"
        label = "BatchNorm" if norm == "batch" else "LayerNorm"
        return [Candidate(f"insert {label}", (InsertNorm(layers, norm),), because)]
    if cause.kind == "sgd_across_depth":
        return [Candidate("Adam", (_adam(model),), because)]
    if cause.kind == "lr_too_high":
        factor = float(cause.evidence.get("factor", 0.1))
        out = [Candidate(f"LR x{factor:g}", (ScaleLR(factor),), because)]
        if model is not None and not model.adaptive:
            out.append(Candidate("Adam", (_adam(model),), because))
        return out
    if cause.kind == "lr_too_low":
        factor = float(cause.evidence.get("factor", 10.0))
        # Adam first: its steps do not scale with the gradients, so it does not need the factor right.
        return [Candidate("Adam", (_adam(model),), because), Candidate(f"LR x{factor:g}", (ScaleLR(factor),), because)]
    if cause.kind == "unclipped_norm":
        level = float(cause.evidence["level"])
        return [Candidate(f"clip at {level:.3g}", (ClipNorm(level),), because)]
    return []


def _adam(model: ModelDescription | None) -> SwitchOptimizer:
    decay = model.weight_decay if model is not None else 0.0
    if decay:
        return SwitchOptimizer("adamw", 1e-3, weight_decay=decay)
    return SwitchOptimizer("adam", 1e-3)


def propose(causes: Sequence[Cause], model: ModelDescription | None = None) -> list[Candidate]:
    """The candidates the causes call for, each once, most specific first.

    Args:
        causes: The causes (:func:`gradwatch.doctor.causes.diagnose`).
        model: The model's description (activations of the named layers, sequence model or
            not, weight decay). Defaults to None.

    Returns:
        The candidates, in the order of the causes (warning causes before info ones); a
        candidate two causes call for is listed once, with both causes.
    """
    ordered = sorted(causes, key=lambda c: c.severity != "warning")
    out: dict[tuple[Change, ...], Candidate] = {}
    for cause in ordered:
        for candidate in _for_cause(cause, model):
            key = candidate.ordered()
            if key in out:
                previous = out[key]
                out[key] = Candidate(previous.name, previous.changes, tuple(dict.fromkeys(previous.because + candidate.because)))
            else:
                out[key] = candidate
    return list(out.values())


_CONFLICTS = {frozenset(("scale_lr", "switch_optimizer")), frozenset(("swap_activation", "reinit"))}


def combine(first: Candidate, second: Candidate) -> Candidate | None:
    """The pair of two candidates, or None when they change the same thing.

    Two candidates conflict when they share a change kind, or when one scales the LR of the
    optimizer the other replaces, or one re-initialises layers the other swaps the activation of
    (the swap brings its own init).

    Args:
        first: The better candidate.
        second: The other.

    Returns:
        A candidate with both sets of changes, named ``"first + second"``.
    """
    kinds_a, kinds_b = set(first.kinds), set(second.kinds)
    if kinds_a & kinds_b:
        return None
    if any(frozenset((a, b)) in _CONFLICTS for a in kinds_a for b in kinds_b):
        return None
    return Candidate(f"{first.name} + {second.name}", first.changes + second.changes,
                     tuple(dict.fromkeys(first.because + second.because)))
