"""Pathological PyTorch scenarios: explosions, non-finite gradients, vanishing gradients, dead
units and loss spikes, at different depths and onsets (from step 0, and late).

Each one's label is confirmed on the unwatched run by plain autograd (see ``torch_checks``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import checks as chk
from . import torch_models as tm
from .torch_harness import Scenario, Supervised, TorchRun
from .torch_models import Batch


def _sgd(model: nn.Module, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def _jump(at: int, factor: float):  # noqa: ANN202 - a small closure
    return lambda t: factor if t >= at else 1.0


def explode_convex_lr_too_high() -> TorchRun:
    """Full-batch linear regression with SGD at 2.4 / (largest Hessian eigenvalue): every step
    multiplies the error along the top eigenvector by 1.4, the textbook divergence."""
    data = tm.regression(31)
    top = float(torch.linalg.eigvalsh(2 * data[0].T @ data[0] / len(data[0]))[-1])
    torch.manual_seed(31)
    model = nn.Linear(10, 1)
    return Supervised(model, _sgd(model, 2.4 / top), lambda i: data, F.mse_loss, data)


def explode_mlp_lr_too_high() -> TorchRun:
    data = tm.regression(31)
    model = tm.mlp(31, depth=3, width=32)
    return Supervised(model, _sgd(model, 0.7), tm.cycle(data, 32), F.mse_loss, data)


def explode_lr_jump_300() -> TorchRun:
    data = tm.regression(32)
    model = tm.mlp(32, depth=3, width=32)
    return Supervised(model, _sgd(model, 0.01, 0.9), tm.cycle(data, 32), F.mse_loss, data, lr_factor=_jump(300, 30.0))


def explode_lstm_lr_jump_300() -> TorchRun:
    data = tm.sequences(34)
    model = tm.LSTMRegressor(34)
    return Supervised(model, _sgd(model, 0.1, 0.9), tm.cycle(data, 32), F.mse_loss, data, lr_factor=_jump(300, 30.0))


def explode_lr_spike_150() -> TorchRun:
    data = tm.regression(48)
    model = tm.mlp(48, depth=3, width=32)
    return Supervised(model, _sgd(model, 0.01), tm.cycle(data, 32), F.mse_loss, data,
                      lr_factor=lambda t: 100.0 if 150 <= t < 153 else 1.0)


def _huge_at(step: int, scale: float):  # noqa: ANN202
    def transform(i: int, b: Batch) -> Batch:
        return (b[0] * scale, b[1]) if i == step else b

    return transform


def spike_huge_batch_250() -> TorchRun:
    data = tm.regression(35)
    model = tm.mlp(35, depth=3, width=32)
    return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                      tm.cycle(data, 32, _huge_at(250, 1e3)), F.mse_loss, data)


def explode_transformer_lr_jump_150() -> TorchRun:
    data = tm.tokens(36)
    model = tm.TinyTransformer(36)
    return Supervised(model, _sgd(model, 0.05, 0.9), tm.cycle(data, 32), F.cross_entropy, data,
                      lr_factor=_jump(150, 100.0))


def dead_cnn_after_lr_jump_200() -> TorchRun:
    data = tm.images(37)
    model = tm.SmallCNN(37, batchnorm=False)
    return Supervised(model, _sgd(model, 0.02, 0.9), tm.cycle(data, 32), F.cross_entropy, data,
                      lr_factor=_jump(200, 100.0))


def _nan_at(step: int):  # noqa: ANN202
    def transform(i: int, b: Batch) -> Batch:
        if i != step:
            return b
        x = b[0].clone()
        x[3, 2] = float("nan")
        return x, b[1]

    return transform


def nan_input_200() -> TorchRun:
    data = tm.regression(38)
    model = tm.mlp(38, depth=3, width=32)
    return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                      tm.cycle(data, 32, _nan_at(200)), F.mse_loss, data)


def _zero_row(step: int | None, every: int | None = None):  # noqa: ANN202
    def transform(i: int, b: Batch) -> Batch:
        if (step is not None and i == step) or (every is not None and i % every == 0):
            x = b[0].clone()
            x[5] = 0.0
            return x, b[1]
        return b

    return transform


def nan_zero_norm(at: int, step: int | None, every: int | None = None):  # noqa: ANN202
    def build() -> TorchRun:
        data = tm.regression(39 + at)
        model = tm.NormFeatureNet(39 + at, depth=4, at=at)
        return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                          tm.cycle(data, 32, _zero_row(step, every)), F.mse_loss, data)

    return build


def _logits_blowup(step: int):  # noqa: ANN202
    def transform(i: int, b: Batch) -> Batch:
        return (b[0] * 300.0, b[1]) if i == step else b

    return transform


def handwritten_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """softmax then log, as people write it: log(0) = -inf once a probability underflows."""
    p = torch.softmax(out, 1)
    return -(torch.log(p) * F.one_hot(y, out.shape[1])).sum(1).mean()


def nan_log_softmax_220() -> TorchRun:
    data = tm.classification(42)
    model = tm.mlp(42, depth=2, width=32, d_out=4)
    return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                      tm.cycle(data, 32, _logits_blowup(220)), handwritten_cross_entropy, data)


def vanishing_sigmoid() -> TorchRun:
    data = tm.regression(43)
    model = tm.mlp(43, depth=10, width=32, act=nn.Sigmoid)
    return Supervised(model, _sgd(model, 0.05), tm.cycle(data, 32), F.mse_loss, data)


def vanishing_sigmoid_adam() -> TorchRun:
    data = tm.classification(44)
    model = tm.mlp(44, depth=7, width=32, act=nn.Sigmoid, d_out=4)
    return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3), tm.cycle(data, 32), F.cross_entropy, data)


def vanishing_sigmoid_cnn() -> TorchRun:
    data = tm.images(45)
    model = tm.SmallCNN(45, batchnorm=False, act=nn.Sigmoid, depth=8)
    return Supervised(model, _sgd(model, 0.05), tm.cycle(data, 32), F.cross_entropy, data)


def dead_bias(layer: int, share: float, seed: int):  # noqa: ANN202
    """A 4-layer ReLU MLP where ``share`` of layer ``layer``'s units start with bias -5: they never
    fire (their pre-activations stay far below 0), the others train normally."""

    def build() -> TorchRun:
        data = tm.regression(seed)
        model = tm.mlp(seed, depth=4, width=32)
        with torch.no_grad():
            model[2 * layer].bias[: int(share * 32)] = -5.0
        return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3), tm.cycle(data, 32), F.mse_loss, data)

    return build


def dead_cnn_channels() -> TorchRun:
    data = tm.images(49)
    model = tm.SmallCNN(49, batchnorm=False)
    nn.init.constant_(model.features[2].bias, -4.0)
    return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3), tm.cycle(data, 32), F.cross_entropy, data)


def _targets_times(step: int, scale: float):  # noqa: ANN202
    def transform(i: int, b: Batch) -> Batch:
        return (b[0], b[1] * scale) if i == step else b

    return transform


def loss_spike_targets_250() -> TorchRun:
    data = tm.regression(50)
    model = tm.mlp(50, depth=3, width=32)
    return Supervised(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                      tm.cycle(data, 32, _targets_times(250, 30.0)), F.mse_loss, data)


def _shuffled_labels(step: int):  # noqa: ANN202
    def transform(i: int, b: Batch) -> Batch:
        return (b[0], (b[1] + 1) % 4) if i == step else b

    return transform


def loss_spike_wrong_labels_200() -> TorchRun:
    data = tm.classification(51)
    model = tm.mlp(51, depth=3, width=64, d_out=4)
    return Supervised(model, torch.optim.Adam(model.parameters(), lr=3e-3),
                      tm.cycle(data, 32, _shuffled_labels(200)), F.cross_entropy, data)


SCENARIOS: list[Scenario] = [
    Scenario("p-explode-convex-lr-too-high", "exploding", explode_convex_lr_too_high, 150, chk.diverges(0),
             onset=0, remedy=True, about="linear regression, SGD at 2.4/lambda_max: x1.4 per step from step 0"),
    Scenario("p-explode-mlp-lr-too-high", "exploding", explode_mlp_lr_too_high, 150, chk.diverges(0),
             onset=0, remedy=True, about="ReLU MLP, SGD LR 0.7: NaN within 10 steps"),
    Scenario("p-explode-lr-jump-300", "exploding", explode_lr_jump_300, 400, chk.diverges(300), onset=300,
             remedy=True, about="ReLU MLP, SGD momentum, LR x30 at step 300"),
    Scenario("p-explode-lstm-lr-jump-300", "exploding", explode_lstm_lr_jump_300, 400, chk.diverges(300),
             onset=300, remedy=True, about="2-layer LSTM, SGD momentum, LR x30 at step 300"),
    Scenario("p-explode-transformer-lr-jump-150", "exploding", explode_transformer_lr_jump_150, 250,
             chk.diverges(150), onset=150, remedy=True, about="Transformer, SGD momentum, LR x100 at step 150"),
    Scenario("p-explode-lr-spike-150", "exploding", explode_lr_spike_150, 300, chk.diverges(150), onset=150,
             remedy=True, about="ReLU MLP, SGD, LR x100 for 3 steps at step 150 (a bad schedule)"),
    Scenario("p-spike-huge-batch-250", "exploding", spike_huge_batch_250, 350, chk.norm_spike(250), onset=250,
             remedy=True, about="one batch with inputs x1000 at step 250 (Adam)"),
    Scenario("p-nan-input-200", "nonfinite", nan_input_200, 300, chk.nonfinite_at(200, loss_finite=False),
             onset=200, remedy=True, about="one NaN feature in the batch of step 200"),
    Scenario("p-nan-zero-norm-depth1-180", "nonfinite", nan_zero_norm(1, 180), 300,
             chk.nonfinite_at(180, loss_finite=True), onset=180, remedy=True,
             about="sqrt(sum h^2) of an all-zero row after layer 1 at step 180: finite loss, NaN grads in layers 0-1"),
    Scenario("p-nan-zero-norm-depth3-every8", "nonfinite", nan_zero_norm(3, None, every=8), 300,
             chk.nonfinite_at(0, loss_finite=True), onset=0, remedy=True,
             about="same after layer 3, in one batch of 8 from step 0: finite loss, NaN grads in layers 0-3"),
    Scenario("p-nan-log-softmax-220", "nonfinite", nan_log_softmax_220, 300, chk.first_nonfinite(),
             remedy=True, about="hand-written log(softmax) and a batch with inputs x300 at step 220: log(0)"),
    Scenario("p-vanishing-sigmoid-10", "vanishing", vanishing_sigmoid, 150,
             chk.vanishing("0.weight", "18.weight"), onset=0, about="10 sigmoid layers, default init, SGD"),
    Scenario("p-vanishing-sigmoid-7-adam", "vanishing", vanishing_sigmoid_adam, 150,
             chk.vanishing("0.weight", "12.weight"), onset=0, about="7 sigmoid layers, Adam, classification"),
    Scenario("p-vanishing-sigmoid-cnn", "vanishing", vanishing_sigmoid_cnn, 150,
             chk.vanishing("features.0.weight", "features.14.weight"), onset=0,
             about="8 sigmoid conv layers without BatchNorm"),
    Scenario("p-dead-layer3-bias", "dead_units", dead_bias(2, 0.75, 46), 150, chk.dead("5", onset=0), onset=0,
             dead_modules=("5",), about="4-layer ReLU MLP, 75% of layer 3's units start with bias -5"),
    Scenario("p-dead-layer1-bias", "dead_units", dead_bias(0, 0.6, 47), 150, chk.dead("1", onset=0), onset=0,
             dead_modules=("1",), about="4-layer ReLU MLP, 60% of the first layer's units start with bias -5"),
    Scenario("p-dead-cnn-channels", "dead_units", dead_cnn_channels, 150,
             chk.dead("features.3", onset=0), onset=0, dead_modules=("features.3",),
             about="CNN, second conv's biases initialised to -4: its channels never fire"),
    Scenario("p-dead-cnn-after-lr-jump-200", "dead_units", dead_cnn_after_lr_jump_200, 300, chk.dead("features.3"),
             dead_modules=("features.3",), about="CNN without BatchNorm, LR x100 at step 200 kills the second conv's channels"),
    Scenario("p-loss-spike-targets-250", "loss_spike", loss_spike_targets_250, 350, chk.loss_jump(250), onset=250,
             about="regression targets x30 in the batch of step 250"),
    Scenario("p-loss-spike-wrong-labels-200", "loss_spike", loss_spike_wrong_labels_200, 300, chk.loss_jump(200),
             onset=200, about="every label of the batch of step 200 shifted by one class"),
]
