"""Causes: why this model's gradients go wrong, read from the findings of a short baseline run
and the model's own structure and numbers.

A finding says what the gradients did (``vanishing`` at layers 0, 2, 4); a cause says what in
this model makes them do it (its eight sigmoid layers, whose mean slope is 0.23 of the sigmoid's
0.25). The doctor first collects the run's *symptoms*: the kinds of its findings at ``warning`` or
above, and two of its own from the numbers of the run, ``stalled`` (the loss fell by less than
:data:`STALL_DROP` over the run) and ``diverged`` (the loss turned non-finite). Without a symptom
there is no cause: structure alone (a sigmoid, an unusual init) is not a diagnosis. With one,
every rule below that holds adds a :class:`Cause` naming its layers and evidence:

=========================  ===============================================================
cause                      rule
=========================  ===============================================================
``saturating_activation``  hidden layers use sigmoid/tanh, and the gradients vanish or the
                           loss stalls while the product of their mean slopes is at most
                           :data:`STACK_GAIN`, or one has at least :data:`SATURATED` of its
                           inputs in the flat tails
``init_scale``             a weight's std is below :data:`INIT_LOW` or above
                           :data:`INIT_HIGH` times what its activation's reference
                           initialisation gives, or a recurrent matrix's gain exceeds
                           :data:`RECURRENT_GAIN`
``dying_relu``             units of ReLU-family layers are dead (a ``dead_units`` finding, or
                           at least half of a layer's units inactive on every probe row)
``no_normalisation``       :data:`DEEP` or more hidden layers and not one normalisation layer,
                           and the gradients vanish or explode
``sgd_across_depth``       plain SGD, and the layers' median gradient norms span
                           :data:`DEPTH_SPAN` or more
``lr_too_high``            the first updates change a layer's weights by more than
                           :data:`UPDATE_HIGH` of their norm, or the run explodes or diverges
``lr_too_low``             the loss stalls and no layer's first updates reach
                           :data:`UPDATE_LOW` of its weights
``unclipped_norm``         the run explodes, spikes or diverges and nothing clips the norm
=========================  ===============================================================

>>> from gradwatch.doctor.model import LayerInfo, ModelDescription
>>> layers = [LayerInfo(f"fc{i}", "dense", "Linear", 32, 32, 0.1, activation="sigmoid",
...                     activation_site="module:act") for i in range(5)]
>>> layers[-1].output = True
>>> model = ModelDescription("torch", "Sequential", layers, "SGD", lr=0.1)
>>> [c.kind for c in diagnose(model, symptoms=("vanishing",))]
['saturating_activation', 'no_normalisation']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.doctor.model import RELU_FAMILY, SATURATING, ModelDescription, init_for
from gradwatch.jsonvalues import to_json

__all__ = [
    "CAUSE_KINDS",
    "DEEP",
    "DEPTH_SPAN",
    "INIT_HIGH",
    "INIT_LOW",
    "PRIORITY",
    "RECURRENT_GAIN",
    "SATURATED",
    "STACK_GAIN",
    "STALL_DROP",
    "UPDATE_HIGH",
    "UPDATE_LOW",
    "Cause",
    "diagnose",
    "loss_drop",
    "symptoms_of",
]

CAUSE_KINDS = (
    "saturating_activation", "init_scale", "dying_relu", "no_normalisation", "sgd_across_depth",
    "lr_too_high", "lr_too_low", "unclipped_norm",
)
"""The causes the doctor names."""

STACK_GAIN = 0.1
"""Bound on the backward gain of a stack's activations (the product of their mean slopes) at or
below which the activations explain vanishing gradients."""
SATURATED = 0.2
"""Share of an activation's inputs in its flat tails from which one layer is called saturated."""
INIT_LOW, INIT_HIGH = 0.3, 3.0
"""Weight std relative to the reference initialisation outside which the init does not fit.
PyTorch's default (``1/sqrt(3 fan_in)``, 0.41 of He's) and Keras' Glorot stay inside."""
RECURRENT_GAIN = 1.5
"""``std(W_hh) * sqrt(hidden)`` above which a recurrence amplifies its state at every step."""
DEEP = 4
"""Hidden weight layers from which a stack without normalisation counts as deep."""
DEPTH_SPAN = 1e3
"""Ratio of the largest to the smallest layer gradient norm that plain SGD cannot serve with one LR."""
UPDATE_HIGH = 1e-1
"""First updates larger than this share of a layer's weights: the LR is too high."""
UPDATE_LOW = 1e-4
"""First updates below this share of every layer's weights, with a stalled loss: the LR is too low."""
STALL_DROP = 0.05
"""A loss that fell by less than this share over the baseline run has stalled."""
_UPDATE_TARGET_HIGH, _UPDATE_TARGET_LOW = 3e-3, 1e-3
"""Update ratios the LR factors aim at: about 1e-3 of the weights per step is the usual rule of
thumb for healthy training (CS231n, "Neural Networks Part 3"); Adam at its default 1e-3 gives about
4e-3 on the benchmark's MLPs."""
_PRIMARY = ("diverged", "nonfinite", "exploding", "loss_spike", "dead_units", "vanishing", "stalled")
_UNSTABLE = ("lr_too_high", "unclipped_norm", "init_scale", "dying_relu", "saturating_activation",
             "no_normalisation", "sgd_across_depth", "lr_too_low")
PRIORITY: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("diverged", "nonfinite", "exploding", "loss_spike"), _UNSTABLE),
    # An LR whose first updates are a large share of the weights kills units: when it is
    # diagnosed, it is the root of the dead units and its repair is tried before theirs.
    "dead_units": ("lr_too_high", "dying_relu", "init_scale", "unclipped_norm", "no_normalisation",
                   "saturating_activation", "sgd_across_depth", "lr_too_low"),
    **dict.fromkeys(("vanishing", "stalled"), ("saturating_activation", "init_scale", "lr_too_low", "no_normalisation",
                                              "sgd_across_depth", "dying_relu", "lr_too_high", "unclipped_norm")),
}
"""The order causes are listed (and their repairs tried) in, by the run's primary symptom: the first
of diverged, nonfinite, exploding, loss_spike, dead_units, vanishing, stalled it shows. An unstable
run whose weights start too large (``init_scale`` above :data:`INIT_HIGH`, or a recurrent gain
above :data:`RECURRENT_GAIN`) has its init tried first."""
_CLIP_KINDS = ("exploding", "loss_spike", "nonfinite", "diverged")


@dataclass
class Cause:
    """Something in the model or its training setup that explains a symptom.

    Args:
        kind: One of :data:`CAUSE_KINDS`.
        layers: The layers it concerns, named as the framework names them (empty for the
            optimizer's causes).
        message: One line a person can act on.
        evidence: The numbers behind it.
        symptoms: The symptoms it explains (finding kinds, ``stalled``, ``diverged``).
        severity: ``"warning"`` or ``"info"``. Defaults to ``"warning"``.
    """

    kind: str
    layers: tuple[str, ...]
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    symptoms: tuple[str, ...] = ()
    severity: str = "warning"

    def __post_init__(self) -> None:
        if self.kind not in CAUSE_KINDS:
            raise ValueError(f"Cause.kind must be one of {CAUSE_KINDS}; received kind={self.kind!r}.")
        self.layers = tuple(self.layers)
        self.symptoms = tuple(self.symptoms)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "layers": list(self.layers),
                "message": self.message, "evidence": to_json(self.evidence), "symptoms": list(self.symptoms)}

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.message}"


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def loss_drop(losses: Sequence[float]) -> float:
    """How much the loss fell over a run: ``1 - last / first`` with ``first`` the mean of the
    first five losses and ``last`` the mean of the last fifth; NaN for fewer than 10 losses, -inf
    when the loss turned non-finite.

    >>> round(loss_drop([2.0] * 5 + [1.0] * 10), 2)
    0.5
    """
    if any(not math.isfinite(v) for v in losses):
        return -math.inf
    if len(losses) < 10:
        return math.nan
    first = float(np.mean(losses[:5]))
    last = float(np.mean(losses[-max(2, len(losses) // 5):]))
    return 1.0 - last / first if first > 0 else math.nan


def symptoms_of(finding_kinds: Iterable[str], losses: Sequence[float]) -> tuple[str, ...]:
    """The symptoms of a run: finding kinds (at ``warning`` or above), then ``diverged`` when the
    loss turned non-finite and ``stalled`` when it fell by less than :data:`STALL_DROP`."""
    out = list(dict.fromkeys(finding_kinds))
    drop = loss_drop(losses)
    if drop == -math.inf:
        out.append("diverged")
    elif math.isfinite(drop) and drop < STALL_DROP:
        out.append("stalled")
    return tuple(out)


def _round_decade(x: float) -> float:
    return float(10.0 ** round(math.log10(x)))


def _saturating(model: ModelDescription, symptoms: tuple[str, ...]) -> Cause | None:
    layers = [layer for layer in model.hidden_layers if layer.activation in SATURATING and layer.kind != "recurrent"]
    if not layers:
        return None
    saturated = [layer for layer in layers if math.isfinite(layer.saturation) and layer.saturation >= SATURATED]
    vanishing = bool({"vanishing", "stalled"} & set(symptoms))
    max_slope = {"sigmoid": 0.25, "tanh": 1.0, "hard_sigmoid": 1.0 / 6.0}
    gains = [max_slope[layer.activation] * (layer.slope if math.isfinite(layer.slope) else 1.0) for layer in layers]
    bound = float(np.prod(gains))
    if not ((vanishing and bound <= STACK_GAIN) or saturated):
        return None
    kinds = sorted({layer.activation for layer in layers})
    parts = [f"{len(layers)} hidden layer(s) use {'/'.join(kinds)} ({_names([layer.name for layer in layers])})"]
    if saturated:
        worst = max(saturated, key=lambda layer: layer.saturation)
        parts.append(f"{worst.saturation:.0%} of {worst.name}'s inputs sit in the flat tails")
    parts.append(f"their slopes multiply the backward signal by at most {bound:.1e} across the stack")
    return Cause(
        "saturating_activation", tuple(layer.name for layer in layers), "; ".join(parts) + ".",
        {"activations": {layer.name: layer.activation for layer in layers},
         "saturation": {layer.name: layer.saturation for layer in layers},
         "slope": {layer.name: layer.slope for layer in layers}, "backward_gain_bound": bound,
         "saturated_threshold": SATURATED},
        tuple(s for s in symptoms if s in ("vanishing", "stalled", "exploding")) or symptoms[:1],
    )


def _init_scale(model: ModelDescription, symptoms: tuple[str, ...]) -> Cause | None:
    off: dict[str, float] = {}
    gains: dict[str, float] = {}
    for layer in model.weight_layers:
        ratio = layer.init_ratio
        if math.isfinite(ratio) and not INIT_LOW <= ratio <= INIT_HIGH:
            off[layer.name] = ratio
        if math.isfinite(layer.recurrent_gain) and layer.recurrent_gain > RECURRENT_GAIN:
            gains[layer.name] = layer.recurrent_gain
    if not off and not gains:
        return None
    parts = []
    if off:
        name, ratio = max(off.items(), key=lambda kv: abs(math.log(kv[1])))
        worst = model.layer(name)
        assert worst is not None
        parts.append(
            f"the weights of {_names(list(off))} start at {ratio:.2g}x the std that "
            f"{init_for(worst.activation)} initialisation gives for their fan-in and activation "
            f"({worst.weight_std:.3g} in {name}, fan-in {worst.fan_in}, {worst.activation})"
        )
    if gains:
        name, gain = max(gains.items(), key=lambda kv: kv[1])
        parts.append(f"the recurrent matrix of {_names(list(gains))} has gain {gain:.2g} > {RECURRENT_GAIN} "
                     f"(std x sqrt(hidden), about its spectral radius): the state grows at every time step")
    layers = tuple(dict.fromkeys([*off, *gains]))
    return Cause("init_scale", layers, "; ".join(parts) + ".",
                 {"std_ratio": off, "recurrent_gain": gains, "bounds": [INIT_LOW, INIT_HIGH]},
                 symptoms)


def _dying(model: ModelDescription, symptoms: tuple[str, ...], dead_layers: Sequence[str]) -> Cause | None:
    names = [n for n in dead_layers if model.layer(n) is not None]
    probed = [layer.name for layer in model.hidden_layers
              if layer.activation in RELU_FAMILY and math.isfinite(layer.dead_fraction) and layer.dead_fraction >= 0.5]
    names = list(dict.fromkeys([*names, *probed]))
    if not names:
        return None
    biased = {n: layer.bias_mean for n in names if (layer := model.layer(n)) is not None and math.isfinite(layer.bias_mean)}
    dead = {n: layer.dead_fraction for n in names if (layer := model.layer(n)) is not None and math.isfinite(layer.dead_fraction)}
    parts = [f"units of {_names(names)} output exactly zero on every input"]
    negative = {n: b for n, b in biased.items() if b < -0.5}
    if negative:
        n, b = min(negative.items(), key=lambda kv: kv[1])
        parts.append(f"their biases start negative (mean {b:.2g} in {n})")
    if dead and max(dead.values()) >= 0.1:
        n, d = max(dead.items(), key=lambda kv: kv[1])
        parts.append(f"{d:.0%} of {n}'s units were already inactive on every probe row at the start")
    return Cause("dying_relu", tuple(names), "; ".join(parts) + ": a unit that never fires gets no gradient.",
                 {"bias_mean": biased, "dead_at_start": dead}, tuple(s for s in symptoms if s in ("dead_units", "stalled")) or symptoms[:1])


def _no_norm(model: ModelDescription, symptoms: tuple[str, ...]) -> Cause | None:
    hidden = model.hidden_layers
    if model.has_norm or len(hidden) < DEEP or not {"vanishing", "exploding"} & set(symptoms):
        return None
    norm = "LayerNorm" if model.sequence_model else "BatchNorm"
    return Cause("no_normalisation", tuple(layer.name for layer in hidden),
                 f"{len(hidden)} hidden layers and not one normalisation layer: nothing rescales the "
                 f"signal between layers ({norm} after {_names([layer.name for layer in hidden])} would).",
                 {"hidden_layers": len(hidden), "deep_from": DEEP},
                 tuple(s for s in symptoms if s in ("vanishing", "exploding")))


def _depth_span(model: ModelDescription, symptoms: tuple[str, ...], grad_norms: Mapping[str, float]) -> Cause | None:
    if model.adaptive:
        return None
    names = [layer.name for layer in model.weight_layers if layer.name in grad_norms]
    norms = {n: grad_norms[n] for n in names if math.isfinite(grad_norms[n]) and grad_norms[n] > 0}
    if len(norms) < 2:
        return None
    low, high = min(norms.items(), key=lambda kv: kv[1]), max(norms.items(), key=lambda kv: kv[1])
    span = high[1] / low[1]
    if span < DEPTH_SPAN:
        return None
    return Cause("sgd_across_depth", (low[0], high[0]),
                 f"plain {model.optimizer} gives every layer the same step size, but the gradient norms span "
                 f"{span:.1e} across depth ({low[1]:.2g} in {low[0]} to {high[1]:.2g} in {high[0]}): one LR "
                 "cannot fit both ends; an adaptive optimizer scales each parameter's step by its own gradients.",
                 {"span": span, "min": dict([low]), "max": dict([high]), "span_threshold": DEPTH_SPAN},
                 symptoms)


def _lr(model: ModelDescription, symptoms: tuple[str, ...], update_ratios: Mapping[str, float]) -> list[Cause]:
    ratios = {n: r for n, r in update_ratios.items() if math.isfinite(r)}
    out = []
    top = max(ratios.items(), key=lambda kv: kv[1]) if ratios else None
    if top is not None and top[1] > UPDATE_HIGH:
        factor = min(0.1, max(1e-3, _round_decade(_UPDATE_TARGET_HIGH / top[1])))
        out.append(Cause("lr_too_high", (top[0],),
                         f"the first updates change {top[0]}'s weights by {top[1]:.0%} of their norm per step "
                         f"(above {UPDATE_HIGH:.0%}): LR {model.lr:.3g} is too high for this model.",
                         {"update_ratio": ratios, "lr": model.lr, "factor": factor, "threshold": UPDATE_HIGH},
                         symptoms))
    elif {"exploding", "diverged", "nonfinite"} & set(symptoms) and not model.adaptive:
        out.append(Cause("lr_too_high", (), f"the run explodes or diverges under {model.optimizer} at LR {model.lr:.3g}; "
                         "a lower LR is the first thing to try.",
                         {"update_ratio": ratios, "lr": model.lr, "factor": 0.1}, symptoms, severity="info"))
    if top is not None and "stalled" in symptoms and top[1] < UPDATE_LOW:
        factor = min(1e3, max(10.0, _round_decade(_UPDATE_TARGET_LOW / max(top[1], 1e-12))))
        out.append(Cause("lr_too_low", (),
                         f"the loss stalls and the first updates change no layer's weights by more than "
                         f"{top[1]:.1e} of their norm (the most, in {top[0]}; below {UPDATE_LOW:.0e}): "
                         f"LR {model.lr:.3g} is too low.",
                         {"update_ratio": ratios, "lr": model.lr, "factor": factor, "threshold": UPDATE_LOW},
                         ("stalled",)))
    return out


def _clip(model: ModelDescription, symptoms: tuple[str, ...], global_norms: Sequence[float]) -> Cause | None:
    if model.clip_norm is not None or not set(_CLIP_KINDS) & set(symptoms):
        return None
    finite = _finite(global_norms)
    if not finite:
        return None
    level = float(np.median(finite[:3]))
    peak = max(finite)
    return Cause("unclipped_norm", (),
                 f"the global gradient norm reaches {peak:.3g}, {peak / level:.2g}x its {level:.3g} at the start, "
                 f"and nothing clips it: clipping at {level:.3g} keeps the steps at their starting size.",
                 {"level": level, "peak": peak}, tuple(s for s in symptoms if s in _CLIP_KINDS))


def diagnose(
    model: ModelDescription,
    *,
    symptoms: Sequence[str],
    dead_layers: Sequence[str] = (),
    grad_norms: Mapping[str, float] | None = None,
    update_ratios: Mapping[str, float] | None = None,
    global_norms: Sequence[float] = (),
) -> list[Cause]:
    """The causes that explain a run's symptoms.

    Args:
        model: The model's description.
        symptoms: The run's symptoms (:func:`symptoms_of`); none gives no cause.
        dead_layers: Layers named by ``dead_units`` findings. Defaults to ().
        grad_norms: Each layer's median gradient norm over the run. Defaults to None.
        update_ratios: Each layer's ``||W_after - W_before|| / ||W_before||`` over the first
            steps (median). Defaults to None.
        global_norms: The global gradient norm at each measured step. Defaults to ().

    Returns:
        The causes, the most direct explanation of the primary symptom first (:data:`PRIORITY`),
        ``info`` causes last.
    """
    symptoms = tuple(symptoms)
    if not symptoms:
        return []
    found: list[Cause | None] = [
        _saturating(model, symptoms),
        _init_scale(model, symptoms),
        _dying(model, symptoms, dead_layers),
        _no_norm(model, symptoms),
        _depth_span(model, symptoms, grad_norms or {}),
    ]
    found += _lr(model, symptoms, update_ratios or {})
    found.append(_clip(model, symptoms, global_norms))
    causes = [cause for cause in found if cause is not None]
    primary = next((s for s in _PRIMARY if s in symptoms), None)
    order = PRIORITY.get(primary or "", CAUSE_KINDS)
    if primary in ("diverged", "nonfinite", "exploding", "loss_spike") and any(_too_large(c) for c in causes):
        # Weights that start too large blow the forward pass up at step 0, whatever the LR: the
        # update ratios then look like an LR problem too. The init is the cause to try first.
        order = ("init_scale", *(kind for kind in order if kind != "init_scale"))
    return sorted(causes, key=lambda c: (c.severity != "warning", order.index(c.kind)))


def _too_large(cause: Cause) -> bool:
    return cause.kind == "init_scale" and (
        any(r > INIT_HIGH for r in cause.evidence.get("std_ratio", {}).values()) or bool(cause.evidence.get("recurrent_gain")))
