"""Name the trainable variables of a Keras model the way Keras users know them.

``variable.path`` is not a stable layer name: a ``Sequential`` prefixes its own name
(``"sequential/dense/kernel"``), a functional model does not (``"dense/kernel"``) and an RNN puts
its cell in between (``"lstm/lstm_cell/kernel"``). The layer that owns a variable is what
``model.summary()`` shows, so the layout is built from the owning layer objects instead; an RNN's
cell variables belong to the RNN layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwatch.stats import Layout, attention_score_projection, guess_role, layer_of

NORM_LAYERS = (
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
    "UnitNormalization",
    "SyncBatchNormalization",
)
"""Class names whose variables (gamma, beta) play the ``norm`` role."""


def _owners(model: Any) -> dict[int, Any]:
    """Map ``id(variable)`` to the layer object that owns it (RNN cells map to their RNN)."""
    import keras

    owners: dict[int, Any] = {}
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    for layer in layers:
        for variable in getattr(layer, "_trainable_variables", []):
            owners.setdefault(id(variable), layer)
    for layer in layers:
        if isinstance(layer, keras.layers.RNN):
            for variable in layer.cell.trainable_variables:
                owners[id(variable)] = layer
    return owners


def _role(variable: Any, owner: Any) -> str:
    if owner is not None and any(cls.__name__ in NORM_LAYERS for cls in type(owner).__mro__):
        return "norm"
    if attention_score_projection(variable.path):
        return "other"  # scaled by the attention softmax, not by depth
    leaf = variable.name.rsplit("/", 1)[-1]
    if leaf == "bias":
        return "bias"
    if leaf == "embeddings":
        return "embedding"
    if leaf.endswith("kernel"):
        return "weight"
    return guess_role(variable.path)


def keras_layout(model: Any, variables: Sequence[Any]) -> Layout:
    """Build the :class:`~gradwatch.Layout` of a model's trainable variables.

    Args:
        model: The Keras model.
        variables: The variables the optimizer updates, in the optimizer's order (forward order
            for Sequential and functional models, attribute order for subclassed ones).

    Returns:
        The layout: names are ``variable.path``, layers the owning layers' names, roles
        ``weight`` (any kernel), ``bias``, ``embedding``, ``norm`` (normalisation layers) or
        ``other``.
    """
    owners = _owners(model)
    layer_names: list[str] = []
    owner_objects: list[Any] = []
    for variable in variables:
        owner = owners.get(id(variable))
        owner_objects.append(owner)
        layer_names.append(owner.name if owner is not None else layer_of(variable.path))
    # Two different layer objects with the same (user-given) name: fall back to paths for them.
    by_name: dict[str, set[int]] = {}
    for name, owner in zip(layer_names, owner_objects):
        by_name.setdefault(name, set()).add(id(owner))
    for i, (name, variable) in enumerate(zip(layer_names, variables)):
        if len(by_name[name]) > 1:
            layer_names[i] = layer_of(variable.path)
    return Layout(
        names=tuple(str(v.path) for v in variables),
        layers=tuple(layer_names),
        roles=tuple(_role(v, o) for v, o in zip(variables, owner_objects)),
        numel=tuple(int(np.prod(v.shape)) if len(v.shape) else 1 for v in variables),
    )
