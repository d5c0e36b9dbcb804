"""The PyTorch side of ``gradwatch doctor``: describe a module, rewrite a copy, run the trials.

* **Describe**: one probe on a few cached batches with a forward pre-hook and hook on every
  module (execution order, which module produced each tensor, the inputs of every activation
  module) and a :class:`torch.overrides.TorchFunctionMode` that sees activations *called* inside a
  ``forward`` (``torch.sigmoid(self.fc1(x))``): those are measured too, but marked as not
  rewritable.
* **Rewrite** a deep copy of the pristine model (taken before anything trained it): an activation
  module is swapped for another (the layer before it re-initialised to fit); a ``Linear``/``Conv``
  is wrapped as ``nn.Sequential(layer, norm)``, so its parent may be any module that calls it; a
  layer is re-initialised in place. The optimizer is a copy of the factory's (same class and
  hyperparameters), new parameters in a group with the first group's settings, or Adam/AdamW.
* **Trial**: the cached batches in the same order, ``zero_grad``, forward, ``backward``,
  ``clip_grad_norm_`` when the candidate clips, ``optimizer.step()``, watched by
  ``gradwatch.watch(model, optimizer, policy="observe", strict=True)``.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import re
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradwatch
from gradwatch.check.spec import CheckSpec
from gradwatch.check.targets import seed_everything
from gradwatch.doctor.model import (
    LayerInfo,
    ModelDescription,
    activation_stats,
    canonical_activation,
)
from gradwatch.doctor.repairs import (
    Candidate,
    ClipNorm,
    InsertNorm,
    Reinit,
    ScaleLR,
    SwapActivation,
    SwitchOptimizer,
)
from gradwatch.doctor.trials import TrialResult
from gradwatch.errors import BadTargetError

from .layout import NORM_TYPES

__all__ = ["TorchDoctor"]

ACTIVATION_TYPES: dict[type, str] = {
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.SELU: "selu", nn.Softplus: "softplus", nn.Hardsigmoid: "hard_sigmoid",
    nn.ReLU6: "relu6", nn.Softmax: "softmax", nn.LogSoftmax: "softmax",
}
_FUNCTIONS = {"sigmoid", "tanh", "relu", "gelu", "silu", "leaky_relu", "selu", "elu", "softplus", "hardsigmoid", "relu6"}
_PASS_THROUGH = (nn.Dropout, nn.Identity, nn.AlphaDropout)
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
_SEQUENCE = (nn.RNNBase, nn.Embedding, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_ADAPTIVE_NOT = (torch.optim.SGD, torch.optim.ASGD)
PROBE_BATCHES = 3
"""Cached batches the forward probe runs."""
RATIO_STEPS = 5
"""First steps whose update ratios ``||dW|| / ||W||`` are measured."""


def _new_activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "selu": nn.SELU(), "gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU(0.01),
            "tanh": nn.Tanh(), "elu": nn.ELU(), "silu": nn.SiLU(), "sigmoid": nn.Sigmoid()}[name]


def _expr(path: str) -> str:
    """``"features.3.conv"`` as Python: ``model.features[3].conv``."""
    out = "model"
    for part in path.split(".") if path else []:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _one_line(module: nn.Module) -> str:
    return re.sub(r"\s+", " ", repr(module)).replace("( ", "(").replace(" )", ")")


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[child] = new


def _fans(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        field = int(np.prod(module.kernel_size))
        return module.in_channels // module.groups * field, module.out_channels // module.groups * field
    if isinstance(module, _RECURRENT):
        return module.input_size, module.hidden_size
    return 0, 0


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "dense"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, _RECURRENT):
        return "recurrent"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, NORM_TYPES):
        return "norm"
    return None


def _main_weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight_ih_l0", None) if isinstance(module, _RECURRENT) else getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _to(value: Any, device: str | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value:
        return _first_tensor(value[0])
    return None


class _Probe(TorchFunctionMode):
    """Records, during one forward, who produced each tensor and what every activation saw."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.producer: dict[int, str] = {}
        self.source: dict[str, str | None] = {}
        self.order: list[str] = []
        self.sites: dict[tuple[str, str | None], str] = {}  # (site, producer) -> activation
        self.inputs: dict[tuple[str, str | None], list[torch.Tensor]] = {}
        self.ndim: dict[str, int] = {}
        self.keep: list[torch.Tensor] = []  # outputs stay alive, so their ids are not reused
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.stack.append(module)
        name = self.names.get(id(module), "")
        first = _first_tensor(args)
        if first is None:
            return
        self.source.setdefault(name, self.producer.get(id(first)))
        self.ndim.setdefault(name, first.dim())
        activation = next((a for t, a in ACTIVATION_TYPES.items() if type(module) is t), None)
        if activation is not None:
            key = (f"module:{name}", self.producer.get(id(first)))
            self.sites.setdefault(key, activation)
            self.inputs.setdefault(key, []).append(first.detach().float().cpu())

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        name = self.names.get(id(module), "")
        if _kind(module) is not None and name not in self.order:
            self.order.append(name)
        tensor = _first_tensor(output)
        if tensor is not None and not list(module.children()):
            self.producer[id(tensor)] = name
            self.keep.append(tensor)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "").rstrip("_")
        top = self.stack[-1] if self.stack else None
        inside_activation = top is not None and type(top) in ACTIVATION_TYPES
        if fname in _FUNCTIONS and not inside_activation and args and isinstance(args[0], torch.Tensor):
            key = (f"function:{type(top).__name__ if top is not None else 'forward'}.forward", self.producer.get(id(args[0])))
            self.sites.setdefault(key, canonical_activation(fname))
            self.inputs.setdefault(key, []).append(args[0].detach().float().cpu())
        return func(*args, **kwargs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TorchDoctor:
    """The doctor's adapter for a PyTorch setup (see the module docstring).

    Args:
        spec: A validated PyTorch :class:`~gradwatch.CheckSpec` (model, optimizer, batches, loss_fn).
        seed: Seed set before every trial. Defaults to 0.
        device: Where to train. Defaults to None (where the factory put the model).
        steps: Steps of each trial: this many batches are cached. Defaults to 60.
        origin: Who made the setup, for messages. Defaults to ``"the factory"``.

    Raises:
        BadTargetError: when the batches yield nothing or are not ``(inputs, targets)`` pairs.
    """

    framework = "torch"

    def __init__(self, spec: CheckSpec, *, seed: int | None = 0, device: str | None = None, steps: int = 60,
                 origin: str = "the factory") -> None:
        self.seed = seed
        self.device = device
        self.origin = origin
        self.loss_fn = spec.loss_fn
        self._pristine = copy.deepcopy((spec.model, spec.optimizer))
        self.batches = self._cache(spec.batches, steps)
        self.description: ModelDescription | None = None
        self._functional: dict[str, str] = {}

    def _cache(self, batches: Any, steps: int) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        while len(out) < steps:
            iterator = iter(batches)
            got = 0
            for batch in itertools.islice(iterator, steps - len(out)):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise BadTargetError(f"The batches of {self.origin} must be (inputs, targets) pairs; "
                                         f"batch {len(out)} is a {type(batch).__name__}.")
                out.append((_to(batch[0], self.device), _to(batch[1], self.device)))
                got += 1
            if iterator is batches or got == 0:
                break
        if not out:
            raise BadTargetError(f"The batches of {self.origin} yielded no batch; give at least one (inputs, targets).")
        return out

    # -- describe --------------------------------------------------------------------------------

    def describe(self) -> ModelDescription:
        """Layers, activations (measured on a few batches) and optimizer of the pristine model."""
        model, optimizer = copy.deepcopy(self._pristine)
        if self.device:
            model.to(self.device)
        probe = _Probe(model)
        try:
            with torch.no_grad(), probe:
                for inputs, _ in self.batches[:PROBE_BATCHES]:
                    _forward(model, inputs)
        finally:
            probe.remove()
        modules = dict(model.named_modules())
        layers: dict[str, LayerInfo] = {}
        for name in probe.order:
            module = modules[name]
            kind = _kind(module)
            assert kind is not None
            fan_in, fan_out = _fans(module)
            weight = _main_weight(module)
            bias = getattr(module, "bias_ih_l0" if isinstance(module, _RECURRENT) else "bias", None)
            info = LayerInfo(name, kind, type(module).__name__, fan_in, fan_out,
                             weight_std=float(weight.detach().float().std()) if weight is not None and weight.numel() > 1 else math.nan,
                             bias_mean=float(bias.detach().float().mean()) if isinstance(bias, torch.Tensor) else math.nan,
                             sequence=probe.ndim.get(name, 2) >= 3 and kind == "dense")
            if isinstance(module, _RECURRENT):
                hh = getattr(module, "weight_hh_l0").detach().float()  # noqa: B009  (typed as Tensor | Module)
                info.recurrent_gain = float(hh.std()) * math.sqrt(module.hidden_size)
                info.activation = "tanh" if getattr(module, "nonlinearity", "tanh") == "tanh" else "relu"
            layers[name] = info
        for (where, producer), activation in probe.sites.items():
            target, normed = producer, False
            while target is not None and target in modules and isinstance(modules[target], (*NORM_TYPES, *_PASS_THROUGH)):
                normed = normed or isinstance(modules[target], NORM_TYPES)
                target = probe.source.get(target)
            if target is None or target not in layers or layers[target].kind not in ("dense", "conv"):
                continue
            info = layers[target]
            if info.activation_site:
                continue  # the first activation after a layer is its own
            seen = probe.inputs[(where, producer)]
            try:
                z = torch.cat(seen, 0).numpy()
            except RuntimeError:  # shapes differ between batches (sequence lengths): pool the values
                z = torch.cat([t.reshape(-1) for t in seen]).numpy()
            stats = activation_stats(z, activation, unit_axis=1 if info.kind == "conv" else -1)
            info.activation, info.activation_site = activation, where
            info.saturation, info.slope, info.dead_fraction = stats["saturation"], stats["slope"], stats["dead"]
            info.followed_by_norm = normed
        weight_layers = [info for info in layers.values() if info.kind in ("dense", "conv", "recurrent")]
        if weight_layers:
            weight_layers[-1].output = True
        group = optimizer.param_groups[0]
        lr = group.get("lr", math.nan)
        notes = []
        functional = [info for info in layers.values() if info.activation_site.startswith("function:")]
        if functional:
            notes.append(f"the activation after {', '.join(i.name for i in functional)} is called inside forward(): "
                         "it is measured, but a copy cannot swap it (the code change is printed instead)")
        self.description = ModelDescription(
            framework="torch", model_type=type(model).__name__, layers=list(layers.values()),
            optimizer=type(optimizer).__name__, adaptive=not isinstance(optimizer, _ADAPTIVE_NOT),
            lr=float(lr) if not isinstance(lr, torch.Tensor) else float(lr.item()),
            momentum=float(group.get("momentum", 0.0) or 0.0), weight_decay=float(group.get("weight_decay", 0.0) or 0.0),
            sequence_model=any(isinstance(m, _SEQUENCE) for m in modules.values()) or any(i.sequence for i in layers.values()),
            rewritable=True, notes=notes,
        )
        return self.description

    # -- rewrite ---------------------------------------------------------------------------------

    def _info(self, name: str) -> LayerInfo:
        if self.description is None:
            self.describe()
        assert self.description is not None
        info = self.description.layer(name)
        if info is None:
            raise ValueError(f"The model has no weight layer {name!r}; its layers are "
                             f"{[layer.name for layer in self.description.layers]}.")
        return info

    def applicable(self, candidate: Candidate) -> tuple[str, str]:
        """Swapping an activation called inside ``forward`` is not: the code change is returned."""
        for change in candidate.changes:
            if isinstance(change, SwapActivation):
                called = [self._info(n) for n in change.layers if self._info(n).activation_site.startswith("function:")]
                if called:
                    return (f"the activation after {', '.join(i.name for i in called)} is called inside "
                            f"{called[0].activation_site.split(':')[1]}, which a copy of the model cannot swap",
                            self._code_change(called, change))
        return "", ""

    def _code_change(self, layers: Sequence[LayerInfo], change: SwapActivation) -> str:
        model = self._pristine[0]
        old = {info.activation for info in layers}
        lines = [f"# in {type(model).__name__}.forward: {'/'.join(sorted(old))} -> {change.activation}"]
        try:
            source = textwrap.dedent(inspect.getsource(type(model).forward))
        except (OSError, TypeError):
            source = ""
        new_call = change.activation
        for line in source.splitlines():
            if any(re.search(rf"\b{name}\b", line) for name in old):
                edited = line
                for name in old:
                    edited = re.sub(rf"\btorch\.{name}\b", f"torch.nn.functional.{new_call}", edited)
                    edited = re.sub(rf"\b(F|functional)\.{name}\b", rf"\1.{new_call}", edited)
                    edited = re.sub(rf"\.{name}\(\)", f".{new_call}()", edited)
                lines += [f"- {line}", f"+ {edited}"]
        if len(lines) == 1:
            lines.append(f"- {'/'.join(sorted(old))}(...)  (where forward() applies it)")
            lines.append(f"+ torch.nn.functional.{new_call}(...)")
        lines += [self._init_line(info.name, change.init) for info in layers]
        return "\n".join(lines)

    @staticmethod
    def _init_line(name: str, scheme: str) -> str:
        weight = f"{_expr(name)}.weight"
        call = {"he": f"nn.init.kaiming_normal_({weight}, nonlinearity='relu')",
                "lecun": f"nn.init.kaiming_normal_({weight}, nonlinearity='linear')",
                "glorot": f"nn.init.xavier_normal_({weight})",
                "orthogonal": f"nn.init.orthogonal_({_expr(name)}.weight_hh_l0)"}[scheme]
        return f"+ {call}; nn.init.zeros_({_expr(name)}.bias)  # after building the model"

    @staticmethod
    def _init(module: nn.Module, scheme: str) -> None:
        with torch.no_grad():
            for pname, param in module.named_parameters(recurse=False):
                if "bias" in pname:
                    nn.init.zeros_(param)
                elif isinstance(module, _RECURRENT):
                    if pname.startswith("weight_hh") and scheme == "orthogonal":
                        for k in range(0, param.shape[0], module.hidden_size):
                            nn.init.orthogonal_(param[k:k + module.hidden_size])
                    elif pname.startswith("weight_ih"):
                        nn.init.xavier_uniform_(param)
                elif param.dim() >= 2:
                    if scheme == "he":
                        nn.init.kaiming_normal_(param, nonlinearity="relu")
                    elif scheme == "lecun":
                        nn.init.kaiming_normal_(param, nonlinearity="linear")
                    else:
                        nn.init.xavier_normal_(param)

    def _norm_for(self, module: nn.Module, info: LayerInfo, norm: str) -> nn.Module:
        weight = _main_weight(module)
        if isinstance(module, nn.modules.conv._ConvNd):
            channels = module.out_channels
            if norm == "layer":
                new: nn.Module = nn.GroupNorm(1, channels)
            else:
                new = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(module.kernel_size)](channels)
        else:
            features = int(getattr(module, "out_features"))  # noqa: B009
            new = nn.LayerNorm(features) if norm == "layer" or info.sequence else nn.BatchNorm1d(features)
        return new.to(weight.device if weight is not None else "cpu")

    def _rewrite(self, model: nn.Module, candidate: Candidate) -> list[str]:
        """Apply the structural changes to ``model`` in place; returns the snippet's lines."""
        modules = dict(model.named_modules())
        lines: list[str] = []
        for change in candidate.ordered():
            if isinstance(change, SwapActivation):
                for name in change.layers:
                    info = self._info(name)
                    site = info.activation_site.split(":", 1)[1]
                    new = _new_activation(change.activation)
                    lines += [f"- {_expr(site)} = nn.{_one_line(modules[site])}", f"+ {_expr(site)} = nn.{_one_line(new)}"]
                    _set_module(model, site, new)
                    self._init(modules[name], change.init)
                    lines.append(self._init_line(name, change.init))
            elif isinstance(change, InsertNorm):
                for name in change.layers:
                    info = self._info(name)
                    if info.followed_by_norm or info.kind not in ("dense", "conv"):
                        continue
                    layer = modules[name]
                    norm = self._norm_for(layer, info, change.norm)
                    lines += [f"- {_expr(name)} = nn.{_one_line(layer)}",
                              f"+ {_expr(name)} = nn.Sequential(nn.{_one_line(layer)}, nn.{_one_line(norm)})"]
                    _set_module(model, name, nn.Sequential(layer, norm))
            elif isinstance(change, Reinit):
                for name in change.layers:
                    self._init(modules[name], change.init)
                    lines.append(self._init_line(name, change.init))
        return lines

    def _optimizer(self, model: nn.Module, template: torch.optim.Optimizer, candidate: Candidate | None) -> tuple[torch.optim.Optimizer, list[str]]:
        changes = candidate.ordered() if candidate is not None else ()
        switch = next((c for c in changes if isinstance(c, SwitchOptimizer)), None)
        old = type(template).__name__
        group = template.param_groups[0]
        if switch is not None:
            cls = torch.optim.AdamW if switch.optimizer == "adamw" else torch.optim.Adam
            kwargs: dict[str, Any] = {"lr": switch.lr}
            if switch.optimizer == "adamw":
                kwargs["weight_decay"] = switch.weight_decay or 1e-2
            args = ", ".join(f"{k}={v:g}" for k, v in kwargs.items())
            lines = [f"- optimizer = torch.optim.{old}(model.parameters(), lr={float(group['lr']):g}, ...)",
                     f"+ optimizer = torch.optim.{cls.__name__}(model.parameters(), {args})"]
            return cls(model.parameters(), **kwargs), lines
        optimizer = template
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        extra = [p for p in model.parameters() if id(p) not in held]
        if extra:
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": extra})
        lines = []
        for change in changes:
            if isinstance(change, ScaleLR):
                before = float(group["lr"])
                for g in optimizer.param_groups:
                    g["lr"] = g["lr"] * change.factor
                lines += [f"- optimizer = torch.optim.{old}(model.parameters(), lr={before:g}, ...)",
                          f"+ optimizer = torch.optim.{old}(model.parameters(), lr={before * change.factor:g}, ...)"]
        return optimizer, lines

    def build(self, candidate: Candidate | None) -> tuple[nn.Module, torch.optim.Optimizer, float | None]:
        """A fresh copy of the model and optimizer with ``candidate`` applied (None: unchanged).

        Args:
            candidate: The repair.

        Returns:
            ``(model, optimizer, clip_level)``: train it as the factory's setup, and clip the global
            norm at ``clip_level`` before every ``optimizer.step()`` when it is not None.
        """
        model, optimizer, clip, _, _ = self._build(candidate)
        return model, optimizer, clip

    def _build(self, candidate: Candidate | None) -> tuple[nn.Module, torch.optim.Optimizer, float | None, list[str], dict[str, torch.Tensor]]:
        model, template = copy.deepcopy(self._pristine)
        if self.device:
            model.to(self.device)
        modules = dict(model.named_modules())
        tracked = {info.name: w for info in (self.description.weight_layers if self.description else [])
                   if info.name in modules and (w := _main_weight(modules[info.name])) is not None}
        lines = self._rewrite(model, candidate) if candidate is not None else []
        optimizer, opt_lines = self._optimizer(model, template, candidate)
        clip = next((c.level for c in (candidate.changes if candidate else ()) if isinstance(c, ClipNorm)), None)
        if clip is not None:
            opt_lines += ["  loss.backward()", f"+ torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={clip:.3g})",
                          "  optimizer.step()"]
        return model, optimizer, clip, lines + opt_lines, tracked

    # -- trials ----------------------------------------------------------------------------------

    def trial(self, candidate: Candidate | None, *, steps: int, stop: Callable[[Sequence[float]], str] | None = None,
              progress: Callable[[int, int], None] | None = None) -> TrialResult:
        """Train a fresh copy, with ``candidate`` applied (None: the baseline), watched."""
        name = candidate.name if candidate is not None else "baseline"
        start = time.perf_counter()
        if self.seed is not None:
            seed_everything(self.seed)
        try:
            model, optimizer, clip, lines, tracked = self._build(candidate)
        except Exception as exc:
            return TrialResult(name, candidate, steps, seconds=time.perf_counter() - start,
                               error=f"rewriting the model failed: {type(exc).__name__}: {exc}")
        model.train()
        total = min(steps, len(self.batches))
        losses: list[float] = []
        ratios: dict[str, list[float]] = {n: [] for n in tracked}
        stopped = error = ""
        first = 0.0
        watch = gradwatch.watch(model, optimizer, policy="observe", strict=True)
        try:
            for step, (inputs, targets) in enumerate(self.batches[:total]):
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(_forward(model, inputs), targets)
                loss.backward()
                watch.record_loss(loss)
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                before = {n: w.detach().clone() for n, w in tracked.items()} if step < RATIO_STEPS else None
                optimizer.step()
                if before is not None:
                    with torch.no_grad():
                        for n, w in tracked.items():
                            base = float(before[n].norm())
                            ratios[n].append(float((w - before[n]).norm()) / base if base > 0 else math.nan)
                losses.append(float(loss.detach()))
                if step == 0:
                    first = time.perf_counter() - start
                if progress is not None:
                    progress(step + 1, total)
                stopped = stop(losses) if stop is not None else ""
                if not stopped and not math.isfinite(losses[-1]):
                    stopped = f"diverged: loss {losses[-1]} at step {step}"
                if stopped:
                    break
        except gradwatch.GradwatchError:
            raise
        except Exception as exc:
            error = f"step {len(losses)} raised {type(exc).__name__}: {exc}"
        finally:
            report = watch.report()
            watch.remove()
        finite = {n: [v for v in r if math.isfinite(v)] for n, r in ratios.items()}
        return TrialResult(
            name, candidate, total, losses=losses, report=report, seconds=time.perf_counter() - start,
            first_step_seconds=first, stopped=stopped, error=error,
            snippet="\n".join(lines), model=model, optimizer=optimizer,
            update_ratios={n: float(np.median(r)) for n, r in finite.items() if r},
        )
