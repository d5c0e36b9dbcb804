"""Everything PyTorch in the zoo: a :class:`~benchmarks.zoo.spec.RunSpec` made into a model,
an optimizer, a schedule and a ``DataLoader``, trained unwatched with a probe or watched.

The loop is the one users write: ``DataLoader(TensorDataset(x, y), batch_size=..., shuffle=True,
generator=...)`` with its defaults (``drop_last=False``: the last batch of an epoch is ragged),
``zero_grad`` / forward (under ``torch.autocast("cpu", torch.bfloat16)`` when asked) / loss /
``backward`` / ``optimizer.step()`` / ``scheduler.step()``. Everything is seeded from the spec's
seed (``torch.manual_seed`` for the init and dropout, the loader's own generator for the order),
so the probe, ``observe``, ``auto`` and twin runs see the same batches in the same order.

The probe is :class:`benchmarks.detection.torch_harness.Probe` (plain PyTorch: the loss, every
gradient's and parameter's norm, the share of units of every ``nn.ReLU`` that output exactly zero
on the whole batch), called after ``backward()`` and before ``optimizer.step()``.
"""

from __future__ import annotations

import math
import time
import types
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

import gradwatch
from benchmarks.detection.torch_harness import Group, Probe

from . import data
from .evaluate import RunResult
from .spec import TOKEN_BINS, TOKEN_FAMILIES, RunSpec

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class InputOp(nn.Module):
    """A hand-written op on the input that is singular at the all-zero example: ``l2norm``
    returns ``x / sqrt(sum x^2)`` (0/0 forward), ``log_energy`` appends ``log(sum x^2)`` (-inf
    forward), ``norm_feature`` appends ``sqrt(sum (P x)^2)`` of a learned bias-free projection
    ``P`` to 4 dimensions (finite forward, NaN gradient into ``P``). Images get the extra
    feature as an extra constant channel."""

    def __init__(self, op: str, features: int) -> None:
        super().__init__()
        self.op = op
        self.proj = nn.Linear(features, 4, bias=False) if op == "norm_feature" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self.op == "l2norm":
            return x / torch.sqrt((flat * flat).sum(1)).view(shape)
        if self.op == "log_energy":
            extra = torch.log((flat * flat).sum(1))
        else:
            h = self.proj(flat)
            extra = torch.sqrt((h * h).sum(1))
        extra = extra.view(shape).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([x, extra], 1)

    @staticmethod
    def extra(op: str) -> int:
        return 0 if op in ("none", "l2norm") else 1


def _norm1d(norm: str, width: int) -> list[nn.Module]:
    return {"none": [], "batch": [nn.BatchNorm1d(width)], "layer": [nn.LayerNorm(width)]}[norm]


def _mlp(spec: RunSpec, d_in: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if spec.input_op != "none":
        layers.append(InputOp(spec.input_op, d_in))
        d_in += InputOp.extra(spec.input_op)
    d = d_in
    for _ in range(spec.depth):
        layers += [nn.Linear(d, spec.width), *_norm1d(spec.norm, spec.width), ACTIVATIONS[spec.activation]()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        d = spec.width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Pre-norm residual block: ``x + fc2(drop(act(fc1(norm(x)))))``."""

    def __init__(self, width: int, activation: str, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm = nn.Sequential(*_norm1d(norm, width))
        self.fc1 = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class ResMLP(nn.Module):
    def __init__(self, spec: RunSpec, d_in: int, d_out: int) -> None:
        super().__init__()
        self.input_op = InputOp(spec.input_op, d_in) if spec.input_op != "none" else nn.Identity()
        self.inp = nn.Linear(d_in + InputOp.extra(spec.input_op), spec.width)
        self.blocks = nn.Sequential(*[Block(spec.width, spec.activation, spec.norm, spec.dropout)
                                      for _ in range(spec.depth)])
        self.out_norm = nn.Sequential(*_norm1d(spec.norm, spec.width))
        self.head = nn.Linear(spec.width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.out_norm(self.blocks(self.inp(self.input_op(x)))))


def _cnn(spec: RunSpec, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    if spec.input_op != "none":
        layers.append(InputOp(spec.input_op, 64))
        c_in += InputOp.extra(spec.input_op)
    channels = [spec.width, 2 * spec.width, 2 * spec.width][:spec.depth]
    for i, c in enumerate(channels):
        layers.append(nn.Conv2d(c_in, c, 3, padding=1))
        if spec.norm == "batch":
            layers.append(nn.BatchNorm2d(c))
        elif spec.norm == "layer":
            layers.append(nn.GroupNorm(1, c))
        layers.append(ACTIVATIONS[spec.activation]())
        if i == 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers.append(nn.Flatten())
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    layers.append(nn.Linear(c_in * 16, d_out))
    return nn.Sequential(*layers)


class Recurrent(nn.Module):
    """Digits rows as a sequence of 8 steps x 8 features; the last hidden state classifies."""

    def __init__(self, spec: RunSpec, d_out: int) -> None:
        super().__init__()
        kwargs: dict[str, Any] = {"num_layers": spec.depth, "batch_first": True, "dropout": spec.dropout}
        if spec.cell in ("rnn", "rnn_relu"):
            self.rnn: nn.Module = nn.RNN(8, spec.width, nonlinearity="relu" if spec.cell == "rnn_relu" else "tanh", **kwargs)
        elif spec.cell == "lstm":
            self.rnn = nn.LSTM(8, spec.width, **kwargs)
        else:
            self.rnn = nn.GRU(8, spec.width, **kwargs)
        self.head = nn.Linear(spec.width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TokenTransformer(nn.Module):
    """Quantised features as tokens (a bin id per feature) with a learned position embedding,
    a small encoder, mean pooling."""

    def __init__(self, spec: RunSpec, length: int, d_out: int) -> None:
        super().__init__()
        d = spec.width
        self.tok = nn.Embedding(TOKEN_BINS, d)
        self.pos = nn.Embedding(length, d)
        layer = nn.TransformerEncoderLayer(d, spec.heads, 2 * d, spec.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.depth, enable_nested_tensor=False)
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos.weight
        return self.head(self.encoder(h).mean(1))


class TokenBag(nn.Module):
    """Each (feature, bin) pair is a token id; embeddings averaged, one hidden ReLU layer."""

    def __init__(self, spec: RunSpec, length: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.arange(length) * TOKEN_BINS, persistent=False)
        self.emb = nn.Embedding(length * TOKEN_BINS, spec.width)
        self.hidden = nn.Linear(spec.width, 2 * spec.width)
        self.act = nn.ReLU()
        self.head = nn.Linear(2 * spec.width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.hidden(self.emb(x + self.offsets).mean(1))))


def build_model(spec: RunSpec, dataset: data.Dataset) -> nn.Module:
    """The model for ``spec`` (call under ``torch.manual_seed``: the init draws from it)."""
    d_out = dataset.classes if dataset.task == "classification" else 1
    f = spec.family
    if f == "mlp":
        return _mlp(spec, dataset.features, d_out)
    if f == "resmlp":
        return ResMLP(spec, dataset.features, d_out)
    if f == "cnn":
        return _cnn(spec, d_out)
    if f == "rnn":
        return Recurrent(spec, d_out)
    if f == "transformer":
        return TokenTransformer(spec, dataset.features, d_out)
    if f == "embedding":
        return TokenBag(spec, dataset.features, d_out)
    if f in ("logistic", "linear"):
        layers: list[nn.Module] = []
        d_in = dataset.features
        if spec.input_op != "none":
            layers.append(InputOp(spec.input_op, d_in))
            d_in += InputOp.extra(spec.input_op)
        return nn.Sequential(*layers, nn.Linear(d_in, d_out))
    raise ValueError(f"Unknown family {f!r}.")


def _hidden_units(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(pre-activation layer, activation module name) of each hidden layer, forward order."""
    out = []
    last_affine: nn.Module | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.endswith("proj"):
            last_affine = module
        elif isinstance(module, nn.ReLU) and last_affine is not None:
            out.append((last_affine, name))
    return out


def inject_init(spec: RunSpec, model: nn.Module) -> str:
    """Apply an init pathology in place; returns the killed ReLU module's name (``dying_relu``)."""
    p = spec.pathology
    if p is None:
        return ""
    with torch.no_grad():
        if p.name in ("huge_init", "tiny_init"):
            for param in model.parameters():
                if param.dim() >= 2:
                    param.mul_(p.factor)
        elif p.name == "exploding_rnn":
            for name, param in model.named_parameters():
                if "weight_hh" in name:
                    nn.init.orthogonal_(param, gain=p.factor)
        elif p.name == "dying_relu":
            affine, act_name = _hidden_units(model)[p.layer]
            k = max(1, round(p.share * affine.bias.numel()))
            affine.bias[:k] = -p.factor
            return act_name
    return ""


def freeze(spec: RunSpec, model: nn.Module) -> None:
    if spec.frozen != "first":
        return
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) and not name.endswith("proj"):
            for param in module.parameters():
                param.requires_grad_(False)
            return


def effective_lr(spec: RunSpec) -> float:
    p = spec.pathology
    return spec.lr * p.factor if p is not None and p.name == "lr_high" else spec.lr


def build_optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), effective_lr(spec), spec.weight_decay
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=wd)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    if spec.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    raise ValueError(f"Unknown optimizer {spec.optimizer!r}.")


def build_schedule(spec: RunSpec, opt: torch.optim.Optimizer) -> Any:
    s, steps, warm = spec.schedule, spec.steps, spec.warmup
    if s == "constant":
        return None
    if s == "warmup":
        return torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / max(warm, 1), total_iters=max(warm, 1))
    if s == "cosine":
        if not warm:
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(t, steps) / steps)))
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 3), gamma=0.3)
    if s == "onecycle":
        momentum = spec.optimizer in ("adam", "adamw") or spec.momentum > 0
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=effective_lr(spec), total_steps=steps + 1,
                                                   cycle_momentum=momentum)
    raise ValueError(f"Unknown schedule {s!r}.")


def _tensors(spec: RunSpec, dataset: data.Dataset) -> tuple[torch.Tensor, ...]:
    if spec.family in TOKEN_FAMILIES:
        edges = data.quantile_edges(dataset.x_train, TOKEN_BINS)
        x_tr = torch.from_numpy(data.tokens(dataset.x_train, edges))
        x_te = torch.from_numpy(data.tokens(dataset.x_test, edges))
    else:
        x_tr, x_te = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.x_test)
        if spec.family == "cnn":
            x_tr, x_te = x_tr.view(-1, 1, 8, 8), x_te.view(-1, 1, 8, 8)
        elif spec.family == "rnn":
            x_tr, x_te = x_tr.view(-1, 8, 8), x_te.view(-1, 8, 8)
    return x_tr, torch.from_numpy(dataset.y_train), x_te, torch.from_numpy(dataset.y_test)


def inject_batch(spec: RunSpec, t: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the batch of the onset step (data pathologies); other steps pass through."""
    p = spec.pathology
    if p is None or t != p.onset or p.name not in ("nan_input", "inf_input", "nan_label", "poisoned_batch", "zero_math"):
        return x, y
    x, y = x.clone(), y.clone()
    if p.name == "nan_input":
        x.view(x.shape[0], -1)[0, 0] = math.nan
    elif p.name == "inf_input":
        x.view(x.shape[0], -1)[0, 0] = math.inf
    elif p.name == "nan_label":
        y.view(-1)[0] = math.nan
    elif p.name == "poisoned_batch":
        x = x * p.factor
    else:
        x[0] = 0.0
    return x, y


class _Training:
    """One seeded training run's objects."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.dataset = data.load(spec.dataset, spec.dataset_options, spec.seed)
        x_tr, y_tr, self.x_test, self.y_test = _tensors(spec, self.dataset)
        self.x_train, self.y_train = x_tr, y_tr
        torch.manual_seed(spec.seed)
        self.model = build_model(spec, self.dataset)
        self.dead_module = inject_init(spec, self.model)
        freeze(spec, self.model)
        self.optimizer = build_optimizer(spec, self.model)
        self.schedule = build_schedule(spec, self.optimizer)
        self.loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=spec.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(spec.seed))
        self.classifier = self.dataset.task == "classification"
        if self.classifier:
            self.loss_fn: Any = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
        else:
            self.loss_fn = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x).float()

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(loss, accuracy) in eval mode; accuracy NaN for regression or non-finite outputs."""
        self.model.eval()
        with torch.no_grad():
            out = self.forward(x)
            loss = float(self.loss_fn(out, y))
            acc = math.nan
            if self.classifier:
                acc = float((out.argmax(1) == y).float().mean()) if bool(torch.isfinite(out).all()) else 0.0
        self.model.train()
        return loss, acc

    def weights(self) -> tuple[str, str]:
        names = [n for n, p in self.model.named_parameters() if p.dim() >= 2 and p.requires_grad
                 and not n.endswith("proj.weight")]
        return names[0], names[-1]

    def run(self, on_backward: Any) -> tuple[list[float], list[int]]:
        """The training loop; ``on_backward(loss)`` after ``backward()``, before ``step()``."""
        spec, opt = self.spec, self.optimizer
        jump = spec.pathology if spec.pathology is not None and spec.pathology.name == "lr_jump" else None
        losses: list[float] = []
        sizes: list[int] = []
        t = 0
        self.model.train()
        while t < spec.steps:
            for x, y in self.loader:
                if t >= spec.steps:
                    break
                x, y = inject_batch(spec, t, x, y)
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.forward(x), y)
                loss.backward()
                scheduled = [g["lr"] for g in opt.param_groups]
                if jump is not None and t >= jump.onset:
                    for g in opt.param_groups:
                        g["lr"] = g["lr"] * jump.factor
                on_backward(loss)
                opt.step()
                for g, lr in zip(opt.param_groups, scheduled):
                    g["lr"] = lr
                if self.schedule is not None:
                    self.schedule.step()
                losses.append(float(loss.detach()))
                sizes.append(int(x.shape[0]))
                t += 1
        return losses, sizes


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
              torch.float16: torch.int16}.get(a.dtype)
    return as_int is not None and torch.equal(a.view(as_int), b.view(as_int))  # NaN in the same places


class TorchRunner:
    """:class:`benchmarks.zoo.evaluate.Runner` for PyTorch (CPU)."""

    framework = "torch"

    def train(self, spec: RunSpec, mode: str) -> RunResult:
        """Train ``spec`` from its seed.

        Args:
            spec: The run.
            mode: ``"probe"`` (unwatched; the probe measures every step), ``"observe"``
                (``gradwatch.watch(model, optimizer, policy="observe", strict=True)``) or
                ``"auto"`` (``gradwatch.watch(model, optimizer)``, the defaults).

        Returns:
            The run's result.

        Raises:
            ValueError: for an unknown mode.
        """
        start = time.perf_counter()
        run = _Training(spec)
        before, _ = run.evaluate(run.x_train, run.y_train)
        trace = report = None
        caught: list[str] = []
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if mode == "probe":
                holder = types.SimpleNamespace(groups=[Group(run.model, [run.optimizer])])
                relus = [n for n, m in run.model.named_modules() if isinstance(m, nn.ReLU)]
                probe = Probe(holder, relus)  # type: ignore[arg-type]
                losses, sizes = run.run(lambda loss: probe.on_backward(0, loss.detach()))
                probe.remove()
                trace = probe.trace
            elif mode == "observe":
                watch = gradwatch.watch(run.model, run.optimizer, policy="observe", strict=True)
                try:
                    losses, sizes = run.run(watch.record_loss)
                finally:
                    report = watch.report()
                    watch.remove()
            elif mode == "auto":
                with gradwatch.watch(run.model, run.optimizer) as watch:
                    losses, sizes = run.run(watch.record_loss)
                    report = watch.report()
            else:
                raise ValueError(f"mode must be 'probe', 'observe' or 'auto'. Received mode={mode!r}.")
        caught = [str(w.message) for w in seen if isinstance(w.message, gradwatch.GradwatchWarning)]
        after, _ = run.evaluate(run.x_train, run.y_train)
        test_loss, test_acc = run.evaluate(run.x_test, run.y_test)
        first, last = run.weights()
        return RunResult(
            mode=mode, loss=losses, batch_sizes=sizes, train_loss_before=before, train_loss_after=after,
            test_loss=test_loss, test_accuracy=test_acc, chance=run.dataset.chance, classifier=run.classifier,
            params=[p.detach().clone() for p in run.model.parameters()], trace=trace, report=report,
            first_weight=first, last_weight=last, dead_module=run.dead_module, warnings=caught,
            seconds=time.perf_counter() - start)

    def same_params(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        """Every parameter bit-for-bit equal (``torch.equal``; NaN counts as equal to the same NaN)."""
        return len(a) == len(b) and all(_bit_equal(x, y) for x, y in zip(a, b))


def setup_worker() -> None:
    """One thread per process (the zoo runs one training per worker)."""
    torch.set_num_threads(1)
    np.seterr(all="ignore")


__all__ = ["TorchRunner", "build_model", "build_optimizer", "build_schedule", "inject_batch", "inject_init",
           "setup_worker"]
