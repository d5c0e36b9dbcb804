"""What the doctor knows about a model, in no framework's terms: its weight layers in forward
order, the nonlinearity after each, their initial numbers, and the optimizer.

An adapter (``gradwatch.integrations.torch.doctor``, ``gradwatch.integrations.keras.doctor``)
fills a :class:`ModelDescription` from the model object and a few forward passes; the causes
(:mod:`gradwatch.doctor.causes`) are read from it. The two measurements of an activation are
defined here, once, so both frameworks measure the same thing:

* **saturation**: the share of pre-activations in the activation's *flat tails*, where its slope
  is below a tenth of its maximum (``|z| > 3.64`` for the sigmoid, ``|z| > 1.82`` for tanh);
* **slope**: the mean slope over the pre-activations, relative to the activation's maximum slope
  (the sigmoid's is 0.25: a stack of sigmoid layers multiplies the backward signal by at most
  0.25 per layer whatever the saturation, which is why it vanishes).

The reference initialisation scales (:func:`expected_std`) are He et al. 2015 for the ReLU
family, LeCun et al. 1998 (also for SELU, Klambauer et al. 2017) for linear and SELU layers, and
Glorot & Bengio 2010 for sigmoid and tanh.

>>> import numpy as np
>>> stats = activation_stats(np.array([-8.0, -1.0, 0.0, 1.0, 8.0]), "sigmoid")
>>> round(stats["saturation"], 2), round(stats["slope"], 2)
(0.4, 0.52)
>>> round(expected_std("relu", fan_in=50, fan_out=10), 3)
0.2

References:
    Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
    networks", AISTATS 2010. He et al., "Delving Deep into Rectifiers", ICCV 2015. Klambauer et
    al., "Self-Normalizing Neural Networks", NeurIPS 2017.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gradwatch.jsonvalues import to_json

__all__ = [
    "ACTIVATIONS",
    "LAYER_KINDS",
    "RELU_FAMILY",
    "SATURATING",
    "LayerInfo",
    "ModelDescription",
    "activation_stats",
    "canonical_activation",
    "expected_std",
    "init_for",
]

LAYER_KINDS = ("dense", "conv", "recurrent", "embedding", "norm", "other")
"""What a weight layer is: ``dense`` (Linear, Dense), ``conv``, ``recurrent`` (RNN, LSTM, GRU),
``embedding``, ``norm`` (BatchNorm, LayerNorm, ...) or ``other``."""

SATURATING = ("sigmoid", "tanh", "hard_sigmoid")
"""Activations with flat tails on both sides."""

RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "silu", "relu6")
"""Activations that pass positive inputs about unchanged (He initialisation fits them)."""

ACTIVATIONS = (*SATURATING, *RELU_FAMILY, "selu", "softplus", "softmax", "linear", "other")
"""Canonical activation names (:func:`canonical_activation` maps framework names to these)."""

_ALIASES = {
    "logistic": "sigmoid", "hardsigmoid": "hard_sigmoid", "leakyrelu": "leaky_relu",
    "leaky_relu": "leaky_relu", "swish": "silu", "silu": "silu", "identity": "linear", "": "linear",
    "none": "linear", "relu6": "relu6", "hardtanh": "other", "tanh": "tanh", "sigmoid": "sigmoid",
}


def canonical_activation(name: str) -> str:
    """A framework's activation name (``"Sigmoid"``, ``"LeakyReLU"``, ``"swish"``) in the words
    of :data:`ACTIVATIONS`; ``"other"`` when unknown."""
    key = name.lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    return key if key in ACTIVATIONS else "other"


def _slope(z: np.ndarray, activation: str) -> np.ndarray:
    """The activation's derivative at ``z``, divided by its maximum."""
    if activation == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))
        return s * (1.0 - s) / 0.25
    if activation == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if activation == "hard_sigmoid":  # Keras 3: relu6(x + 3) / 6, slope 1/6 on (-3, 3)
        return ((z > -3.0) & (z < 3.0)).astype(float)
    if activation in RELU_FAMILY:
        return (z > 0).astype(float)
    return np.ones_like(z)


def activation_stats(pre_activations: Any, activation: str, *, unit_axis: int = -1) -> dict[str, float]:
    """Saturation and slope of an activation over measured pre-activations.

    Args:
        pre_activations: The activation's inputs on a few batches (any shape).
        activation: A name of :data:`ACTIVATIONS`.
        unit_axis: The axis that indexes units (features, channels): -1 for dense layers and
            channels-last convolutions, 1 for PyTorch convolutions. Defaults to -1.

    Returns:
        ``saturation`` (share of inputs where the slope is below a tenth of its maximum; for the
        ReLU family the share at or below zero), ``slope`` (mean slope relative to the maximum),
        ``std`` (standard deviation of the inputs) and ``dead`` (ReLU family: share of units
        whose input was <= 0 on every row; NaN otherwise).
    """
    z = np.asarray(pre_activations, dtype=np.float64)
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return {"saturation": math.nan, "slope": math.nan, "std": math.nan, "dead": math.nan}
    slope = _slope(finite, activation)
    dead = math.nan
    if activation in RELU_FAMILY and z.ndim >= 2:
        units = np.moveaxis(z, unit_axis, -1).reshape(-1, z.shape[unit_axis])
        dead = float(np.mean(np.all(~(units > 0), axis=0)))
    return {
        "saturation": float(np.mean(slope < 0.1)),
        "slope": float(np.mean(slope)),
        "std": float(np.std(finite)),
        "dead": dead,
    }


def init_for(activation: str) -> str:
    """The initialisation that fits an activation: ``"he"``, ``"lecun"`` or ``"glorot"``."""
    if activation in RELU_FAMILY:
        return "he"
    if activation in SATURATING:
        return "glorot"
    return "lecun"


def expected_std(activation: str, *, fan_in: int, fan_out: int) -> float:
    """The weight standard deviation the activation's reference initialisation gives.

    Args:
        activation: A name of :data:`ACTIVATIONS`.
        fan_in: Inputs per unit (``in_features``; ``in_channels * kernel area`` for convolutions).
        fan_out: Outputs per input.

    Returns:
        ``sqrt(2 / fan_in)`` (He), ``sqrt(2 / (fan_in + fan_out))`` (Glorot) or
        ``sqrt(1 / fan_in)`` (LeCun); NaN for a non-positive fan-in.
    """
    if fan_in <= 0:
        return math.nan
    scheme = init_for(activation)
    if scheme == "he":
        return math.sqrt(2.0 / fan_in)
    if scheme == "glorot":
        return math.sqrt(2.0 / (fan_in + max(fan_out, 1)))
    return math.sqrt(1.0 / fan_in)


@dataclass
class LayerInfo:
    """One weight layer, as the doctor sees it.

    Args:
        name: The layer's name as the framework names it (PyTorch module path, Keras layer name);
            the same name gradwatch's findings use.
        kind: One of :data:`LAYER_KINDS`.
        type_name: The framework's class name (``"Linear"``, ``"Dense"``, ``"Conv2d"``).
        fan_in: Inputs per unit. Defaults to 0 (unknown).
        fan_out: Outputs per input. Defaults to 0.
        weight_std: Standard deviation of the (input) weight at the start. Defaults to NaN.
        bias_mean: Mean of the bias at the start. Defaults to NaN (no bias).
        recurrent_gain: Recurrent layers: ``std(W_hh) * sqrt(hidden)``, about the spectral radius
            of a random recurrent matrix (above 1, the state grows step after step). Defaults to NaN.
        activation: The nonlinearity applied to this layer's output (:data:`ACTIVATIONS`;
            ``"linear"`` when none). Defaults to ``"linear"``.
        activation_site: Where it is applied: ``"fused"`` (Keras ``activation=``), ``"module:NAME"``
            (an activation layer or module of its own), ``"function:OWNER"`` (called inside
            ``OWNER.forward``: cannot be rewritten), or ``""`` (none). Defaults to "".
        saturation: Share of the activation's inputs in its flat tails (:func:`activation_stats`).
            Defaults to NaN (not measured).
        slope: Mean slope of the activation relative to its maximum. Defaults to NaN.
        dead_fraction: ReLU family: share of units inactive on every probe row. Defaults to NaN.
        followed_by_norm: A normalisation layer sits between this layer and its activation.
            Defaults to False.
        output: The model's last weight layer (its activation is the output's: never swapped).
            Defaults to False.
        sequence: The layer acts on ``(batch, time, features)`` inputs (LayerNorm, not BatchNorm,
            fits it). Defaults to False.
    """

    name: str
    kind: str
    type_name: str
    fan_in: int = 0
    fan_out: int = 0
    weight_std: float = math.nan
    bias_mean: float = math.nan
    recurrent_gain: float = math.nan
    activation: str = "linear"
    activation_site: str = ""
    saturation: float = math.nan
    slope: float = math.nan
    dead_fraction: float = math.nan
    followed_by_norm: bool = False
    output: bool = False
    sequence: bool = False

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"LayerInfo.kind must be one of {LAYER_KINDS}; received kind={self.kind!r}.")

    @property
    def init_ratio(self) -> float:
        """``weight_std`` over what the activation's reference initialisation gives (NaN if unknown)."""
        want = expected_std(self.activation, fan_in=self.fan_in, fan_out=self.fan_out)
        return self.weight_std / want if want and math.isfinite(want) and math.isfinite(self.weight_std) else math.nan

    @property
    def rewritable_activation(self) -> bool:
        """The activation can be swapped in a copy of the model (not one called inside ``forward``)."""
        return self.activation_site == "fused" or self.activation_site.startswith("module:")

    def to_dict(self) -> dict[str, Any]:
        return to_json(asdict(self))


@dataclass
class ModelDescription:
    """A model as the doctor sees it: weight layers in forward order, and the optimizer.

    Args:
        framework: ``"torch"`` or ``"keras/<backend>"``.
        model_type: The model's class name (``"Sequential"``, ``"Net"``).
        layers: The weight layers (and normalisation layers) in forward order.
        optimizer: The optimizer's class name (``"SGD"``, ``"Adam"``).
        adaptive: The optimizer scales each parameter's step by its own gradient history (Adam,
            RMSprop, ...), which plain SGD does not. Defaults to False.
        lr: The learning rate (first parameter group). Defaults to NaN.
        momentum: SGD momentum. Defaults to 0.0.
        weight_decay: Defaults to 0.0.
        clip_norm: A gradient clipping level already configured (Keras ``clipnorm`` /
            ``global_clipnorm``). Defaults to None.
        sequence_model: The model works on sequences (recurrent layers, embeddings, attention,
            3-D inputs to its dense layers). Defaults to False.
        rewritable: The model's structure can be rewritten in a copy (Keras Sequential and
            functional models; PyTorch modules whose children can be swapped or wrapped).
            Defaults to True.
        notes: What the adapter could not see or will not be able to change, for the report.
    """

    framework: str
    model_type: str
    layers: list[LayerInfo]
    optimizer: str
    adaptive: bool = False
    lr: float = math.nan
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float | None = None
    sequence_model: bool = False
    rewritable: bool = True
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerInfo | None:
        """The layer called ``name``, or None."""
        return next((layer for layer in self.layers if layer.name == name), None)

    @property
    def weight_layers(self) -> list[LayerInfo]:
        """Dense, convolutional and recurrent layers (not norms or embeddings)."""
        return [layer for layer in self.layers if layer.kind in ("dense", "conv", "recurrent")]

    @property
    def hidden_layers(self) -> list[LayerInfo]:
        """Weight layers other than the output layer."""
        return [layer for layer in self.weight_layers if not layer.output]

    @property
    def has_norm(self) -> bool:
        return any(layer.kind == "norm" for layer in self.layers) or any(layer.followed_by_norm for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "model_type": self.model_type,
            "optimizer": self.optimizer,
            "adaptive": self.adaptive,
            "lr": to_json(self.lr),
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "clip_norm": self.clip_norm,
            "sequence_model": self.sequence_model,
            "rewritable": self.rewritable,
            "notes": list(self.notes),
            "layers": [layer.to_dict() for layer in self.layers],
        }
