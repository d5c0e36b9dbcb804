"""Which parameter tensors a PyTorch model has, what each one is, and in what order.

:func:`build_layout` turns a model (and the optimizers that train it) into a :class:`TorchParams`:
the parameters gradwatch measures, in the order of ``model.named_modules()`` (registration order,
which for ordinary models is the forward order), and the :class:`gradwatch.Layout` the core judges
them by. Names are module paths (``"encoder.layers.0.linear1"``) plus the parameter name.

Roles come from the module that owns a parameter, not from its name: every parameter of an
``nn.Embedding``/``nn.EmbeddingBag`` is ``embedding`` (rows not looked up get zero gradient by
design), every parameter of a normalisation layer is ``norm``, a parameter whose name starts with
``bias`` is ``bias``, one whose name contains ``weight`` (or any other tensor of two or more
dimensions) is ``weight``, the rest ``other``.

The layout is built once per parameter set and reused every step: which parameters have a
gradient changes from step to step (``StepStats.has_grad``), the layout does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gradwatch.stats import Layout, attention_score_projection

NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(nn.modules.batchnorm, "_NormBase", None),
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
        getattr(nn, "SyncBatchNorm", None),
    )
    if t is not None
)
"""Module types whose parameters have the role ``norm`` (BatchNorm*, InstanceNorm*, LayerNorm,
GroupNorm, RMSNorm, SyncBatchNorm)."""

EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)

LayerNames = Callable[[str], str] | Mapping[str, str] | None
"""How layers are named: None (the ``named_modules`` path), a mapping from module path to a name
(paths not in it keep their path), or a function of the module path."""


@dataclass(eq=False)
class TorchParams:
    """The parameters gradwatch measures and the layout they are judged by.

    Attributes:
        layout: The core's :class:`gradwatch.Layout`, one entry per parameter, forward order.
        params: The parameters, in the same order.
        signature: What the set was built from (:func:`optimizer_signature`); :meth:`stale`
            compares against it.
        unit_rows: Per parameter, True when gradwatch counts its exactly-zero output rows
            (dead units): tensors of role ``weight`` with two or more dimensions.
    """

    layout: Layout
    params: tuple[torch.Tensor, ...]
    signature: tuple[int, ...]
    unit_rows: tuple[bool, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.unit_rows:
            self.unit_rows = tuple(
                role == "weight" and p.dim() >= 2 for role, p in zip(self.layout.roles, self.params)
            )

    def __len__(self) -> int:
        return len(self.params)

    def stale(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """True when the optimizers now hold another set of parameters (``add_param_group``)."""
        return optimizer_signature(optimizers) != self.signature


def optimizer_params(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Every parameter the optimizers update, each once, in param-group order."""
    seen: dict[int, torch.Tensor] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
    return list(seen.values())


def optimizer_signature(optimizers: Sequence[torch.optim.Optimizer]) -> tuple[int, ...]:
    """Identity and length of every param group's parameter list: changes when a group is added
    or a group's list is replaced or grown. Cheap enough to check every step."""
    return tuple(
        x for opt in optimizers for group in opt.param_groups for x in (id(group["params"]), len(group["params"]))
    )


def param_role(module: nn.Module, param_name: str, param: torch.Tensor) -> str:
    """The role of ``module``'s own parameter ``param_name``.

    Args:
        module: The module that owns the parameter directly.
        param_name: Its name within the module (``"weight"``, ``"bias_ih_l0"``).
        param: The parameter.

    Returns:
        One of ``"weight"``, ``"bias"``, ``"embedding"``, ``"norm"``, ``"other"``.
    """
    if isinstance(module, EMBEDDING_TYPES):
        return "embedding"
    if isinstance(module, NORM_TYPES):
        return "norm"
    lowered = param_name.lower()
    if lowered.startswith("bias"):
        return "bias"
    if "embed" in lowered:
        return "embedding"
    if "weight" in lowered or param.dim() >= 2:
        return "weight"
    return "other"


def _rename(path: str, names: LayerNames) -> str:
    if names is None:
        return path
    if callable(names):
        return str(names(path))
    return str(names.get(path, path))


def unwrap(model: nn.Module | None) -> nn.Module | None:
    """The user's own module inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel
    (``module``) wrappers, so that layer names are the user's module paths."""
    for _ in range(4):
        if model is None:
            return None
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


def build_layout(
    model: nn.Module | None,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    names: LayerNames = None,
) -> TorchParams:
    """Build the measured parameter set and its layout from a model and its optimizers.

    Parameters come in ``model.named_modules()`` order (of the module inside ``torch.compile``
    and DDP wrappers, whose prefixes would only clutter the names). With optimizers, only the parameters they
    update are measured (a frozen backbone left out of the optimizer is not watched), and
    parameters an optimizer holds that the model does not own are added at the end as
    ``optimizer{k}.param{i}`` with role ``other``. Without optimizers, every parameter of the model
    with ``requires_grad`` is measured.

    Args:
        model: The model. May be None when ``optimizers`` is given (names are then positional).
        optimizers: One optimizer or several. Defaults to None.
        names: How layers are named: None (the module path from ``named_modules``), a mapping from
            module path to a display name, or a function of the module path. Defaults to None.

    Returns:
        The parameters and their layout.

    Raises:
        ValueError: if there is no parameter to measure.

    Example:
        >>> import torch
        >>> from gradwatch.integrations.torch import build_layout
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        >>> tp = build_layout(model)
        >>> tp.layout.names, tp.layout.roles
        (('0.weight', '0.bias', '1.weight', '1.bias'), ('weight', 'bias', 'norm', 'norm'))
    """
    if optimizers is None:
        opts: list[torch.optim.Optimizer] = []
    elif isinstance(optimizers, torch.optim.Optimizer):
        opts = [optimizers]
    else:
        opts = list(optimizers)
    wanted = {id(p) for p in optimizer_params(opts)} if opts else None
    model = unwrap(model)

    entries: list[tuple[str, str, str, torch.Tensor]] = []  # name, layer, role, param
    seen: set[int] = set()
    if model is not None:
        for path, module in model.named_modules(remove_duplicate=True):
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue  # tied weights: measured once, under the first owner
                if wanted is None and not p.requires_grad:
                    continue
                if wanted is not None and id(p) not in wanted:
                    continue
                seen.add(id(p))
                layer = _rename(path, names) if path else pname
                name = f"{path}.{pname}" if path else pname
                role = param_role(module, pname, p)
                if role in ("weight", "bias") and attention_score_projection(name):
                    role = "other"  # scaled by the attention softmax, not by depth
                entries.append((name, layer, role, p))
    for k, opt in enumerate(opts):
        i = 0
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    name = f"optimizer{k}.param{i}"
                    role = "weight" if p.dim() >= 2 else "other"
                    entries.append((name, name, role, p))
                i += 1
    if not entries:
        raise ValueError(
            "gradwatch found no parameter to watch: the model has no parameter with requires_grad "
            "and the optimizer(s) hold none. Pass the model and the optimizer that trains it."
        )
    layout = Layout.from_names(
        [e[0] for e in entries],
        numel=[e[3].numel() for e in entries],
        roles=[e[2] for e in entries],
        layers=[e[1] for e in entries],
    )
    return TorchParams(layout=layout, params=tuple(e[3] for e in entries), signature=optimizer_signature(opts))


__all__ = [
    "EMBEDDING_TYPES",
    "NORM_TYPES",
    "LayerNames",
    "TorchParams",
    "build_layout",
    "optimizer_params",
    "optimizer_signature",
    "param_role",
    "unwrap",
]
