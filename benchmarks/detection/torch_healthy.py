"""Healthy PyTorch scenarios, each chosen to tempt a false alarm.

Every one must stay silent (no warning or error finding). The label check confirms that the run
learns with finite values, and where it matters that the trap is really set (the gradients really
shrink 100x, the LR really moves 10x, the frozen tensors really have no gradient).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import checks as chk
from . import torch_models as tm
from .scoring import LabelCheck
from .torch_harness import Group, OnBackward, Scenario, Supervised, TorchRun, Trace


def _adam(model: nn.Module, lr: float = 1e-3, **kw: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, **kw)  # type: ignore[arg-type]


def mlp_adam() -> TorchRun:
    data = tm.classification(1)
    model = tm.mlp(1, depth=4, width=64, d_out=4)
    return Supervised(model, _adam(model), tm.cycle(data, 32), F.cross_entropy, data)


def warmup_transformer() -> TorchRun:
    data = tm.tokens(2)
    model = tm.TinyTransformer(2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / 50) * (0.5 * (1 + math.cos(math.pi * min(t, 200) / 200)) if t >= 50 else 1.0)
    )
    return Supervised(model, opt, tm.cycle(data, 32), F.cross_entropy, data, schedulers=[sched])


def convex_converges() -> TorchRun:
    g = tm.generator(3)
    x = torch.randn(256, 5, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 0.7
    torch.manual_seed(3)
    model = nn.Linear(5, 1)
    return Supervised(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda i: (x, y), F.mse_loss, (x, y))


def frozen_backbone() -> TorchRun:
    data = tm.classification(4)
    model = tm.mlp(4, depth=4, width=32, d_out=4)
    for p in model[:4].parameters():
        p.requires_grad_(False)
    return Supervised(model, _adam(model, 3e-3), tm.cycle(data, 32), F.cross_entropy, data)


def sparse_embedding() -> TorchRun:
    g = tm.generator(5)
    t = torch.randint(0, 60, (256, 6), generator=g)  # 940 of 1000 rows never looked up
    y = (t.float().mean(1) > 30).long()
    model = tm.SparseBag(5)
    sparse = torch.optim.SparseAdam(list(model.embed.parameters()), lr=1e-2)
    dense = torch.optim.Adam(model.body.parameters(), lr=3e-3)
    return Supervised(model, [sparse, dense], tm.cycle((t, y), 32), F.cross_entropy, (t, y))


def bf16_grad_scaler() -> TorchRun:
    data = tm.classification(6)
    model = tm.mlp(6, depth=3, width=64, d_out=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    return Supervised(model, _adam(model, 2e-3), tm.cycle(data, 32), F.cross_entropy, data,
                      scaler=scaler, autocast=torch.bfloat16)


def grad_accumulation() -> TorchRun:
    data = tm.regression(7)
    model = tm.mlp(7, depth=3, width=32)
    return Supervised(model, _adam(model, 2e-3), tm.cycle(data, 16), F.mse_loss, data, accumulate=4)


def weight_decay_sgd() -> TorchRun:
    data = tm.classification(8)
    model = tm.mlp(8, depth=3, width=64, d_out=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    return Supervised(model, opt, tm.cycle(data, 32), F.cross_entropy, data)


def dropout_mlp() -> TorchRun:
    data = tm.classification(9)
    model = tm.mlp(9, depth=3, width=64, d_out=4, dropout=0.5)
    return Supervised(model, _adam(model), tm.cycle(data, 32), F.cross_entropy, data)


def label_smoothing() -> TorchRun:
    data = tm.classification(10)
    model = tm.mlp(10, depth=3, width=64, d_out=4)
    return Supervised(model, _adam(model, 3e-3), tm.cycle(data, 32),
                      lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1), data)


class GANRun(TorchRun):
    """A GAN on a 2-D Gaussian: the discriminator and the generator each step after their own
    backward pass (two optimizers, two watches)."""

    def __init__(self, seed: int = 11) -> None:
        self.gen, self.disc = tm.Generator(seed), tm.Discriminator(seed + 1)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
        self.groups = [Group(self.disc, [self.opt_d]), Group(self.gen, [self.opt_g])]
        self.rng = tm.generator(seed)
        self.center = torch.tensor([2.0, -1.0])
        self.eval_z = torch.randn(512, 4, generator=tm.generator(seed + 2))

    def step(self, t: int, on_backward: OnBackward) -> float:
        real = torch.randn(64, 2, generator=self.rng) * 0.5 + self.center
        z = torch.randn(64, 4, generator=self.rng)
        ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
        self.opt_d.zero_grad(set_to_none=True)
        fake = self.gen(z).detach()
        loss_d = F.binary_cross_entropy_with_logits(self.disc(real), ones) + \
            F.binary_cross_entropy_with_logits(self.disc(fake), zeros)
        loss_d.backward()
        on_backward(0, loss_d.detach())
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g = F.binary_cross_entropy_with_logits(self.disc(self.gen(z)), ones)
        loss_g.backward()
        on_backward(1, loss_g.detach())
        self.opt_g.step()
        return float(loss_d)

    def eval_loss(self) -> float:
        """Distance of the generated mean from the real one (lower is better)."""
        with torch.no_grad():
            return float((self.gen(self.eval_z).mean(0) - self.center).norm())


def gan_check(trace: Trace) -> LabelCheck:
    finite = all(all(math.isfinite(v) for v in gt.loss) for gt in trace.groups)
    ok = finite and trace.eval_after < 0.5 * trace.eval_before
    return LabelCheck(ok, f"losses finite: {finite}; generated mean off by {trace.eval_before:.3g} -> {trace.eval_after:.3g}")


def finetune_zero_head() -> TorchRun:
    """Pre-train on one task (not watched), then fine-tune everything with a new zero-initialised
    head at a low LR on another task."""
    pre = tm.classification(12)
    model = tm.mlp(12, depth=3, width=64, d_out=4)
    opt = _adam(model)
    for i in range(150):
        x, y = tm.cycle(pre, 32)(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model[-1] = nn.Linear(64, 3)
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    data = tm.classification(13, classes=3)
    return Supervised(model, _adam(model, 3e-4), tm.cycle(data, 32), F.cross_entropy, data)


def residual_layernorm() -> TorchRun:
    data = tm.regression(14)
    model = tm.ResidualMLP(14)
    return Supervised(model, _adam(model), tm.cycle(data, 32), F.mse_loss, data)


def attention_no_warmup() -> TorchRun:
    data = tm.tokens(15)
    model = tm.TinyTransformer(15, dropout=0.1)
    return Supervised(model, _adam(model, 1e-3), tm.cycle(data, 32), F.cross_entropy, data)


def attention_separate_qkv() -> TorchRun:
    data = tm.tokens(22)
    model = tm.QKVAttention(22)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 50))
    return Supervised(model, opt, tm.cycle(data, 32), F.cross_entropy, data, schedulers=[sched])


def cnn_batchnorm() -> TorchRun:
    data = tm.images(16)
    model = tm.SmallCNN(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Supervised(model, opt, tm.cycle(data, 32), F.cross_entropy, data)


def lstm() -> TorchRun:
    data = tm.sequences(17)
    model = tm.LSTMRegressor(17)
    return Supervised(model, _adam(model, 5e-3), tm.cycle(data, 32), F.mse_loss, data)


def cosine_restarts() -> TorchRun:
    data = tm.classification(18)
    model = tm.mlp(18, depth=3, width=64, d_out=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=60, eta_min=1e-3)
    return Supervised(model, opt, tm.cycle(data, 32), F.cross_entropy, data, schedulers=[sched])


def memorise_to_zero_loss() -> TorchRun:
    data = tm.classification(19, n=64)
    model = tm.mlp(19, depth=2, width=128, d_out=4)
    return Supervised(model, _adam(model, 3e-3), lambda i: data, F.cross_entropy, data)


def batch_of_two() -> TorchRun:
    data = tm.regression(20)
    model = tm.mlp(20, depth=3, width=32)
    return Supervised(model, torch.optim.SGD(model.parameters(), lr=0.02), tm.cycle(data, 2), F.mse_loss, data)


def deep_tanh() -> TorchRun:
    data = tm.regression(21)
    model = tm.mlp(21, depth=8, width=32, act=nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=5 / 3)
    return Supervised(model, _adam(model), tm.cycle(data, 32), F.mse_loss, data)


SCENARIOS: list[Scenario] = [
    Scenario("h-mlp-adam", "healthy", mlp_adam, 300, chk.healthy(),
             about="ReLU MLP 4x64, Adam, cross-entropy: the baseline"),
    Scenario("h-warmup-transformer", "healthy", warmup_transformer, 250,
             chk.healthy(extra=chk.trap_lr_range(0.02, 1.0)),
             about="tiny Transformer, AdamW, 50-step linear warm-up then cosine: norms move with the LR"),
    Scenario("h-convex-converges", "healthy", convex_converges, 300,
             chk.healthy(extra=chk.trap_converges(1e4)),
             about="linear regression, SGD: gradients shrink to ~0 as it converges (not vanishing)"),
    Scenario("h-frozen-backbone", "healthy", frozen_backbone, 200,
             chk.healthy(extra=chk.frozen_grads_none(("0.", "2."))),
             about="first 2 of 4 layers frozen, all parameters in the optimizer: grads None, not zero"),
    Scenario("h-sparse-embedding", "healthy", sparse_embedding, 200, chk.healthy(),
             about="nn.Embedding(sparse=True) + SparseAdam with Adam for the rest; 94% of rows never looked up"),
    Scenario("h-bf16-grad-scaler", "healthy", bf16_grad_scaler, 200, chk.healthy(),
             about="torch.autocast(bfloat16) + GradScaler on CPU (scaled gradients, watch(scaler=...))"),
    Scenario("h-grad-accumulation", "healthy", grad_accumulation, 150, chk.healthy(),
             about="4 micro-batches per optimizer step"),
    Scenario("h-weight-decay-sgd", "healthy", weight_decay_sgd, 300, chk.healthy(),
             about="SGD momentum 0.9, weight decay 1e-2: weights shrink, ||g||/||W|| drifts"),
    Scenario("h-dropout", "healthy", dropout_mlp, 300, chk.healthy(),
             about="dropout 0.5 after each layer: noisy gradients, many exactly-zero activations per step"),
    Scenario("h-label-smoothing", "healthy", label_smoothing, 300, chk.healthy(),
             about="cross-entropy with label smoothing 0.1: the loss plateaus well above 0"),
    Scenario("h-gan", "healthy", GANRun, 300, chk.all_of(gan_check),
             about="GAN, two optimizers stepping after separate backward passes, one watch each"),
    Scenario("h-finetune-zero-head", "healthy", finetune_zero_head, 200, chk.healthy(),
             about="pre-trained MLP, new zero-initialised head, LR 3e-4: ||W_head|| = 0 at the start"),
    Scenario("h-residual-layernorm", "healthy", residual_layernorm, 150, chk.healthy(),
             about="12 pre-norm residual blocks (50 weight tensors deep)"),
    Scenario("h-attention", "healthy", attention_no_warmup, 200, chk.healthy(),
             about="Transformer with attention dropout 0.1, Adam without warm-up"),
    Scenario("h-attention-separate-qkv", "healthy", attention_separate_qkv, 250, chk.healthy(),
             about="self-attention with separate q/k/v Linear layers (as in HF BERT/LLaMA), 50-step warm-up"),
    Scenario("h-cnn-batchnorm", "healthy", cnn_batchnorm, 200, chk.healthy(),
             about="Conv-BN-ReLU CNN, SGD momentum"),
    Scenario("h-lstm", "healthy", lstm, 200, chk.healthy(),
             about="2-layer LSTM regression"),
    Scenario("h-cosine-restarts", "healthy", cosine_restarts, 300,
             chk.healthy(extra=chk.trap_lr_range(0.02, 1.0)),
             about="SGD with warm restarts every 60 steps: the LR jumps 100x back up"),
    Scenario("h-memorise-zero-loss", "healthy", memorise_to_zero_loss, 400, chk.healthy(min_drop=0.01),
             about="64 samples memorised to ~0 loss: tiny losses with large relative wiggles"),
    Scenario("h-batch-of-two", "healthy", batch_of_two, 300, chk.healthy(),
             about="batch size 2, SGD: very noisy gradient norms"),
    Scenario("h-deep-tanh", "healthy", deep_tanh, 200, chk.healthy(),
             about="8 tanh layers with Xavier init (gain 5/3): some decay with depth, not vanishing"),
]
