"""The scalars every sink and callback logs, and the grouping of layers that keeps them few.

Per-layer values are *grouped and few*: :func:`group_layers` groups layers by their module path at
the deepest depth that yields at most ``max_groups`` groups, so a 200-tensor model logs about 8
per-layer curves, not 200. :func:`step_scalars` gives the scalar names every sink and callback uses
(``grad_norm/total``, ``grad_norm/<group>``, ``gradwatch/lr_factor``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradwatch.policy import Decision
    from gradwatch.stats import Layout, StepStats

__all__ = ["group_layers", "grouped_grad_norms", "step_scalars"]

_SEPARATOR = re.compile(r"[./]")


def group_layers(layer_names: Sequence[str], max_groups: int = 8) -> tuple[tuple[str, ...], np.ndarray]:
    """Group layers for logging: few groups, named by module path, in forward order.

    Layers are grouped by their top-level module (the name up to the first ``.`` or ``/``); then,
    while there is room for at most ``max_groups`` groups, the group with the most layers is split
    into its sub-modules (``bert`` into ``bert.embeddings``, ``bert.encoder.layer.0``, ...). When
    even the top level has more than ``max_groups`` modules (a long ``nn.Sequential``),
    consecutive ones are merged into ``max_groups`` runs named ``first..last``.

    Args:
        layer_names: Distinct layer names in forward order (``Layout.layer_names()``).
        max_groups: The most groups to return. Defaults to 8.

    Returns:
        The group names, and for each layer the index of its group.

    Raises:
        ValueError: if ``max_groups < 1``.

    Example:
        >>> group_layers(["enc.0", "enc.1", "dec.0", "head"], max_groups=4)
        (('enc.0', 'enc.1', 'dec', 'head'), array([0, 1, 2, 3]))
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1. Received max_groups={max_groups}.")
    names = list(layer_names)
    if not names:
        return (), np.zeros(0, dtype=np.int64)
    cuts = [[m.start() for m in _SEPARATOR.finditer(n)] + [len(n)] for n in names]

    def prefix(i: int, depth: int) -> str:
        return names[i][: cuts[i][min(depth, len(cuts[i])) - 1]]

    def split(members: list[int], depth: int) -> dict[str, list[int]]:
        kids: dict[str, list[int]] = {}
        for i in members:
            kids.setdefault(prefix(i, depth), []).append(i)
        return kids

    top = split(list(range(len(names))), 1)
    if len(top) > max_groups:
        distinct = list(top)
        buckets: dict[int, list[str]] = {}
        for k, g in enumerate(distinct):
            buckets.setdefault(k * max_groups // len(distinct), []).append(g)
        labels = [m[0] if len(m) == 1 else f"{m[0]}..{m[-1]}" for m in buckets.values()]
        bucket_of = {g: b for b, m in enumerate(buckets.values()) for g in m}
        return tuple(labels), np.array([bucket_of[prefix(i, 1)] for i in range(len(names))], dtype=np.int64)
    nodes: list[tuple[int, list[int]]] = [(1, m) for m in top.values()]  # (depth, layer indices)

    def split_one() -> bool:
        """Split the largest group that can be split within the budget; False if none can."""
        for node in sorted(nodes, key=lambda n: (-len(n[1]), n[1][0])):
            depth, members = node
            kids: dict[str, list[int]] = {}
            while len(kids) < 2 and max(len(cuts[i]) for i in members) > depth:
                depth += 1  # descend through single-child chains (bert.encoder -> .layer -> .0, .1)
                kids = split(members, depth)
            if len(kids) > 1 and len(nodes) - 1 + len(kids) <= max_groups:
                at = nodes.index(node)
                nodes[at : at + 1] = [(depth, m) for m in kids.values()]
                return True
        return False

    while len(nodes) < max_groups and split_one():
        pass
    nodes.sort(key=lambda n: n[1][0])
    index = np.zeros(len(names), dtype=np.int64)
    for position, (_, members) in enumerate(nodes):
        index[members] = position
    return tuple(prefix(m[0], d) for d, m in nodes), index


_GROUP_CACHE: dict[tuple[int, int], tuple[Layout, tuple[str, ...], np.ndarray]] = {}


def _groups_for(layout: Layout, max_groups: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Tensor -> group index for a layout, computed once per layout object."""
    key = (id(layout), max_groups)
    hit = _GROUP_CACHE.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1], hit[2]
    layer_names = layout.layer_names()
    groups, layer_group = group_layers(layer_names, max_groups)
    position = {name: i for i, name in enumerate(layer_names)}
    tensor_group = np.array([layer_group[position[layer]] for layer in layout.layers], dtype=np.int64)
    if len(_GROUP_CACHE) > 64:
        _GROUP_CACHE.clear()
    _GROUP_CACHE[key] = (layout, groups, tensor_group)
    return groups, tensor_group


def grouped_grad_norms(stats: StepStats, max_groups: int = 8) -> dict[str, float]:
    """The L2 gradient norm of each layer group (see :func:`group_layers`), forward order.

    Groups without any gradient this step (frozen, unused) are left out; a group holding a
    non-finite gradient has a non-finite norm.

    Args:
        stats: The step's statistics.
        max_groups: The most groups. Defaults to 8.

    Returns:
        ``{group: norm}``.
    """
    groups, tensor_group = _groups_for(stats.layout, max_groups)
    grad = np.where(stats.has_grad, stats.grad_norm, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = np.bincount(tensor_group, weights=grad * grad, minlength=len(groups))
    present = np.bincount(tensor_group, weights=stats.has_grad.astype(float), minlength=len(groups)) > 0
    return {g: float(np.sqrt(s)) for g, s, p in zip(groups, sums, present) if p}


def step_scalars(stats: StepStats, decision: Decision | None = None, max_groups: int = 8) -> dict[str, float]:
    """The scalars gradwatch logs for one step, under the names every sink and callback uses.

    * ``grad_norm/total``: the global gradient norm (unscaled, before any clipping).
    * ``grad_norm/<group>``: one per layer group (:func:`grouped_grad_norms`).
    * ``gradwatch/lr_factor``, ``gradwatch/clipped``, ``gradwatch/skipped``: the decision.
    * ``gradwatch/loss``: the loss gradwatch saw, when known.

    Args:
        stats: The step's statistics.
        decision: The decision for the step. Defaults to None (no decision scalars).
        max_groups: The most per-layer groups. Defaults to 8.

    Returns:
        ``{name: value}`` in a stable order.
    """
    scalars = {"grad_norm/total": stats.global_norm}
    for group, norm in grouped_grad_norms(stats, max_groups).items():
        scalars[f"grad_norm/{group}"] = norm
    if decision is not None:
        scalars["gradwatch/lr_factor"] = float(decision.lr_factor)
        scalars["gradwatch/clipped"] = float(decision.clip_norm is not None)
        scalars["gradwatch/skipped"] = float(decision.skip)
    if stats.loss is not None:
        scalars["gradwatch/loss"] = float(stats.loss)
    return scalars
