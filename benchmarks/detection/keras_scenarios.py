"""Keras 3 scenarios (``model.fit`` with ``GradWatch``): healthy traps and pathologies.

They run on whichever backend ``KERAS_BACKEND`` selects; the label checks are the same as for
PyTorch (:mod:`.checks`), fed by the Keras probe's plain-autodiff trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from . import checks as chk
from .keras_harness import KerasRun, KerasScenario

Arrays = tuple[np.ndarray, np.ndarray]


def regression(seed: int, n: int = 512, d: int = 10) -> Arrays:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x[:, :1] * 2 + np.sin(2 * x[:, 1:2]) + x[:, 2:3] * x[:, 3:4] - 0.5).astype("float32")
    return x, y


def classification(seed: int, n: int = 512, d: int = 10, classes: int = 4) -> Arrays:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    logits = x @ rng.normal(size=(d, classes)) + 0.3 * rng.normal(size=(n, classes))
    return x, logits.argmax(1).astype("int32")


def images(seed: int, n: int = 256, size: int = 12) -> Arrays:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 1)).astype("float32")
    y = rng.integers(0, 4, size=n).astype("int32")
    h = size // 2
    for c, (r, s) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
        x[y == c, r:r + h, s:s + h] += 1.0
    return x, y


def tokens(seed: int, n: int = 256, length: int = 8, vocab: int = 24) -> Arrays:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, vocab, size=(n, length)).astype("int32")
    return t, (t[:, 0] > t[:, -1]).astype("int32")


def layout(data: Arrays, steps: int, batch: int, corrupt: Callable[[int, Arrays], Arrays] | None = None) -> Arrays:
    """Rows for ``steps`` steps of ``batch``, cycling through ``data``; ``corrupt(t, batch)``
    may change the batch of step ``t``."""
    x, y = data
    count = len(x) // batch
    xs, ys = [], []
    for t in range(steps):
        lo = (t % count) * batch
        b = (x[lo:lo + batch].copy(), y[lo:lo + batch].copy())
        if corrupt is not None:
            b = corrupt(t, b)
        xs.append(b[0])
        ys.append(b[1])
    return np.concatenate(xs), np.concatenate(ys)


def mlp(d_in: int, widths: tuple[int, ...], d_out: int, *, activation: str = "relu", seed: int = 0,
        dropout: float = 0.0, **dense: Any) -> Any:
    """Dense layers named ``h0``, ``h1`` ... and ``out``."""
    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.Input((d_in,))]
    for i, w in enumerate(widths):
        layers.append(keras.layers.Dense(w, activation=activation, name=f"h{i}", **dense))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, name=f"drop{i}"))
    layers.append(keras.layers.Dense(d_out, name="out", **dense))
    return keras.Sequential(layers)


def compiled(model: Any, optimizer: Any, loss: Any) -> Any:
    model.compile(optimizer=optimizer, loss=loss)
    return model


CE = "sparse_categorical_crossentropy"


def ce_logits() -> Any:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Jump(keras.optimizers.schedules.LearningRateSchedule):
    """``lr`` until step ``at``, then ``lr * factor`` (until ``until``, if given)."""

    def __init__(self, lr: float, at: int, factor: float, until: int | None = None) -> None:
        self.lr, self.at, self.factor, self.until = lr, at, factor, until

    def __call__(self, step: Any) -> Any:
        step = keras.ops.cast(step, "float32")
        on = step >= self.at
        if self.until is not None:
            on = keras.ops.logical_and(on, step < self.until)
        return keras.ops.where(on, self.lr * self.factor, self.lr)

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr, "at": self.at, "factor": self.factor, "until": self.until}


# -- healthy --------------------------------------------------------------------------------------


def h_mlp_adam() -> KerasRun:
    data = classification(1)
    model = compiled(mlp(10, (64,) * 4, 4, seed=1), keras.optimizers.Adam(1e-3), ce_logits())
    return KerasRun(model, *layout(data, 300, 32), 32, data)


def h_convex() -> KerasRun:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 5)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 0.7).astype("float32")
    keras.utils.set_random_seed(3)
    model = compiled(keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, name="out")]),
                     keras.optimizers.SGD(0.1), "mse")
    return KerasRun(model, np.tile(x, (300, 1)), np.tile(y, (300, 1)), 256, (x, y))


def h_attention_warmup() -> KerasRun:
    data = tokens(2)
    keras.utils.set_random_seed(2)
    inp = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(24, 32, name="embed")(inp)
    a = keras.layers.MultiHeadAttention(4, 8, name="attn")(h, h)
    h = keras.layers.LayerNormalization(name="ln1")(h + a)
    f = keras.layers.Dense(64, activation="gelu", name="ff1")(h)
    h = keras.layers.LayerNormalization(name="ln2")(h + keras.layers.Dense(32, name="ff2")(f))
    out = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling1D()(h))
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 200, warmup_target=3e-3, warmup_steps=50)
    model = compiled(keras.Model(inp, out), keras.optimizers.AdamW(schedule, weight_decay=0.01), ce_logits())
    return KerasRun(model, *layout(data, 250, 32), 32, data)


def h_frozen() -> KerasRun:
    data = classification(4)
    model = mlp(10, (32,) * 4, 4, seed=4)
    model.get_layer("h0").trainable = False
    model.get_layer("h1").trainable = False
    compiled(model, keras.optimizers.Adam(3e-3), ce_logits())
    return KerasRun(model, *layout(data, 200, 32), 32, data)


def h_dropout() -> KerasRun:
    data = classification(9)
    model = compiled(mlp(10, (64,) * 3, 4, seed=9, dropout=0.5), keras.optimizers.Adam(1e-3), ce_logits())
    return KerasRun(model, *layout(data, 300, 32), 32, data)


def h_label_smoothing() -> KerasRun:
    x, y = classification(10)
    onehot = np.eye(4, dtype="float32")[y]
    model = compiled(mlp(10, (64,) * 3, 4, seed=10), keras.optimizers.Adam(3e-3),
                     keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1))
    return KerasRun(model, *layout((x, onehot), 300, 32), 32, (x, onehot))


def h_cnn_batchnorm() -> KerasRun:
    data = images(16)
    keras.utils.set_random_seed(16)
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(8, 3, padding="same", name="conv0"), keras.layers.BatchNormalization(name="bn0"),
        keras.layers.ReLU(), keras.layers.Conv2D(8, 3, padding="same", name="conv1"),
        keras.layers.BatchNormalization(name="bn1"), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, name="out"),
    ])
    compiled(model, keras.optimizers.SGD(0.05, momentum=0.9), ce_logits())
    return KerasRun(model, *layout(data, 200, 32), 32, data)


def h_weight_decay() -> KerasRun:
    data = classification(8)
    model = compiled(mlp(10, (64,) * 3, 4, seed=8), keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=1e-2),
                     ce_logits())
    return KerasRun(model, *layout(data, 300, 32), 32, data)


def h_residual() -> KerasRun:
    data = regression(14)
    keras.utils.set_random_seed(14)
    inp = keras.Input((10,))
    h = keras.layers.Dense(32, name="inp")(inp)
    for i in range(8):
        b = keras.layers.LayerNormalization(name=f"ln{i}")(h)
        b = keras.layers.Dense(32, activation="gelu", name=f"fc{i}a")(b)
        h = h + keras.layers.Dense(32, name=f"fc{i}b")(b)
    out = keras.layers.Dense(1, name="out")(keras.layers.LayerNormalization(name="ln_out")(h))
    model = compiled(keras.Model(inp, out), keras.optimizers.Adam(1e-3), "mse")
    return KerasRun(model, *layout(data, 150, 32), 32, data)


def h_embedding_rows() -> KerasRun:
    rng = np.random.default_rng(5)
    t = rng.integers(0, 60, size=(256, 6)).astype("int32")  # 940 of 1000 rows never looked up
    y = (t.mean(1) > 30).astype("int32")
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(1000, 16, name="embed"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(32, activation="relu", name="h0"),
                              keras.layers.Dense(2, name="out")])
    compiled(model, keras.optimizers.Adam(3e-3), ce_logits())
    return KerasRun(model, *layout((t, y), 200, 32), 32, (t, y))


def h_loss_scale() -> KerasRun:
    data = classification(6)
    model = mlp(10, (64,) * 3, 4, seed=6, dtype="mixed_bfloat16")
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(2e-3))
    compiled(model, opt, ce_logits())
    return KerasRun(model, *layout(data, 200, 32), 32, data)


def h_grad_accumulation() -> KerasRun:
    data = regression(7)
    model = compiled(mlp(10, (32,) * 3, 1, seed=7), keras.optimizers.Adam(2e-3, gradient_accumulation_steps=4), "mse")
    return KerasRun(model, *layout(data, 400, 16), 16, data)


def h_finetune_zero_head() -> KerasRun:
    pre = classification(12)
    body = mlp(10, (64,) * 3, 4, seed=12)
    compiled(body, keras.optimizers.Adam(1e-3), ce_logits())
    body.fit(*layout(pre, 150, 32), batch_size=32, epochs=1, shuffle=False, verbose=0)
    keras.utils.set_random_seed(13)
    features = body.get_layer("h2").output
    head = keras.layers.Dense(3, name="new_head", kernel_initializer="zeros", bias_initializer="zeros")(features)
    model = compiled(keras.Model(body.inputs, head), keras.optimizers.Adam(3e-4), ce_logits())
    data = classification(13, classes=3)
    return KerasRun(model, *layout(data, 200, 32), 32, data)


def h_cosine_restarts() -> KerasRun:
    data = classification(18)
    schedule = keras.optimizers.schedules.CosineDecayRestarts(0.1, 60, alpha=0.01)
    model = compiled(mlp(10, (64,) * 3, 4, seed=18), keras.optimizers.SGD(schedule, momentum=0.9), ce_logits())
    return KerasRun(model, *layout(data, 300, 32), 32, data)


# -- pathologies ----------------------------------------------------------------------------------


def p_convex_lr_too_high() -> KerasRun:
    x, y = regression(31)
    top = float(np.linalg.eigvalsh(2 * x.T.astype(np.float64) @ x / len(x))[-1])
    keras.utils.set_random_seed(31)
    model = compiled(keras.Sequential([keras.Input((10,)), keras.layers.Dense(1, name="out")]),
                     keras.optimizers.SGD(2.4 / top), "mse")
    return KerasRun(model, np.tile(x, (150, 1)), np.tile(y, (150, 1)), len(x), (x, y))


def p_lr_jump_300() -> KerasRun:
    data = regression(32)
    model = compiled(mlp(10, (32,) * 3, 1, seed=32), keras.optimizers.SGD(Jump(0.01, 300, 30.0), momentum=0.9), "mse")
    return KerasRun(model, *layout(data, 400, 32), 32, data)


def _at(step: int, change: Callable[[Arrays], Arrays]) -> Callable[[int, Arrays], Arrays]:
    return lambda t, b: change(b) if t == step else b


def _nan_cell(b: Arrays) -> Arrays:
    x = b[0].copy()
    x[3, 2] = np.nan
    return x, b[1]


def _zero_row(b: Arrays) -> Arrays:
    x = b[0].copy()
    x[5] = 0.0
    return x, b[1]


def p_huge_batch_250() -> KerasRun:
    data = regression(35)
    model = compiled(mlp(10, (32,) * 3, 1, seed=35), keras.optimizers.Adam(1e-3), "mse")
    return KerasRun(model, *layout(data, 350, 32, _at(250, lambda b: (b[0] * 1e3, b[1]))), 32, data)


def p_nan_input_200() -> KerasRun:
    data = regression(38)
    model = compiled(mlp(10, (32,) * 3, 1, seed=38), keras.optimizers.Adam(1e-3), "mse")
    return KerasRun(model, *layout(data, 300, 32, _at(200, _nan_cell)), 32, data)


class NormFeature(keras.layers.Layer):
    """Appends each row's L2 norm, ``sqrt(sum h^2)``: 0 for an all-zero row, whose gradient is NaN."""

    def call(self, h: Any) -> Any:
        norm = keras.ops.sqrt(keras.ops.sum(h * h, axis=-1, keepdims=True))
        return keras.ops.concatenate([h, norm], axis=-1)


def p_nan_zero_norm_180() -> KerasRun:
    data = regression(40)
    keras.utils.set_random_seed(40)
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(32, activation="tanh", use_bias=False, name="h0"),
        keras.layers.Dense(32, activation="tanh", use_bias=False, name="h1"),
        NormFeature(name="norm_feature"),
        keras.layers.Dense(32, activation="tanh", name="h2"),
        keras.layers.Dense(1, name="out"),
    ])
    compiled(model, keras.optimizers.Adam(1e-3), "mse")
    return KerasRun(model, *layout(data, 300, 32, _at(180, _zero_row)), 32, data)


def p_vanishing_sigmoid() -> KerasRun:
    data = regression(43)
    model = compiled(mlp(10, (32,) * 10, 1, activation="sigmoid", seed=43), keras.optimizers.SGD(0.05), "mse")
    return KerasRun(model, *layout(data, 150, 32), 32, data)


def p_vanishing_sigmoid_cnn() -> KerasRun:
    data = images(45)
    keras.utils.set_random_seed(45)
    layers: list[Any] = [keras.Input((12, 12, 1))]
    layers += [keras.layers.Conv2D(8, 3, padding="same", activation="sigmoid", name=f"conv{i}") for i in range(8)]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, name="out")]
    model = compiled(keras.Sequential(layers), keras.optimizers.SGD(0.05), ce_logits())
    return KerasRun(model, *layout(data, 150, 32), 32, data)


def p_dead_bias(layer: str, share: float, seed: int) -> Callable[[], KerasRun]:
    def build() -> KerasRun:
        data = regression(seed)
        model = compiled(mlp(10, (32,) * 4, 1, seed=seed), keras.optimizers.Adam(1e-3), "mse")
        bias = model.get_layer(layer).bias
        values = np.array(keras.ops.convert_to_numpy(bias))
        values[: int(share * len(values))] = -5.0
        bias.assign(values)
        return KerasRun(model, *layout(data, 150, 32), 32, data)

    return build


def p_dead_cnn_channels() -> KerasRun:
    data = images(49)
    keras.utils.set_random_seed(49)
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv0"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1", bias_initializer=keras.initializers.Constant(-4.0)),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, name="out"),
    ])
    compiled(model, keras.optimizers.Adam(1e-3), ce_logits())
    return KerasRun(model, *layout(data, 150, 32), 32, data)


def p_loss_spike_targets_250() -> KerasRun:
    data = regression(50)
    model = compiled(mlp(10, (32,) * 3, 1, seed=50), keras.optimizers.Adam(1e-3), "mse")
    return KerasRun(model, *layout(data, 350, 32, _at(250, lambda b: (b[0], b[1] * 30.0))), 32, data)


SCENARIOS: list[KerasScenario] = [
    KerasScenario("k-h-mlp-adam", "healthy", h_mlp_adam, chk.healthy(), about="ReLU MLP 4x64, Adam"),
    KerasScenario("k-h-convex-converges", "healthy", h_convex, chk.healthy(extra=chk.trap_converges(1e4)),
                  about="linear regression, SGD: gradients shrink to ~0"),
    KerasScenario("k-h-attention-warmup", "healthy", h_attention_warmup, chk.healthy(),
                  about="MultiHeadAttention block, AdamW, 50-step warm-up then cosine"),
    KerasScenario("k-h-frozen-layers", "healthy", h_frozen, chk.healthy(min_drop=0.97),
                  about="first 2 of 4 Dense layers trainable=False"),
    KerasScenario("k-h-dropout", "healthy", h_dropout, chk.healthy(), about="Dropout 0.5 after each layer"),
    KerasScenario("k-h-label-smoothing", "healthy", h_label_smoothing, chk.healthy(),
                  about="CategoricalCrossentropy(label_smoothing=0.1)"),
    KerasScenario("k-h-cnn-batchnorm", "healthy", h_cnn_batchnorm, chk.healthy(), about="Conv-BN-ReLU CNN, SGD momentum"),
    KerasScenario("k-h-weight-decay", "healthy", h_weight_decay, chk.healthy(),
                  about="SGD momentum with weight_decay=1e-2"),
    KerasScenario("k-h-residual-layernorm", "healthy", h_residual, chk.healthy(),
                  about="8 pre-norm residual blocks (functional API)"),
    KerasScenario("k-h-embedding-rows", "healthy", h_embedding_rows, chk.healthy(),
                  about="Embedding(1000) with 940 rows never looked up"),
    KerasScenario("k-h-loss-scale-bf16", "healthy", h_loss_scale, chk.healthy(),
                  about="mixed_bfloat16 layers + LossScaleOptimizer (scaled gradients)"),
    KerasScenario("k-h-grad-accumulation", "healthy", h_grad_accumulation, chk.healthy(),
                  about="Adam(gradient_accumulation_steps=4)"),
    KerasScenario("k-h-finetune-zero-head", "healthy", h_finetune_zero_head, chk.healthy(),
                  about="pre-trained body, new zero-initialised head, LR 3e-4"),
    KerasScenario("k-h-cosine-restarts", "healthy", h_cosine_restarts, chk.healthy(),
                  about="SGD with CosineDecayRestarts every 60 steps: the LR jumps back up 100x"),
    KerasScenario("k-p-explode-convex-lr-too-high", "exploding", p_convex_lr_too_high, chk.diverges(0), onset=0,
                  about="linear regression, SGD at 2.4/lambda_max: x1.4 per step from step 0"),
    KerasScenario("k-p-explode-lr-jump-300", "exploding", p_lr_jump_300, chk.diverges(300), onset=300,
                  about="ReLU MLP, SGD momentum, LR x30 at step 300 (schedule)"),
    KerasScenario("k-p-spike-huge-batch-250", "exploding", p_huge_batch_250, chk.norm_spike(250), onset=250,
                  about="one batch with inputs x1000 at step 250 (Adam)"),
    KerasScenario("k-p-nan-input-200", "nonfinite", p_nan_input_200, chk.nonfinite_at(200, loss_finite=False),
                  onset=200, about="one NaN feature in the batch of step 200"),
    KerasScenario("k-p-nan-zero-norm-180", "nonfinite", p_nan_zero_norm_180, chk.nonfinite_at(180, loss_finite=True),
                  onset=180, about="sqrt(sum h^2) of an all-zero row after layer h1 at step 180: finite loss"),
    KerasScenario("k-p-vanishing-sigmoid-10", "vanishing", p_vanishing_sigmoid, chk.vanishing("h0/kernel", "h9/kernel"),
                  onset=0, about="10 sigmoid Dense layers, SGD"),
    KerasScenario("k-p-vanishing-sigmoid-cnn", "vanishing", p_vanishing_sigmoid_cnn,
                  chk.vanishing("conv0/kernel", "conv7/kernel"), onset=0, about="8 sigmoid Conv2D layers"),
    KerasScenario("k-p-dead-layer3-bias", "dead_units", p_dead_bias("h2", 0.75, 46), chk.dead("h2", onset=0), onset=0,
                  dead_layers=("h2",), about="75% of layer h2's units start with bias -5"),
    KerasScenario("k-p-dead-layer1-bias", "dead_units", p_dead_bias("h0", 0.6, 47), chk.dead("h0", onset=0), onset=0,
                  dead_layers=("h0",), about="60% of the first layer's units start with bias -5"),
    KerasScenario("k-p-dead-cnn-channels", "dead_units", p_dead_cnn_channels, chk.dead("conv1", onset=0), onset=0,
                  dead_layers=("conv1",), about="second Conv2D's biases initialised to -4"),
    KerasScenario("k-p-loss-spike-targets-250", "loss_spike", p_loss_spike_targets_250, chk.loss_jump(250), onset=250,
                  about="regression targets x30 in the batch of step 250"),
]
