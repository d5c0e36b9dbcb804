"""The Keras 3 side of ``gradwatch doctor``: describe a model, rewrite a copy, run the trials.

* **Describe**: every weight layer (``Dense``, ``Conv*``, recurrent, ``Embedding``, norms) with
  its activation, fused (``activation="sigmoid"``) or an ``Activation``/``ReLU`` layer after it,
  and the activation's inputs on a few cached batches (a fused activation's inputs are the
  layer's own output before the activation, computed by a linear copy of the layer).
* **Rewrite** the model from its layers' configs: ``Sequential`` models are rebuilt from the list
  of layers, functional models with ``keras.models.clone_model(clone_function=...,
  call_function=...)``. An activation is swapped in the config (``activation=``, or the
  ``Activation`` layer), with the initializer that fits it; a norm layer named ``<layer>_bn`` goes
  after the layer and before its activation (a fused activation moves to an ``Activation`` layer
  ``<layer>_act``). Every layer left unchanged starts from the factory model's initial weights.
  The optimizer is rebuilt from the factory's config (LR scaled, ``global_clipnorm`` set) or
  replaced by Adam/AdamW; loss and metrics come from the compile config.
* **Trial**: ``model.fit`` on the cached batches in one fixed order, one epoch, with the
  ``GradWatch(policy="observe", strict=True)`` callback and one that records each batch's loss
  (from the running mean Keras reports) and stops a hopeless trial.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
from gradwatch.errors import BadTargetError, GradwatchError, require

require("keras", "keras")

import keras  # noqa: E402

from .callback import GradWatch  # noqa: E402
from .layout import NORM_LAYERS  # noqa: E402

__all__ = ["KerasDoctor"]

PROBE_BATCHES = 3
RATIO_STEPS = 5
_INITIALIZERS = {"he": "he_normal", "lecun": "lecun_normal", "glorot": "glorot_normal", "orthogonal": "orthogonal"}
_ACTIVATION_LAYERS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu", "Softmax": "softmax"}
_PASS_THROUGH = ("Dropout", "AlphaDropout", "GaussianDropout", "SpatialDropout1D", "SpatialDropout2D", "Identity")
_RECURRENT = ("SimpleRNN", "LSTM", "GRU")


def _numpy(value: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def _kind(layer: Any) -> str | None:
    names = [cls.__name__ for cls in type(layer).__mro__]
    if any(n in NORM_LAYERS for n in names):
        return "norm"
    if "Dense" in names or "EinsumDense" in names:
        return "dense"
    if "BaseConv" in names or any(n.startswith("Conv") and n[4:5].isdigit() for n in names):
        return "conv"
    if any(n in _RECURRENT for n in names):
        return "recurrent"
    if "Embedding" in names:
        return "embedding"
    return None


def _activation_name(fn: Any) -> str:
    if fn is None:
        return "linear"
    try:
        name = keras.activations.serialize(fn)
    except Exception:
        name = getattr(fn, "__name__", "other")
    if isinstance(name, dict):
        name = name.get("config", {}).get("name", name.get("class_name", "other")) if isinstance(name.get("config"), dict) else name.get("class_name", "other")
    return canonical_activation(str(name))


def _flat_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not _kind(layer):
            out += _flat_layers(layer)
        elif type(layer).__name__ != "InputLayer":
            out.append(layer)
    return out


def _is_functional(model: Any) -> bool:
    return any(cls.__name__ == "Functional" for cls in type(model).__mro__) and not isinstance(model, keras.Sequential)


def _consumers(model: Any, layer: Any, order: list[Any]) -> list[Any]:
    if isinstance(model, keras.Sequential):
        i = order.index(layer)
        return order[i + 1:i + 2]
    return [node.operation for node in getattr(layer, "_outbound_nodes", []) if getattr(node, "operation", None) is not None]


def _take(x: Any, index: np.ndarray) -> Any:
    if isinstance(x, dict):
        return {k: _take(v, index) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, index) for v in x)
    return np.asarray(x)[index]


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return np.concatenate([_numpy(p) for p in parts], 0)


def _rows(x: Any) -> int:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    elif isinstance(x, (list, tuple)):
        x = x[0]
    return int(np.shape(x)[0])


def _short(cfg: Any) -> str:
    if isinstance(cfg, dict):
        return str(cfg.get("class_name", cfg))
    return str(cfg)


def _definition(class_name: str, cfg: dict[str, Any]) -> str:
    """A layer as the line that defines it: ``Dense(32, activation="relu", name="dense_1")``."""
    args = []
    for key in ("units", "filters", "kernel_size", "rate"):
        if key in cfg:
            args.append(repr(tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]))
    if cfg.get("activation") not in (None, "linear"):
        args.append(f"activation={cfg['activation']!r}")
    for key, default in (("kernel_initializer", "GlorotUniform"), ("recurrent_initializer", "Orthogonal"),
                         ("bias_initializer", "Zeros")):
        if key in cfg and _short(cfg[key]).lower().replace("_", "") != default.lower():
            args.append(f"{key}={_short(cfg[key])!r}")
    args.append(f"name={cfg.get('name')!r}")
    return f"keras.layers.{class_name}({', '.join(args)})"


def _optimizer_line(cfg: dict[str, Any]) -> str:
    inner = cfg["config"]
    keep = [f"learning_rate={_lr_text(inner.get('learning_rate'))}"]
    for key in ("momentum", "weight_decay", "global_clipnorm", "clipnorm"):
        value = inner.get(key)
        if value not in (None, 0, 0.0, False):
            keep.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value!r}")
    return f"keras.optimizers.{cfg['class_name']}({', '.join(keep)})"


def _lr_text(lr: Any) -> str:
    if isinstance(lr, (int, float)):
        return f"{float(lr):.4g}"
    if isinstance(lr, dict):
        return f"{lr.get('class_name', 'schedule')}(...)"
    return repr(lr)


class KerasDoctor:
    """The doctor's adapter for a compiled Keras 3 model and its data (see the module docstring).

    Args:
        spec: A validated Keras :class:`~gradwatch.CheckSpec` (``model``, ``x``, ``y``).
        seed: Seed set before every trial. Defaults to 0.
        device: A ``keras.device`` name to train on. Defaults to None.
        steps: Steps of each trial: this many batches are cached. Defaults to 60.
        origin: Who made the setup, for messages. Defaults to ``"the factory"``.

    Raises:
        BadTargetError: when the data yield no batch.
    """

    def __init__(self, spec: CheckSpec, *, seed: int | None = 0, device: str | None = None, steps: int = 60,
                 origin: str = "the factory") -> None:
        self.framework = f"keras/{keras.backend.backend()}"
        self.seed = seed
        self.device = device
        self.origin = origin
        self.model = spec.model
        self.x, self.y, self.batch_size = self._cache(spec, steps)
        if not self.model.built:
            self.model(_take(self.x, np.arange(min(2, _rows(self.x)))))
        self._weights = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in _flat_layers(self.model)}
        self._optimizer = keras.optimizers.serialize(self.model.optimizer)
        try:
            self._compile = self.model.get_compile_config() or {}
        except Exception:  # a custom loss that does not serialise: compile with the objects
            self._compile = {}
        self.description: ModelDescription | None = None

    def _cache(self, spec: CheckSpec, steps: int) -> tuple[Any, Any, int]:
        """``steps`` batches in one fixed order, concatenated (fit then reads them back in order)."""
        rng = np.random.RandomState(self.seed if self.seed is not None else 0)
        if spec.y is not None or hasattr(spec.x, "shape") or isinstance(spec.x, (dict, list, tuple)):
            n = _rows(spec.x)
            size = min(spec.batch_size or 32, n)
            per_epoch = n // size
            order = np.concatenate([rng.permutation(n)[:per_epoch * size] for _ in range(math.ceil(steps / per_epoch))])
            index = order[:steps * size]
            return _take(spec.x, index), (_take(spec.y, index) if spec.y is not None else None), size
        xs, ys = [], []
        for batch in itertools.islice(iter(spec.x), steps):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise BadTargetError(f"The dataset of {self.origin} must yield (x, y) batches; it yielded a {type(batch).__name__}.")
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise BadTargetError(f"The data of {self.origin} yielded no batch.")
        size = _rows(xs[0])
        keep = [i for i, b in enumerate(xs) if _rows(b) == size]
        return _concat([xs[i] for i in keep]), _concat([ys[i] for i in keep]), size

    # -- describe --------------------------------------------------------------------------------

    def describe(self) -> ModelDescription:
        """Layers, activations (measured on a few batches) and optimizer of the factory's model."""
        model = self.model
        order = _flat_layers(model)
        layers: dict[str, LayerInfo] = {}
        probes: dict[str, tuple[Any, str, str]] = {}  # weight layer -> (layer whose input to read, activation, how)
        for layer in order:
            kind = _kind(layer)
            if kind is None:
                continue
            info = LayerInfo(layer.name, kind, type(layer).__name__)
            cell = getattr(layer, "cell", layer)
            kernel = getattr(cell, "kernel", None) if kind != "embedding" else getattr(layer, "embeddings", None)
            if kernel is not None and kind != "norm":
                w = _numpy(kernel)
                field = int(np.prod(w.shape[:-2])) if w.ndim > 2 else 1
                info.fan_in = int(w.shape[-2]) * field if w.ndim >= 2 else 0
                info.fan_out = int(w.shape[-1]) * field if w.ndim >= 2 else 0
                info.weight_std = float(w.std())
            bias = getattr(cell, "bias", None)
            if bias is not None and kind != "norm":
                info.bias_mean = float(_numpy(bias).mean())
            if kind == "recurrent":
                units = int(cell.units)
                info.fan_out = units
                info.recurrent_gain = float(_numpy(cell.recurrent_kernel).std()) * math.sqrt(units)
                info.activation = _activation_name(getattr(cell, "activation", None))
            if kind in ("dense", "conv"):
                fused = _activation_name(getattr(layer, "activation", None))
                if fused != "linear":
                    info.activation, info.activation_site = fused, "fused"
                    probes[layer.name] = (layer, fused, "fused")
                else:
                    self._follow(model, layer, order, info, probes)
                with contextlib.suppress(AttributeError, ValueError):  # a layer called more than once has no single input
                    info.sequence = len(layer.input.shape) >= 3 and kind == "dense"
            layers[layer.name] = info
        weight_layers = [i for i in layers.values() if i.kind in ("dense", "conv", "recurrent")]
        if weight_layers:
            weight_layers[-1].output = True
        notes = self._probe(model, order, layers, probes)
        opt = model.optimizer
        inner = self._optimizer.get("config", {})
        lr = inner.get("learning_rate")
        clip = inner.get("global_clipnorm") or inner.get("clipnorm")
        self.description = ModelDescription(
            framework=self.framework, model_type=type(model).__name__, layers=list(layers.values()),
            optimizer=type(opt).__name__, adaptive=type(opt).__name__ not in ("SGD",),
            lr=float(lr) if isinstance(lr, (int, float)) else float(_numpy(opt.learning_rate)),
            momentum=float(inner.get("momentum") or 0.0), weight_decay=float(inner.get("weight_decay") or 0.0),
            clip_norm=float(clip) if clip else None,
            sequence_model=any(i.kind in ("recurrent", "embedding") or i.sequence for i in layers.values())
            or any("Attention" in type(layer).__name__ for layer in order),
            rewritable=isinstance(model, keras.Sequential) or _is_functional(model), notes=notes,
        )
        if not self.description.rewritable:
            self.description.notes.append(f"{type(model).__name__} is a subclassed keras.Model: its layers cannot be "
                                          "rewritten in a copy (the changes are printed instead)")
        return self.description

    def _follow(self, model: Any, layer: Any, order: list[Any], info: LayerInfo, probes: dict[str, tuple[Any, str, str]]) -> None:
        """Find the activation after ``layer`` through norms and dropouts."""
        current = layer
        for _ in range(4):
            after = _consumers(model, current, order)
            if len(after) != 1:
                return
            nxt = after[0]
            name = type(nxt).__name__
            if _kind(nxt) == "norm" or name in _PASS_THROUGH:
                info.followed_by_norm = info.followed_by_norm or _kind(nxt) == "norm"
                current = nxt
                continue
            if name == "Activation":
                activation = _activation_name(nxt.activation)
            elif name in _ACTIVATION_LAYERS:
                activation = _ACTIVATION_LAYERS[name]
            else:
                return
            info.activation, info.activation_site = activation, f"module:{nxt.name}"
            probes[layer.name] = (nxt, activation, "input")
            return

    def _probe(self, model: Any, order: list[Any], layers: dict[str, LayerInfo], probes: dict[str, tuple[Any, str, str]]) -> list[str]:
        if not probes:
            return []
        x = _take(self.x, np.arange(min(_rows(self.x), PROBE_BATCHES * self.batch_size)))
        try:
            if isinstance(model, keras.Sequential):
                seen: dict[str, Any] = {}
                h: Any = x
                for layer in order:
                    seen[layer.name] = h
                    h = layer(h, training=False)
            else:
                wanted = list(dict.fromkeys(p[0].name for p in probes.values()))
                extractor = keras.Model(model.inputs, [model.get_layer(n).input for n in wanted])
                outs = extractor([x] if not isinstance(x, (dict, list, tuple)) else x, training=False)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                seen = dict(zip(wanted, outs))
        except Exception as exc:
            return [f"the activations could not be measured ({type(exc).__name__}: {exc})"]
        for name, (layer, activation, how) in probes.items():
            z = seen[layer.name]
            if how == "fused":
                cfg = layer.get_config()
                cfg["activation"] = "linear"
                linear = type(layer).from_config(cfg)
                linear.build(tuple(z.shape))
                linear.set_weights(layer.get_weights())
                z = linear(z)
            stats = activation_stats(_numpy(z), activation, unit_axis=-1)
            info = layers[name]
            info.saturation, info.slope, info.dead_fraction = stats["saturation"], stats["slope"], stats["dead"]
        return []

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
        """A subclassed model cannot be rewritten: its structural changes are returned as code."""
        structural = [c for c in candidate.changes if isinstance(c, (SwapActivation, InsertNorm, Reinit))]
        if structural and not (isinstance(self.model, keras.Sequential) or _is_functional(self.model)):
            lines = [f"# in {type(self.model).__name__}.__init__ / call():"]
            lines += [f"#   {c.describe()}" for c in structural]
            return (f"{type(self.model).__name__} is a subclassed keras.Model, whose layers a copy cannot rewrite",
                    "\n".join(lines))
        return "", ""

    def _plan(self, candidate: Candidate | None) -> tuple[dict[str, dict[str, Any]], dict[str, list[Any]], set[str], list[str]]:
        """Config edits per layer, layers to insert after a layer, layers to re-initialise, snippet."""
        edits: dict[str, dict[str, Any]] = {}
        insert: dict[str, list[Any]] = {}
        fresh: set[str] = set()
        lines: list[str] = []
        layers = {layer.name: layer for layer in _flat_layers(self.model)}
        for change in candidate.ordered() if candidate is not None else ():
            if isinstance(change, (SwapActivation, Reinit)):
                for name in change.layers:
                    info = self._info(name)
                    edit = edits.setdefault(name, {})
                    edit["kernel_initializer"] = _INITIALIZERS["glorot" if change.init == "orthogonal" else change.init]
                    edit["bias_initializer"] = "zeros"
                    if info.kind == "recurrent" and change.init == "orthogonal":
                        edit["recurrent_initializer"] = "orthogonal"
                    fresh.add(name)
                    if isinstance(change, SwapActivation):
                        if info.activation_site == "fused":
                            edit["activation"] = change.activation
                        elif info.activation_site.startswith("module:"):
                            site = info.activation_site.split(":", 1)[1]
                            edits.setdefault(site, {})["__replace__"] = change.activation
            elif isinstance(change, InsertNorm):
                for name in change.layers:
                    info = self._info(name)
                    if info.followed_by_norm or info.kind not in ("dense", "conv"):
                        continue
                    norm = "LayerNormalization" if change.norm == "layer" or info.sequence else "BatchNormalization"
                    new = [(norm, {"name": f"{name}_bn"})]
                    if info.activation_site == "fused":
                        act = edits.get(name, {}).get("activation", info.activation)
                        edits.setdefault(name, {})["activation"] = "linear"
                        new.append(("Activation", {"activation": act, "name": f"{name}_act"}))
                    insert[name] = new
        for name, edit in edits.items():
            layer = layers[name]
            cfg = layer.get_config()
            if "__replace__" in edit:
                lines += [f"- {_definition(type(layer).__name__, cfg)}",
                          f"+ {_definition('Activation', {'activation': edit['__replace__'], 'name': name})}"]
                continue
            new_cfg = {**cfg, **{k: v for k, v in edit.items()}}
            lines += [f"- {_definition(type(layer).__name__, cfg)}", f"+ {_definition(type(layer).__name__, new_cfg)}"]
            for cls, extra in insert.get(name, []):
                lines.append(f"+ {_definition(cls, extra)}")
        for name, extra_layers in insert.items():
            if name in edits:
                continue
            cfg = layers[name].get_config()
            lines.append(f"  {_definition(type(layers[name]).__name__, cfg)}")
            lines += [f"+ {_definition(cls, extra)}" for cls, extra in extra_layers]
        return edits, insert, fresh, lines

    def _build(self, candidate: Candidate | None) -> tuple[Any, list[str]]:
        edits, insert, fresh, lines = self._plan(candidate)
        model = self.model

        def clone(layer: Any) -> Any:
            cfg = layer.get_config()
            edit = edits.get(layer.name, {})
            if "__replace__" in edit:
                return keras.layers.Activation(edit["__replace__"], name=layer.name)
            cfg.update({k: v for k, v in edit.items()})
            return type(layer).from_config(cfg)

        def extras(name: str) -> list[Any]:
            return [getattr(keras.layers, cls)(**kwargs) for cls, kwargs in insert.get(name, [])]

        if isinstance(model, keras.Sequential):
            new_layers: list[Any] = []
            for layer in _flat_layers(model):
                new_layers.append(clone(layer))
                new_layers += extras(layer.name)
            shape = model.inputs[0].shape[1:] if getattr(model, "inputs", None) else np.shape(_take(self.x, np.arange(1)))[1:]
            rebuilt = keras.Sequential([keras.Input(shape=tuple(shape)), *new_layers], name=model.name)
        elif _is_functional(model):
            def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
                out = layer(*args, **kwargs)
                for extra in extras(layer.name):
                    out = extra(out)
                return out

            rebuilt = keras.models.clone_model(model, clone_function=clone, call_function=call)
        else:
            rebuilt = type(model).from_config(model.get_config())
            rebuilt(_take(self.x, np.arange(min(2, _rows(self.x)))))
        for layer in _flat_layers(rebuilt):
            weights = self._weights.get(layer.name)
            if layer.name in fresh or weights is None:
                continue
            if [tuple(w.shape) for w in layer.get_weights()] == [w.shape for w in weights]:
                layer.set_weights(weights)
        return rebuilt, lines

    def _compile_model(self, model: Any, candidate: Candidate | None) -> list[str]:
        cfg = copy.deepcopy(self._optimizer)
        changes = candidate.ordered() if candidate is not None else ()
        lines = []
        switch = next((c for c in changes if isinstance(c, SwitchOptimizer)), None)
        before = _optimizer_line(cfg)
        if switch is not None:
            cls = keras.optimizers.AdamW if switch.optimizer == "adamw" else keras.optimizers.Adam
            kwargs: dict[str, Any] = {"learning_rate": switch.lr}
            if switch.optimizer == "adamw":
                kwargs["weight_decay"] = switch.weight_decay or 4e-3
            optimizer = cls(**kwargs)
            cfg = keras.optimizers.serialize(optimizer)
        for change in changes:
            if isinstance(change, ScaleLR):
                lr = cfg["config"]["learning_rate"]
                if isinstance(lr, (int, float)):
                    cfg["config"]["learning_rate"] = float(lr) * change.factor
                elif isinstance(lr, dict) and "initial_learning_rate" in lr.get("config", {}):
                    lr["config"]["initial_learning_rate"] *= change.factor
                else:
                    raise ValueError(f"Cannot scale a learning rate of {type(lr).__name__}; give a float or a schedule "
                                     "with initial_learning_rate.")
            elif isinstance(change, ClipNorm):
                cfg["config"]["global_clipnorm"] = change.level
                cfg["config"]["clipnorm"] = None
        after = _optimizer_line(cfg)
        optimizer = keras.optimizers.deserialize(copy.deepcopy(cfg))
        if after != before:
            lines += [f"- optimizer={before}", f"+ optimizer={after}"]
        if self._compile:
            model.compile_from_config({**self._compile, "optimizer": keras.optimizers.serialize(optimizer)})
        else:
            model.compile(optimizer=optimizer, loss=self.model.loss)
        return lines

    def build(self, candidate: Candidate | None) -> Any:
        """A fresh, compiled copy of the model with ``candidate`` applied (None: unchanged),
        starting from the factory model's initial weights (re-initialised layers excepted)."""
        model, _ = self._build(candidate)
        self._compile_model(model, candidate)
        return model

    # -- trials ----------------------------------------------------------------------------------

    def trial(self, candidate: Candidate | None, *, steps: int, stop: Callable[[Sequence[float]], str] | None = None,
              progress: Callable[[int, int], None] | None = None) -> TrialResult:
        """Train a fresh copy, with ``candidate`` applied (None: the baseline), watched."""
        name = candidate.name if candidate is not None else "baseline"
        start = time.perf_counter()
        if self.seed is not None:
            seed_everything(self.seed)
            keras.utils.set_random_seed(self.seed)
        context = keras.device(self.device) if self.device else contextlib.nullcontext()
        with context:
            try:
                model, lines = self._build(candidate)
                lines += self._compile_model(model, candidate)
            except Exception as exc:
                return TrialResult(name, candidate, steps, seconds=time.perf_counter() - start,
                                   error=f"rewriting the model failed: {type(exc).__name__}: {exc}")
            total = min(steps, _rows(self.x) // self.batch_size)
            by_name = {layer.name: layer for layer in _flat_layers(model)}
            tracked = {info.name: by_name[info.name] for info in (self.description.weight_layers if self.description else [])
                       if info.name in by_name}
            recorder = _Recorder(total, stop, progress, tracked, start)
            watch = GradWatch(policy="observe", strict=True)
            error = ""
            try:
                model.fit(self.x, self.y, batch_size=self.batch_size, epochs=1, shuffle=False, verbose=0,
                          callbacks=[watch, recorder])
            except GradwatchError:
                raise
            except Exception as exc:
                error = f"step {len(recorder.losses)} raised {type(exc).__name__}: {exc}"
        report = watch.report()
        return TrialResult(
            name, candidate, total, losses=recorder.losses, report=report, seconds=time.perf_counter() - start,
            first_step_seconds=recorder.first, stopped=recorder.stopped, error=error, snippet="\n".join(lines),
            model=model, update_ratios=recorder.ratios(),
        )


class _Recorder(keras.callbacks.Callback):
    """Each batch's loss (from the running mean over equal batches), update ratios, early stop."""

    def __init__(self, steps: int, stop: Callable[[Sequence[float]], str] | None,
                 progress: Callable[[int, int], None] | None, tracked: dict[str, Any], start: float) -> None:
        super().__init__()
        self.steps, self.stop, self.progress, self.tracked, self.start = steps, stop, progress, tracked, start
        self.losses: list[float] = []
        self.stopped = ""
        self.first = 0.0
        self._mean = 0.0
        self._before: dict[str, np.ndarray] = {}
        self._ratios: dict[str, list[float]] = {n: [] for n in tracked}

    def _kernel(self, layer: Any) -> np.ndarray:
        sync = getattr(self.model, "jax_state_sync", None)
        if callable(sync):  # JAX: fit keeps the weights outside the variables between syncs
            sync()
        cell = getattr(layer, "cell", layer)
        return _numpy(cell.kernel)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if batch < RATIO_STEPS:
            self._before = {n: self._kernel(layer) for n, layer in self.tracked.items()}

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        mean = float(_numpy(logs.get("loss", math.nan)))
        k = len(self.losses)
        self.losses.append(mean * (k + 1) - self._mean * k if math.isfinite(mean) else mean)
        self._mean = mean
        if batch == 0:
            self.first = time.perf_counter() - self.start
        if self._before:
            for n, layer in self.tracked.items():
                before = self._before[n]
                norm = float(np.linalg.norm(before))
                self._ratios[n].append(float(np.linalg.norm(self._kernel(layer) - before)) / norm if norm > 0 else math.nan)
            self._before = {}
        if self.progress is not None:
            self.progress(len(self.losses), self.steps)
        reason = self.stop(self.losses) if self.stop is not None else ""
        if not reason and not math.isfinite(self.losses[-1]):
            reason = f"diverged: loss {self.losses[-1]} at step {k}"
        if reason:
            self.stopped = reason
            self.model.stop_training = True

    def ratios(self) -> dict[str, float]:
        out = {}
        for n, values in self._ratios.items():
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                out[n] = float(np.median(finite))
        return out
