"""One optimizer step as a handful of small numpy arrays.

An adapter reduces the framework's gradients on the device to a few numbers per parameter tensor,
moves them to the host in one transfer, and wraps them in a :class:`StepStats`. Everything the core
judges is in here: nothing in ``gradwatch`` ever touches a framework tensor.

The per-tensor layout (names, layers, roles, sizes) rarely changes between steps, so it lives in a
separate, hashable :class:`Layout` that detectors size their state from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from gradwatch.jsonvalues import to_json

UNIT_STREAK = 10
"""Measured steps in a row with an exactly-zero gradient after which an adapter that follows
units one by one counts a unit as dead (:attr:`StepStats.dead_fraction`)."""

ROLES = ("weight", "bias", "embedding", "norm", "other")
"""The roles a parameter tensor can play. Detectors treat them differently: embedding rows that were
not looked up are not dead units, and normalisation scales are not compared across depth."""


@dataclass(frozen=True)
class Layout:
    """The parameter tensors a step reports on, in forward (input-to-output) order.

    Args:
        names: One name per parameter tensor, as the framework names it (``"encoder.0.weight"``).
        layers: The layer each tensor belongs to (``"encoder.0"``). Several tensors may share one.
        roles: One of :data:`ROLES` per tensor.
        numel: Number of elements per tensor.

    Raises:
        ValueError: if the sequences differ in length or a role is not in :data:`ROLES`.
    """

    names: tuple[str, ...]
    layers: tuple[str, ...]
    roles: tuple[str, ...]
    numel: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        for label, seq in (("layers", self.layers), ("roles", self.roles), ("numel", self.numel)):
            if len(seq) != n:
                raise ValueError(
                    f"Layout needs one entry per parameter tensor: {n} names but {len(seq)} {label}."
                )
        bad = sorted({r for r in self.roles if r not in ROLES})
        if bad:
            raise ValueError(f"Unknown parameter role(s) {bad}; expected one of {ROLES}.")

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        numel: Sequence[int] | None = None,
        roles: Sequence[str] | None = None,
        layers: Sequence[str] | None = None,
    ) -> Layout:
        """Build a layout from parameter names, guessing layers and roles from the names.

        ``"encoder.0.weight"`` belongs to layer ``"encoder.0"`` with role ``"weight"``; Keras-style
        paths (``"dense_1/kernel"``) work the same way. Adapters that know better pass ``roles`` and
        ``layers`` explicitly.

        Args:
            names: Parameter names.
            numel: Elements per tensor. Defaults to 1 each.
            roles: Roles. Defaults to a guess from the last path component.
            layers: Layer names. Defaults to the name without its last path component.

        Returns:
            The layout.
        """
        names = tuple(str(n) for n in names)
        layers_t = tuple(layers) if layers is not None else tuple(layer_of(n) for n in names)
        roles_t = tuple(roles) if roles is not None else tuple(guess_role(n) for n in names)
        numel_t = tuple(int(x) for x in numel) if numel is not None else (1,) * len(names)
        return cls(names, layers_t, roles_t, numel_t)

    def __len__(self) -> int:
        return len(self.names)

    def layer_names(self) -> tuple[str, ...]:
        """Distinct layer names in forward order."""
        return self._layer_names

    @cached_property
    def _layer_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.layers))

    @cached_property
    def layer_ids(self) -> np.ndarray:
        """Per tensor, the index of its layer in :meth:`layer_names`."""
        position = {name: i for i, name in enumerate(self._layer_names)}
        return np.array([position[layer] for layer in self.layers], dtype=np.int64)

    def role_mask(self, roles: Sequence[str]) -> np.ndarray:
        """Per tensor, True when its role is one of ``roles`` (cached; do not modify)."""
        key = ("mask", tuple(roles))
        if key not in self._cache:
            self._cache[key] = np.array([r in key[1] for r in self.roles], dtype=bool)
        return self._cache[key]

    @cached_property
    def _cache(self) -> dict:
        return {}

    def layers_with(self, roles: Sequence[str]) -> np.ndarray:
        """Indices (into :meth:`layer_names`) of the layers owning a tensor of one of ``roles``."""
        key = ("layers", tuple(roles))
        if key not in self._cache:
            self._cache[key] = np.unique(self.layer_ids[self.role_mask(roles)])
        return self._cache[key]

    @cached_property
    def membership(self) -> np.ndarray:
        """Boolean matrix (layers x tensors): True where a tensor belongs to a layer."""
        return self.layer_ids[None, :] == np.arange(len(self._layer_names))[:, None]

    def single_tensor_of(self, roles: Sequence[str]) -> np.ndarray | None:
        """Tensor indices, one per layer of :meth:`layers_with` ``(roles)``, when each of those
        layers owns exactly one tensor of ``roles`` (a Linear's weight, a Conv's kernel); else
        None. Lets per-layer reductions become plain indexing on the common case (cached)."""
        key = ("single", tuple(roles))
        if key not in self._cache:
            mask = self.role_mask(roles)
            counts = np.bincount(self.layer_ids[mask], minlength=len(self._layer_names))
            layers = self.layers_with(roles)
            single = bool(np.all(counts[layers] == 1))
            self._cache[key] = np.flatnonzero(mask) if single else None
        return self._cache[key]

    def per_layer_rss(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Root-sum-square of ``values`` per layer over the tensors where ``mask`` is True; NaN for
        layers with no such tensor. Indexed like :meth:`layer_names`.

        ``values`` may also be 2-D (k x tensors): k rows are reduced in one pass (k x layers).
        """
        n = len(self._layer_names)
        ids = self.layer_ids[mask]
        present = np.bincount(ids, minlength=n) > 0
        if values.ndim == 1:
            v = values[mask]
            return np.where(present, np.sqrt(np.bincount(ids, weights=v * v, minlength=n)), np.nan)
        k = values.shape[0]
        v = values[:, mask]
        stacked_ids = (ids[None, :] + n * np.arange(k)[:, None]).ravel()
        total = np.bincount(stacked_ids, weights=(v * v).ravel(), minlength=k * n).reshape(k, n)
        return np.where(present[None, :], np.sqrt(total), np.nan)

    def to_dict(self) -> dict[str, list]:
        return {
            "names": list(self.names),
            "layers": list(self.layers),
            "roles": list(self.roles),
            "numel": list(self.numel),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(tuple(d["names"]), tuple(d["layers"]), tuple(d["roles"]), tuple(d["numel"]))


ATTENTION_SCORE_PROJECTIONS = frozenset(
    ("query", "key", "q_proj", "k_proj", "query_proj", "key_proj", "q", "k", "wq", "wk", "q_lin", "k_lin",
     "to_q", "to_k")
)
"""Names of the layers that project queries and keys in attention (Keras ``MultiHeadAttention``,
Hugging Face BERT/LLaMA/DistilBERT, diffusers). Their gradients are scaled by how peaked the
attention softmax is — tiny while attention is near uniform, at initialisation and during warm-up —
not by depth, so their tensors take the role ``other`` and are not compared across depth."""


def attention_score_projection(name: str) -> bool:
    """True when ``name`` (a parameter path) belongs to an attention query or key projection."""
    parts = [p for p in re.split(r"[./]", name.lower()) if p]
    return len(parts) >= 2 and parts[-2] in ATTENTION_SCORE_PROJECTIONS


def layer_of(name: str) -> str:
    """The layer part of a parameter name: everything before its last ``.`` or ``/``."""
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else name


def guess_role(name: str) -> str:
    """Guess a tensor's role from its name (``bias``, ``embeddings``, ``gamma`` ...)."""
    lowered = name.lower()
    leaf = lowered.rsplit("/", 1)[-1].rsplit(".", 1)[-1].split(":")[0]
    if attention_score_projection(name.split(":")[0]):
        return "other"
    tokens = [t for t in re.split(r"[./:_]", lowered) if t]
    if any(t.startswith("emb") for t in tokens) or any(t in ("wte", "wpe") for t in tokens):
        return "embedding"
    if leaf in ("bias", "b", "beta") and not any(k in lowered for k in ("norm", "bn", "ln")):
        return "bias"
    if any(k in lowered for k in ("norm", "bn", "ln_", "layer_norm")) or leaf in ("gamma", "beta", "scale"):
        return "norm"
    if leaf in ("weight", "kernel", "w", "depthwise_kernel", "pointwise_kernel", "recurrent_kernel"):
        return "weight"
    if leaf.startswith("weight_") or leaf.endswith("_kernel"):
        return "weight"
    return "other"


def _vector(value: object, n: int, dtype: type, fill: float, label: str) -> np.ndarray:
    if value is None:
        return np.full(n, fill, dtype=dtype)
    arr: np.ndarray = np.asarray(value, dtype=dtype).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"StepStats.{label} needs one value per parameter tensor ({n}); got shape {arr.shape}.")
    return arr


@dataclass
class StepStats:
    """What gradwatch knows about one optimizer step.

    Arrays hold one entry per tensor of ``layout``, in the same order.

    Args:
        step: The optimizer step (0-based), counted by the adapter.
        layout: Names, layers, roles and sizes of the tensors.
        grad_norm: L2 norm of each gradient, on the scale the optimizer sees (unscaled under AMP).
            Non-finite when the gradient holds a NaN or Inf.
        param_norm: L2 norm of each parameter before the update. Defaults to NaN (unknown).
        nonfinite: Count of non-finite gradient values per tensor. Adapters may give only a 0/1 flag
            read off ``grad_norm`` (cheap); defaults to ``~isfinite(grad_norm)``.
        zero_fraction: Fraction of units (output rows or channels) whose gradient is exactly zero.
            NaN where not measured. Defaults to NaN.
        dead_fraction: Fraction of units whose gradient was exactly zero on each of the last
            :data:`UNIT_STREAK` measured steps that had any non-zero gradient, for adapters that
            follow units one by one (the same units every step: with batches of a sample or two,
            half of a ReLU layer's units are off on any one batch, a different half each time).
            NaN where not followed. Defaults to NaN.
        has_grad: False for tensors with no gradient this step (frozen or unused: None in PyTorch,
            missing in Keras). Their other entries are ignored. Defaults to all True.
        update_norm: L2 norm of the update applied to each tensor, when the adapter knows it.
            Defaults to NaN (unknown).
        loss: The training loss of the step; None when the adapter does not know it (a NaN loss is
            a NaN, not "unknown"). Defaults to None.
        lr: The learning rate in force, when known. Defaults to None.
        chance_loss: The loss of a model that has learnt nothing about its input, when the adapter
            knows the loss function: ``ln C`` for a C-class cross-entropy, ``ln 2`` for a binary
            one. Gives the loss an absolute scale from step 0. Defaults to None (unknown).
        null_loss: The loss of a model whose outputs are all zero, estimated from the targets of the
            run's first batches, when the adapter knows the loss function but it has no chance
            level: the mean squared target for a mean squared error. Judges the init's loss
            (a regression net whose outputs are far too large). Defaults to None (unknown).

    Raises:
        ValueError: if an array does not have one entry per tensor.

    Example:
        >>> from gradwatch import Layout, StepStats
        >>> layout = Layout.from_names(["fc1.weight", "fc1.bias"], numel=[12, 3])
        >>> s = StepStats(step=0, layout=layout, grad_norm=[0.5, 0.1], param_norm=[1.0, 0.2])
        >>> round(s.global_norm, 4)
        0.5099
    """

    step: int
    layout: Layout
    grad_norm: np.ndarray
    param_norm: np.ndarray = field(default=None)  # type: ignore[arg-type]
    nonfinite: np.ndarray = field(default=None)  # type: ignore[arg-type]
    zero_fraction: np.ndarray = field(default=None)  # type: ignore[arg-type]
    dead_fraction: np.ndarray = field(default=None)  # type: ignore[arg-type]
    has_grad: np.ndarray = field(default=None)  # type: ignore[arg-type]
    update_norm: np.ndarray = field(default=None)  # type: ignore[arg-type]
    loss: float | None = None
    lr: float | None = None
    chance_loss: float | None = None
    null_loss: float | None = None

    def __post_init__(self) -> None:
        n = len(self.layout)
        self.step = int(self.step)
        self.grad_norm = _vector(self.grad_norm, n, np.float64, np.nan, "grad_norm")
        self.params_measured = self.param_norm is not None
        self.param_norm = _vector(self.param_norm, n, np.float64, np.nan, "param_norm")
        self.zero_fraction = _vector(self.zero_fraction, n, np.float64, np.nan, "zero_fraction")
        self.dead_fraction = _vector(self.dead_fraction, n, np.float64, np.nan, "dead_fraction")
        self.update_norm = _vector(self.update_norm, n, np.float64, np.nan, "update_norm")
        if self.has_grad is None:
            self.has_grad = np.ones(n, dtype=bool)
        else:
            self.has_grad = _vector(self.has_grad, n, bool, True, "has_grad")
        if self.nonfinite is None:
            self.nonfinite = (~np.isfinite(self.grad_norm)).astype(np.int64)
        else:
            self.nonfinite = _vector(self.nonfinite, n, np.int64, 0, "nonfinite")
        self.nonfinite = np.where(self.has_grad, self.nonfinite, 0)
        self.loss = float(self.loss) if self.loss is not None else None
        self.lr = float(self.lr) if self.lr is not None else None
        self.chance_loss = float(self.chance_loss) if self.chance_loss is not None else None
        self.null_loss = float(self.null_loss) if self.null_loss is not None else None

    @cached_property
    def finite(self) -> bool:
        """True when every gradient that exists is finite."""
        bad = (self.nonfinite > 0) | ~np.isfinite(self.grad_norm)
        return not bool((bad & self.has_grad).any())

    @property
    def params_nonfinite(self) -> np.ndarray:
        """True per tensor whose parameters hold a NaN/Inf (always False when not measured, and
        for tensors without a gradient this step, whose norms adapters may leave unmeasured)."""
        if not self.params_measured:
            return np.zeros(len(self.layout), dtype=bool)
        return ~np.isfinite(self.param_norm) & self.has_grad

    @cached_property
    def global_norm(self) -> float:
        """L2 norm of all gradients together (what ``clip_grad_norm_`` clips); inf/NaN if any is."""
        g = np.where(self.has_grad, self.grad_norm, 0.0)
        return float(np.sqrt(g @ g))

    def layer_grad_norms(self, roles: Sequence[str] | None = None) -> dict[str, float]:
        """L2 norm of each layer's gradients (its tensors of the given roles), in forward order."""
        return _per_layer(self, self.grad_norm, roles)

    def layer_param_norms(self, roles: Sequence[str] | None = None) -> dict[str, float]:
        """L2 norm of each layer's parameters (its tensors of the given roles), in forward order."""
        return _per_layer(self, self.param_norm, roles)

    def to_dict(self) -> dict:
        """A JSON-friendly dict, numbers as everywhere in gradwatch (:mod:`gradwatch.jsonvalues`):
        NaN is None, infinities are ``"inf"`` / ``"-inf"``."""
        return to_json({
            "step": self.step,
            "layout": self.layout.to_dict(),
            "grad_norm": self.grad_norm.tolist(),
            "param_norm": self.param_norm.tolist(),
            "nonfinite": self.nonfinite.tolist(),
            "zero_fraction": self.zero_fraction.tolist(),
            "dead_fraction": self.dead_fraction.tolist(),
            "has_grad": self.has_grad.tolist(),
            "update_norm": self.update_norm.tolist(),
            "loss": self.loss,
            "lr": self.lr,
            "chance_loss": self.chance_loss,
            "null_loss": self.null_loss,
        })


def _per_layer(stats: StepStats, values: np.ndarray, roles: Sequence[str] | None) -> dict[str, float]:
    layout = stats.layout
    mask = stats.has_grad if roles is None else stats.has_grad & layout.role_mask(roles)
    rss = layout.per_layer_rss(values, mask)
    return {name: float(rss[i]) for i, name in enumerate(layout.layer_names()) if not np.isnan(rss[i])}
