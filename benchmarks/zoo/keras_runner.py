"""Everything Keras in the zoo: a :class:`~benchmarks.zoo.spec.RunSpec` made into a Keras 3
model, an optimizer and a learning-rate schedule, trained with ``model.fit`` unwatched with a
probe or watched by ``GradWatch`` — on whichever backend ``KERAS_BACKEND`` selects.

The same :class:`~benchmarks.zoo.evaluate.Runner` interface as :mod:`.torch_runner`
(``train(spec, mode)``, ``same_params(a, b)``), the same families, optimizers, schedules and
pathologies, written the way a Keras user writes them:

* the data is a ``keras.utils.PyDataset`` of the run's batches in order, fitted for one Keras
  epoch of ``spec.steps`` batches with ``shuffle=False``, so every mode sees the same batches.
  With PyTorch installed they are the PyTorch zoo's very batches (:func:`batch_indices` asks a
  ``DataLoader`` seeded as the torch runner's for the indices; the last batch of an epoch is
  ragged); without it, the same sizes in another seeded order. The data pathologies are
  injected into the same example of the same step;
* the optimizers are Keras's own, with PyTorch's default epsilons and RMSprop's ``rho=0.99``;
* schedules are ``LearningRateSchedule`` objects of the optimizer's ``iterations`` reproducing
  PyTorch's ``LinearLR`` warm-up, ``CosineAnnealingLR``, warm-up + cosine, ``StepLR`` and
  ``OneCycleLR``; ``lr_jump`` multiplies from its onset on;
* BatchNorm is ``BatchNormalization(momentum=0.9, epsilon=1e-5)`` (PyTorch's 0.1 / 1e-5), the
  CNN's layer norm ``GroupNormalization(groups=1)`` (PyTorch's ``GroupNorm(1, c)``), the
  transformer a post-norm encoder of ``MultiHeadAttention`` (PyTorch's
  ``TransformerEncoderLayer`` default);
* the init pathologies do what the torch runner does: ``huge_init`` / ``tiny_init`` scale every
  weight of two or more dimensions, ``exploding_rnn`` sets the recurrent kernels orthogonal
  times the gain, ``dying_relu`` sets the bias of the same units of the same layer.

Where Keras differs from the PyTorch runs (so the same seed is a comparable run, not the same
numbers):

* the initial weights: Keras's default initialisers (Glorot uniform kernels, zero biases,
  orthogonal recurrent kernels, ``uniform(-0.05, 0.05)`` embeddings), not PyTorch's, and drawn
  from ``keras.utils.set_random_seed(seed)``; dropout masks come from Keras's seed generators;
* weight decay is Keras's, decoupled (``variable -= lr * wd * variable``) for every optimizer,
  where PyTorch's SGD, Adam, RMSprop and Adagrad add ``wd * w`` to the gradient (AdamW is
  decoupled in both); SGD momentum is Keras's form (``v = m v - lr g``), equal to PyTorch's at a
  constant LR; Adam's epsilon is added to the uncorrected ``sqrt(v)``;
* ``OneCycleLR`` cycles the LR only: Keras optimizers have no momentum to cycle (PyTorch's
  ``cycle_momentum`` moves SGD's momentum / Adam's beta1 between 0.85 and 0.95);
* bf16: PyTorch autocasts ``Linear`` / ``Conv2d`` / attention to bfloat16 and keeps the rest in
  float32; here the ``mixed_bfloat16`` policy is set on the dense layers, the activations and the
  normalisation layers (which compute their statistics in float32), the head included, whose
  logits are cast back to float32 (PyTorch's ``model(x).float()``). The embedding lookup and the
  input op stay in float32 as under autocast; the input op's projection, a ``Linear`` that
  autocast runs in bfloat16, stays in float32;
* the loss of a watched run's step is recovered from Keras's running mean (weighted by rows; to
  float32's precision); a step ``auto`` skipped has no loss there and is recorded as NaN. The
  scores read the probe's losses and the whole-split numbers, never these.

Specs this runner cannot train raise :class:`benchmarks.zoo.workers.Unsupported` (see
:func:`check_supported`), which the zoo records as *dropped* with the reason, never as an error.

The probe measures with the backend's own autodiff and nothing from gradwatch: before each step a
callback computes the loss and the gradient of that step's batch on the weights as they are
(``tf.GradientTape``, ``torch.autograd``, ``jax.value_and_grad`` of ``stateless_call``), then
puts back every non-trainable variable the forward pass moved (BatchNormalization's statistics,
the dropout seed), so the step itself runs as unwatched and the observe run must end bit for bit
equal to it. The dead share of each ReLU layer is read off its output on the batch (inference
mode: the runs where it matters have neither dropout nor normalisation).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import numpy as np

from benchmarks.detection.trace import GroupTrace, Trace

from . import data
from .evaluate import RunResult
from .spec import TOKEN_BINS, TOKEN_FAMILIES, RunSpec

DATA_PATHOLOGIES = ("nan_input", "inf_input", "nan_label", "poisoned_batch", "zero_math")


def _keras() -> Any:
    import keras

    return keras


# -- the model -----------------------------------------------------------------------------------


def _input_op_layer() -> Any:
    keras = _keras()

    base: Any = keras.layers.Layer

    class InputOp(base):
        """A hand-written op singular at the all-zero example (see the torch runner's ``InputOp``)."""

        def __init__(self, op: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.op = op
            self.proj: Any = keras.layers.Dense(4, use_bias=False, name="proj") if op == "norm_feature" else None

        def build(self, input_shape: Any) -> None:
            self.features = int(np.prod([int(d) for d in input_shape[1:]]))
            if self.proj is not None:
                self.proj.build((None, self.features))

        def call(self, x: Any) -> Any:
            ops = keras.ops
            flat = ops.reshape(x, (-1, self.features))
            energy = ops.sum(flat * flat, axis=1)
            if self.op == "l2norm":
                return x / ops.reshape(ops.sqrt(energy), (-1,) + (1,) * (len(x.shape) - 1))
            if self.op == "log_energy":
                extra = ops.log(energy)
            else:
                h = self.proj(flat)
                extra = ops.sqrt(ops.sum(h * h, axis=1))
            extra = ops.reshape(extra, (-1,) + (1,) * (len(x.shape) - 1)) * ops.ones_like(x[..., :1])
            return ops.concatenate([x, ops.cast(extra, x.dtype)], axis=-1)

    return InputOp


def _dtype(spec: RunSpec) -> str | None:
    return "mixed_bfloat16" if spec.bf16 else None


def _activation(name: str, label: str, dtype: str | None) -> Any:
    keras = _keras()
    if name == "relu":
        return keras.layers.ReLU(name=label, dtype=dtype)
    return keras.layers.Activation(name, name=label, dtype=dtype)


def _head(spec: RunSpec, d_out: int) -> list[Any]:
    """The output layer; under bf16 it computes in bfloat16 as PyTorch's autocast ``Linear`` does
    and its logits are cast back to float32 (PyTorch's ``model(x).float()``)."""
    L = _keras().layers
    head = [L.Dense(d_out, name="head", dtype=_dtype(spec))]
    return head + [L.Activation("linear", name="to_float32", dtype="float32")] if spec.bf16 else head


def _apply(layers: list[Any], h: Any) -> Any:
    for layer in layers:
        h = layer(h)
    return h


def _norm_layers(kind: str, label: str, dtype: str | None, *, groups: bool = False) -> list[Any]:
    keras = _keras()
    if kind == "batch":
        return [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=label, dtype=dtype)]
    if kind == "layer":
        if groups:
            return [keras.layers.GroupNormalization(groups=1, epsilon=1e-5, name=label, dtype=dtype)]
        return [keras.layers.LayerNormalization(epsilon=1e-5, name=label, dtype=dtype)]
    return []


def _mlp(spec: RunSpec, d_in: int, d_out: int) -> Any:
    keras = _keras()
    L, dt = keras.layers, _dtype(spec)
    layers: list[Any] = [keras.Input((d_in,))]
    if spec.input_op != "none":
        layers.append(_input_op_layer()(spec.input_op, name="input_op"))
    for i in range(spec.depth):
        layers += [L.Dense(spec.width, name=f"dense_{i}", dtype=dt), *_norm_layers(spec.norm, f"norm_{i}", dt),
                   _activation(spec.activation, f"act_{i}", dt)]
        if spec.dropout:
            layers.append(L.Dropout(spec.dropout, name=f"drop_{i}"))
    layers += _head(spec, d_out)
    return keras.Sequential(layers)


def _resmlp(spec: RunSpec, d_in: int, d_out: int) -> Any:
    keras = _keras()
    L, dt = keras.layers, _dtype(spec)
    inputs = keras.Input((d_in,))
    h = _input_op_layer()(spec.input_op, name="input_op")(inputs) if spec.input_op != "none" else inputs
    h = L.Dense(spec.width, name="inp", dtype=dt)(h)
    for i in range(spec.depth):
        r = h
        for layer in _norm_layers(spec.norm, f"norm_{i}", dt):
            r = layer(r)
        r = L.Dense(spec.width, name=f"fc1_{i}", dtype=dt)(r)
        r = _activation(spec.activation, f"act_{i}", dt)(r)
        r = L.Dropout(spec.dropout, name=f"drop_{i}")(r)
        r = L.Dense(spec.width, name=f"fc2_{i}", dtype=dt)(r)
        h = L.Add(name=f"res_{i}", dtype=dt)([h, r])
    for layer in _norm_layers(spec.norm, "out_norm", dt):
        h = layer(h)
    return keras.Model(inputs, _apply(_head(spec, d_out), h))


def _cnn(spec: RunSpec, d_out: int) -> Any:
    keras = _keras()
    L, dt = keras.layers, _dtype(spec)
    layers: list[Any] = [keras.Input((8, 8, 1))]
    if spec.input_op != "none":
        layers.append(_input_op_layer()(spec.input_op, name="input_op"))
    for i, c in enumerate([spec.width, 2 * spec.width, 2 * spec.width][:spec.depth]):
        layers += [L.Conv2D(c, 3, padding="same", name=f"conv_{i}", dtype=dt),
                   *_norm_layers(spec.norm, f"norm_{i}", dt, groups=True), _activation(spec.activation, f"act_{i}", dt)]
        if i == 1:
            layers.append(L.MaxPooling2D(2, name="pool"))
    layers.append(L.Flatten(name="flatten"))
    if spec.dropout:
        layers.append(L.Dropout(spec.dropout, name="drop"))
    layers += _head(spec, d_out)
    return keras.Sequential(layers)


def _rnn(spec: RunSpec, d_out: int) -> Any:
    keras = _keras()
    L = keras.layers
    layers: list[Any] = [keras.Input((8, 8))]
    for i in range(spec.depth):
        last = i == spec.depth - 1
        if spec.cell in ("rnn", "rnn_relu"):
            cell = L.SimpleRNN(spec.width, activation="relu" if spec.cell == "rnn_relu" else "tanh",
                               return_sequences=not last, name=f"rnn_{i}")
        elif spec.cell == "lstm":
            cell = L.LSTM(spec.width, return_sequences=not last, name=f"lstm_{i}")
        else:
            cell = L.GRU(spec.width, return_sequences=not last, name=f"gru_{i}")
        layers.append(cell)
        if spec.dropout and not last:
            layers.append(L.Dropout(spec.dropout, name=f"drop_{i}"))
    layers.append(L.Dense(d_out, name="head"))
    return keras.Sequential(layers)


def _position_layer() -> Any:
    keras = _keras()

    base: Any = keras.layers.Layer

    class PositionEmbedding(base):
        """Adds a learned embedding of each position (PyTorch's ``self.pos.weight``)."""

        def build(self, input_shape: Any) -> None:
            self.embeddings = self.add_weight(shape=tuple(input_shape[1:]), initializer="random_normal",
                                              name="embeddings")

        def call(self, h: Any) -> Any:
            return h + self.embeddings

    return PositionEmbedding


def _transformer(spec: RunSpec, length: int, d_out: int) -> Any:
    keras = _keras()
    L = keras.layers
    d = spec.width
    tokens = keras.Input((length,), dtype="int32")
    h = _position_layer()(name="pos")(L.Embedding(TOKEN_BINS, d, name="tok")(tokens))
    for i in range(spec.depth):
        a = L.MultiHeadAttention(spec.heads, d // spec.heads, dropout=spec.dropout, name=f"attn_{i}")(h, h)
        h = L.LayerNormalization(epsilon=1e-5, name=f"ln1_{i}")(L.Add()([h, L.Dropout(spec.dropout)(a)]))
        f = L.Dense(2 * d, activation="relu", name=f"ff1_{i}")(h)
        f = L.Dense(d, name=f"ff2_{i}")(L.Dropout(spec.dropout)(f))
        h = L.LayerNormalization(epsilon=1e-5, name=f"ln2_{i}")(L.Add()([h, L.Dropout(spec.dropout)(f)]))
    return keras.Model(tokens, L.Dense(d_out, name="head")(L.GlobalAveragePooling1D()(h)))


def _token_bag(spec: RunSpec, length: int, d_out: int) -> Any:
    keras = _keras()
    L, dt = keras.layers, _dtype(spec)
    tokens = keras.Input((length,), dtype="int32")
    ids = tokens + keras.ops.arange(length, dtype="int32") * TOKEN_BINS
    # PyTorch's autocast leaves the embedding lookup and the mean in float32.
    h = L.GlobalAveragePooling1D()(L.Embedding(length * TOKEN_BINS, spec.width, name="emb")(ids))
    h = L.ReLU(name="act", dtype=dt)(L.Dense(2 * spec.width, name="hidden", dtype=dt)(h))
    return keras.Model(tokens, _apply(_head(spec, d_out), h))


def build_model(spec: RunSpec, dataset: data.Dataset) -> Any:
    """The Keras model for ``spec`` (call after ``keras.utils.set_random_seed``)."""
    keras = _keras()
    d_out = dataset.classes if dataset.task == "classification" else 1
    f = spec.family
    if f == "mlp":
        return _mlp(spec, dataset.features, d_out)
    if f == "resmlp":
        return _resmlp(spec, dataset.features, d_out)
    if f == "cnn":
        return _cnn(spec, d_out)
    if f == "rnn":
        return _rnn(spec, d_out)
    if f == "transformer":
        return _transformer(spec, dataset.features, d_out)
    if f == "embedding":
        return _token_bag(spec, dataset.features, d_out)
    if f in ("logistic", "linear"):
        layers: list[Any] = [keras.Input((dataset.features,))]
        if spec.input_op != "none":
            layers.append(_input_op_layer()(spec.input_op, name="input_op"))
        return keras.Sequential([*layers, *_head(spec, d_out)])
    raise ValueError(f"Unknown family {f!r}.")


KNOWN = {
    "family": ("mlp", "resmlp", "cnn", "rnn", "transformer", "embedding", "logistic", "linear"),
    "activation": ("relu", "gelu", "tanh", "sigmoid"),
    "norm": ("none", "batch", "layer"),
    "input_op": ("none", "log_energy", "norm_feature", "l2norm"),
    "optimizer": ("sgd", "adam", "adamw", "rmsprop", "adagrad"),
    "schedule": ("constant", "warmup", "cosine", "step", "onecycle"),
    "frozen": ("", "first"),
}
"""What this runner builds; any other value is refused (:func:`check_supported`)."""

CELLS = ("rnn", "rnn_relu", "lstm", "gru")
PATHOLOGY_NAMES = ("lr_high", "lr_jump", "huge_init", "tiny_init", "exploding_rnn", "dying_relu", "saturating",
                   *DATA_PATHOLOGIES)


def check_supported(spec: RunSpec) -> None:
    """Refuse a spec this runner cannot train as the PyTorch zoo does.

    Every option the sampler draws today is built (the zoo's Keras sample runs them all); this
    check keeps a value added to the sampler later from becoming an error or a silently
    different run: the seed is dropped with the reason instead.

    Raises:
        benchmarks.zoo.workers.Unsupported: naming the option.
    """
    from .workers import Unsupported

    for option, values in KNOWN.items():
        if getattr(spec, option) not in values:
            raise Unsupported(f"the Keras runner has no {option} {getattr(spec, option)!r} (it builds {values})")
    if spec.family == "rnn" and spec.cell not in CELLS:
        raise Unsupported(f"the Keras runner has no recurrent cell {spec.cell!r} (it builds {CELLS})")
    if spec.family == "transformer" and (spec.heads < 1 or spec.width % spec.heads):
        raise Unsupported(f"MultiHeadAttention needs the width ({spec.width}) divisible by the heads ({spec.heads})")
    if spec.family == "cnn" and spec.depth < 2:
        raise Unsupported("the zoo's CNN pools after its second conv (the head expects 4x4 maps): depth >= 2")
    p = spec.pathology
    if p is not None and p.name not in PATHOLOGY_NAMES:
        raise Unsupported(f"the Keras runner cannot inject {p.name!r}")
    if p is not None and p.name == "dying_relu" and spec.activation != "relu":
        raise Unsupported("dying_relu needs ReLU layers")


def _kernels(model: Any) -> list[Any]:
    """Trainable tensors of two or more dimensions (PyTorch's ``param.dim() >= 2``), without the
    input op's projection."""
    return [v for v in model.trainable_variables if len(v.shape) >= 2 and "input_op" not in v.path]


def inject_init(spec: RunSpec, model: Any) -> str:
    """Apply an init pathology; returns the name of the ReLU layer a ``dying_relu`` kills."""
    p = spec.pathology
    if p is None:
        return ""
    keras = _keras()
    rng = np.random.default_rng(spec.seed)
    if p.name in ("huge_init", "tiny_init"):
        for v in model.trainable_variables:  # PyTorch's every param.dim() >= 2, the projection too
            if len(v.shape) >= 2:
                v.assign(keras.ops.convert_to_numpy(v) * p.factor)
    elif p.name == "exploding_rnn":
        for layer in model.layers:
            cell = getattr(layer, "cell", None)
            if cell is not None and hasattr(cell, "recurrent_kernel"):
                cell.recurrent_kernel.assign(_orthogonal(rng, tuple(cell.recurrent_kernel.shape)) * p.factor)
    elif p.name == "dying_relu":
        affine, relu = _hidden_units(model)[p.layer]
        bias = np.array(keras.ops.convert_to_numpy(affine.bias))
        k = max(1, round(p.share * bias.size))
        bias[:k] = -p.factor
        affine.bias.assign(bias)
        return str(relu.name)
    return ""


def _orthogonal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A (semi-)orthogonal matrix of ``shape`` (``nn.init.orthogonal_``'s construction)."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    a = rng.normal(size=(rows, cols))
    if rows < cols:
        a = a.T
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    return (q.T if rows < cols else q).reshape(shape).astype("float32")


def _hidden_units(model: Any) -> list[tuple[Any, Any]]:
    """(pre-activation layer, ReLU layer) of each hidden layer, forward order (as the torch
    runner's ``_hidden_units``)."""
    keras = _keras()
    out, last = [], None
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            last = layer
        elif isinstance(layer, keras.layers.ReLU) and last is not None:
            out.append((last, layer))
    return out


def freeze(spec: RunSpec, model: Any) -> None:
    if spec.frozen != "first":
        return
    keras = _keras()
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D, keras.layers.Embedding)):
            layer.trainable = False
            return


# -- optimizer and schedule ----------------------------------------------------------------------


def effective_lr(spec: RunSpec) -> float:
    p = spec.pathology
    return spec.lr * p.factor if p is not None and p.name == "lr_high" else spec.lr


def schedule_factor(spec: RunSpec, t: Any, ops: Any) -> Any:
    """The schedule's multiplier of the base LR at step ``t`` (a float tensor), as PyTorch's."""
    s, steps, warm = spec.schedule, float(spec.steps), float(max(spec.warmup, 1))
    pi = math.pi
    if s == "constant":
        f = ops.ones_like(t)
    elif s == "warmup":
        f = 1.0 / warm + (1.0 - 1.0 / warm) * ops.minimum(t, warm) / warm
    elif s == "cosine" and not spec.warmup:
        f = 0.5 * (1.0 + ops.cos(pi * t / steps))
    elif s == "cosine":
        f = ops.minimum(1.0, (t + 1.0) / warm) * 0.5 * (1.0 + ops.cos(pi * ops.minimum(t, steps) / steps))
    elif s == "step":
        f = ops.power(0.3, ops.floor(t / float(max(1, spec.steps // 3))))
    elif s == "onecycle":
        total = steps + 1.0
        up = 0.3 * total - 1.0
        initial, low = 1.0 / 25.0, 1.0 / 25.0 / 1e4
        rise = initial + (1.0 - initial) * 0.5 * (1.0 - ops.cos(pi * ops.minimum(t, up) / up))
        frac = ops.clip((t - up) / (total - 1.0 - up), 0.0, 1.0)
        fall = low + (1.0 - low) * 0.5 * (1.0 + ops.cos(pi * frac))
        f = ops.where(t <= up, rise, fall)
    else:
        raise ValueError(f"Unknown schedule {s!r}.")
    p = spec.pathology
    if p is not None and p.name == "lr_jump":
        f = f * ops.where(t >= float(p.onset), p.factor, 1.0)
    return f


def build_schedule(spec: RunSpec) -> Any:
    """A float for a constant LR, else a ``LearningRateSchedule``."""
    keras = _keras()
    base = effective_lr(spec)
    if spec.schedule == "constant" and (spec.pathology is None or spec.pathology.name != "lr_jump"):
        return base

    schedule_base: Any = keras.optimizers.schedules.LearningRateSchedule

    class ZooSchedule(schedule_base):
        def __call__(self, step: Any) -> Any:
            ops = keras.ops
            t = ops.cast(step, "float32")
            return base * schedule_factor(spec, t, ops)

        def get_config(self) -> dict[str, Any]:
            return {"seed": spec.seed}

    return ZooSchedule()


def build_optimizer(spec: RunSpec) -> Any:
    keras = _keras()
    lr, wd = build_schedule(spec), spec.weight_decay or None
    o = keras.optimizers
    if spec.optimizer == "sgd":
        return o.SGD(lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=wd)
    if spec.optimizer == "adam":
        return o.Adam(lr, epsilon=1e-8, weight_decay=wd)
    if spec.optimizer == "adamw":
        return o.AdamW(lr, epsilon=1e-8, weight_decay=spec.weight_decay)
    if spec.optimizer == "rmsprop":
        return o.RMSprop(lr, rho=0.99, epsilon=1e-8, weight_decay=wd)
    if spec.optimizer == "adagrad":
        return o.Adagrad(lr, initial_accumulator_value=0.0, epsilon=1e-10, weight_decay=wd)
    raise ValueError(f"Unknown optimizer {spec.optimizer!r}.")


# -- data ----------------------------------------------------------------------------------------


def _arrays(spec: RunSpec, dataset: data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if spec.family in TOKEN_FAMILIES:
        edges = data.quantile_edges(dataset.x_train, TOKEN_BINS)
        x_tr = data.tokens(dataset.x_train, edges).astype("int32")
        x_te = data.tokens(dataset.x_test, edges).astype("int32")
    else:
        x_tr, x_te = dataset.x_train, dataset.x_test
        if spec.family == "cnn":
            x_tr, x_te = x_tr.reshape(-1, 8, 8, 1), x_te.reshape(-1, 8, 8, 1)
        elif spec.family == "rnn":
            x_tr, x_te = x_tr.reshape(-1, 8, 8), x_te.reshape(-1, 8, 8)
    y_tr, y_te = dataset.y_train, dataset.y_test
    if dataset.task == "classification":
        eye = np.eye(dataset.classes, dtype="float32")
        y_tr, y_te = eye[y_tr], eye[y_te]
    return x_tr, y_tr.astype("float32"), x_te, y_te.astype("float32")


def inject_batch(spec: RunSpec, t: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt the batch of the onset step (data pathologies); other steps pass through."""
    p = spec.pathology
    if p is None or t != p.onset or p.name not in DATA_PATHOLOGIES:
        return x, y
    x, y = x.copy(), y.copy()
    if p.name == "nan_input":
        x.reshape(x.shape[0], -1)[0, 0] = np.nan
    elif p.name == "inf_input":
        x.reshape(x.shape[0], -1)[0, 0] = np.inf
    elif p.name == "nan_label":
        y.reshape(-1)[0] = np.nan
    elif p.name == "poisoned_batch":
        x = (x * p.factor).astype(x.dtype)
    else:
        x[0] = 0
    return x, y


def batch_indices(spec: RunSpec, rows: int) -> list[np.ndarray]:
    """The row indices of each of the run's ``spec.steps`` batches, in order.

    With PyTorch installed these are exactly the PyTorch zoo's batches: the indices that
    ``DataLoader(..., batch_size=spec.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))``
    yields epoch after epoch (``drop_last=False``: the last batch of an epoch is ragged). Without
    it, each epoch is a permutation from ``numpy.random.default_rng(seed)`` (same sizes, another
    order)."""
    out: list[np.ndarray] = []
    try:
        import torch
    except ImportError:
        rng = np.random.default_rng(spec.seed)
        while len(out) < spec.steps:
            order = rng.permutation(rows)
            out += [order[lo:lo + spec.batch_size] for lo in range(0, rows, spec.batch_size)]
        return out[:spec.steps]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(rows)),
                                         batch_size=spec.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(spec.seed))
    while len(out) < spec.steps:
        for (idx,) in loader:
            if len(out) >= spec.steps:
                break
            out.append(idx.numpy())
    return out


def batches(spec: RunSpec, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The run's batches in order (:func:`batch_indices`), the data pathology injected at its onset."""
    return [inject_batch(spec, t, x[idx], y[idx]) for t, idx in enumerate(batch_indices(spec, len(x)))]


def _dataset(items: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    keras = _keras()

    base: Any = keras.utils.PyDataset

    class Batches(base):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)

        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            return items[i]

    return Batches()


# -- the probe -----------------------------------------------------------------------------------


class _Probe:
    """Before each step: the step's loss, every gradient's and parameter's norm, the LR and the
    dead share of each ReLU layer, with the backend's own autodiff; nothing from gradwatch."""

    def __init__(self, run: _Training) -> None:
        keras = _keras()
        self.run = run
        model = run.model
        self.backend = keras.backend.backend()
        self.variables = list(model.trainable_variables)
        self.trace = Trace([GroupTrace([v.path for v in self.variables])])
        relus = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
        self.trace.dead = {layer.name: [] for layer in relus}
        self._outputs = keras.Model(model.inputs, [layer.output for layer in relus]) if relus else None
        self._grad_fn = self._make_grad_fn()

    def _make_grad_fn(self) -> Any:
        run, model, variables = self.run, self.run.model, self.variables
        if self.backend == "tensorflow":
            import tensorflow as tf

            @tf.function(reduce_retracing=True)
            def grads_tf(x: Any, y: Any) -> Any:
                with tf.GradientTape() as tape:
                    loss = run.loss_fn(y, model(x, training=True))
                return loss, [tf.convert_to_tensor(g) if g is not None else None
                              for g in tape.gradient(loss, [v.value for v in variables])]

            return grads_tf
        if self.backend == "torch":
            import torch

            def grads_torch(x: Any, y: Any) -> Any:
                values = [v.value for v in variables]
                loss = run.loss_fn(y, model(x, training=True))
                grads = torch.autograd.grad(loss, values, allow_unused=True)
                return loss.detach(), list(grads)

            return grads_torch
        import jax

        @jax.jit
        def grads_jax(trainable: Any, non_trainable: Any, x: Any, y: Any) -> Any:
            def loss_of(tv: Any) -> Any:
                pred, _ = model.stateless_call(tv, non_trainable, x, training=True)
                return run.loss_fn(y, pred)

            return jax.value_and_grad(loss_of)(trainable)

        return grads_jax

    def on_batch(self, t: int) -> None:
        keras = _keras()
        model = self.run.model
        x, y = self.run.items[t]
        if self.backend == "jax":
            trainable, non_trainable = _jax_values(model)
            loss, grads = self._grad_fn(trainable, non_trainable, x, y)
            params = [np.asarray(v) for v in trainable]
        else:
            params = [np.asarray(keras.ops.convert_to_numpy(v)) for v in self.variables]
            saved = [np.array(keras.ops.convert_to_numpy(v)) for v in model.non_trainable_variables]
            loss, grads = self._grad_fn(x, y)
            for v, value in zip(model.non_trainable_variables, saved):  # the step must run as unwatched
                v.assign(value)
        gt = self.trace.main
        gt.loss.append(float(keras.ops.convert_to_numpy(loss)))
        norms, present = [], []
        for g in grads:
            present.append(g is not None)
            norms.append(math.nan if g is None else _l2(np.asarray(keras.ops.convert_to_numpy(g))))
        gt.grad_norm.append(norms)
        gt.has_grad.append(present)
        gt.param_norm.append([_l2(p) for p in params])
        # The unwatched run skips no step, so the optimizer's iterations are the step index.
        gt.lr.append(float(effective_lr(self.run.spec) * schedule_factor(self.run.spec, float(t), _NumpyOps)))
        if self._outputs is not None:
            if self.backend == "jax":
                outs, _ = self._outputs.stateless_call(*_jax_values(self._outputs, model), x, training=False)
            else:
                outs = self._outputs(x, training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for name, out in zip(self.trace.dead, outs):
                a = np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)
                units = a.reshape(-1, a.shape[-1])
                self.trace.dead[name].append(float(np.mean(np.all(units == 0, axis=0))))


class _NumpyOps:
    """The few ``keras.ops`` that :func:`schedule_factor` uses, on Python floats."""

    ones_like = staticmethod(np.ones_like)
    minimum = staticmethod(np.minimum)
    cos = staticmethod(np.cos)
    power = staticmethod(np.power)
    floor = staticmethod(np.floor)
    clip = staticmethod(np.clip)
    where = staticmethod(np.where)


def _jax_values(model: Any, owner: Any = None) -> tuple[list[Any], list[Any]]:
    """JAX during ``fit``: the variables are detached, the newest values live in the trainer's
    state. The trainable and non-trainable values of ``model`` (a sub-model of ``owner`` shares
    its variables)."""
    owner = owner if owner is not None else model
    state = getattr(owner, "_jax_state", None)
    by_id: dict[int, Any] = {}
    if state and not getattr(owner, "_jax_state_synced", True):
        for refs, values in ((owner.trainable_variables, state.get("trainable_variables")),
                             (owner.non_trainable_variables, state.get("non_trainable_variables"))):
            for ref, current in zip(refs, values or ()):
                by_id[id(ref)] = current

    def value(v: Any) -> Any:
        # Not by_id.get(id(v), v.value): a detached variable's value must not even be read.
        return by_id[id(v)] if id(v) in by_id else v.value  # noqa: SIM401

    return [value(v) for v in model.trainable_variables], [value(v) for v in model.non_trainable_variables]


def _l2(a: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.sqrt(np.sum(np.square(a.astype(np.float64)))))


def _probe_callback(probe: _Probe) -> Any:
    keras = _keras()

    base: Any = keras.callbacks.Callback

    class ProbeCallback(base):
        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            probe.on_batch(int(batch))

    return ProbeCallback()


# -- one run -------------------------------------------------------------------------------------


class _Training:
    """One seeded training run's objects."""

    def __init__(self, spec: RunSpec) -> None:
        keras = _keras()
        self.spec = spec
        self.dataset = data.load(spec.dataset, spec.dataset_options, spec.seed)
        self.x_train, self.y_train, self.x_test, self.y_test = _arrays(spec, self.dataset)
        self.classifier = self.dataset.task == "classification"
        keras.utils.set_random_seed(spec.seed)
        self.model = build_model(spec, self.dataset)
        self.dead_module = inject_init(spec, self.model)
        freeze(spec, self.model)
        if self.classifier:
            self.loss_fn: Any = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                    label_smoothing=spec.label_smoothing)
        else:
            self.loss_fn = keras.losses.MeanSquaredError()
        self.model.compile(optimizer=build_optimizer(spec), loss=self.loss_fn)
        self.items = batches(spec, self.x_train, self.y_train)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(loss, accuracy) in inference mode; accuracy NaN for regression, 0 for non-finite outputs."""
        keras = _keras()
        out = np.asarray(keras.ops.convert_to_numpy(self.model(x, training=False)), dtype=np.float32)
        with np.errstate(all="ignore"):
            loss = float(keras.ops.convert_to_numpy(self.loss_fn(y, out)))
        acc = math.nan
        if self.classifier:
            acc = float(np.mean(out.argmax(1) == y.argmax(1))) if np.isfinite(out).all() else 0.0
        return loss, acc

    def weights(self) -> tuple[str, str]:
        kernels = _kernels(self.model)
        return kernels[0].path, kernels[-1].path

    def fit(self, callbacks: list[Any]) -> list[float]:
        keras = _keras()
        losses: list[float] = []
        rows = [len(x) for x, _ in self.items]
        seen = {"total": 0.0, "rows": 0.0, "skipped": 0.0}

        base: Any = keras.callbacks.Callback

        class BatchLoss(base):
            """The batch's own loss, recovered from the running mean Keras logs: Keras's loss
            tracker weights each batch by its rows, so the sum so far is ``mean * rows so far``
            (to float32's precision). A batch gradwatch skipped is kept out of that mean (its
            ``gw_skipped`` log counts up): its loss is unknown here and recorded as NaN."""

            def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
                logs = logs or {}
                skipped = float(logs.get("gw_skipped", 0.0))
                if skipped > seen["skipped"]:
                    seen["skipped"] = skipped
                    losses.append(math.nan)
                    return
                n = seen["rows"] + rows[len(losses)]
                total = float(logs.get("loss", math.nan)) * n
                losses.append((total - seen["total"]) / rows[len(losses)])
                seen["total"], seen["rows"] = total, n

        self.model.fit(_dataset(self.items), epochs=1, shuffle=False, verbose=0,
                       callbacks=[*callbacks, BatchLoss()])
        return losses


class KerasRunner:
    """:class:`benchmarks.zoo.evaluate.Runner` for Keras 3 on ``KERAS_BACKEND`` (CPU)."""

    def __init__(self) -> None:
        keras = _keras()
        self.framework = f"keras/{keras.backend.backend()}"

    def train(self, spec: RunSpec, mode: str) -> RunResult:
        """Train ``spec`` from its seed.

        Args:
            spec: The run.
            mode: ``"probe"`` (unwatched; the probe measures every step), ``"observe"``
                (``GradWatch(policy="observe", strict=True)``) or ``"auto"`` (``GradWatch()``,
                the defaults).

        Returns:
            The run's result.

        Raises:
            ValueError: for an unknown mode.
            benchmarks.zoo.workers.Unsupported: for a spec this runner refuses
                (:func:`check_supported`).
        """
        import gradwatch
        from gradwatch import GradWatch

        keras = _keras()
        check_supported(spec)
        start = time.perf_counter()
        run = _Training(spec)
        before, _ = run.evaluate(run.x_train, run.y_train)
        trace = report = None
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if mode == "probe":
                probe = _Probe(run)
                losses = run.fit([_probe_callback(probe)])
                trace = probe.trace
                losses = list(trace.main.loss)
            elif mode == "observe":
                cb = GradWatch(policy="observe", strict=True)
                losses = run.fit([cb])
                report = cb.report()
            elif mode == "auto":
                cb = GradWatch()
                losses = run.fit([cb])
                report = cb.report()
            else:
                raise ValueError(f"mode must be 'probe', 'observe' or 'auto'. Received mode={mode!r}.")
        caught = [str(w.message) for w in seen if isinstance(w.message, gradwatch.GradwatchWarning)]
        after, _ = run.evaluate(run.x_train, run.y_train)
        test_loss, test_acc = run.evaluate(run.x_test, run.y_test)
        first, last = run.weights()
        params = [np.array(keras.ops.convert_to_numpy(v)) for v in run.model.weights]
        return RunResult(
            mode=mode, loss=losses, batch_sizes=[len(x) for x, _ in run.items], train_loss_before=before,
            train_loss_after=after, test_loss=test_loss, test_accuracy=test_acc, chance=run.dataset.chance,
            classifier=run.classifier, params=params, trace=trace, report=report, first_weight=first,
            last_weight=last, dead_module=run.dead_module, warnings=caught, seconds=time.perf_counter() - start)

    def same_params(self, a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        """Every weight bit for bit equal (NaN in the same places counts as equal)."""
        return len(a) == len(b) and all(
            x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))
            for x, y in zip(a, b))


def setup_worker() -> None:
    """One thread per process (the zoo runs one training per worker)."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    np.seterr(all="ignore")
    keras = _keras()
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    elif backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialised in this process
            pass


__all__ = ["KNOWN", "KerasRunner", "batch_indices", "batches", "build_model", "build_optimizer", "build_schedule",
           "check_supported", "inject_batch", "inject_init", "schedule_factor", "setup_worker"]
