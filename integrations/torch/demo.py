"""``gradwatch demo`` with PyTorch: three small real models, trained on synthetic data on the CPU.

1. A deep sigmoid MLP: gradients vanish towards the input; gradwatch names the modules after
   which a BatchNorm/LayerNorm should go (and changes nothing in the model).
2. An MLP whose learning rate is too high: unwatched, the run diverges to NaN; watched under
   ``auto``, the run goes back to its last healthy weights with a smaller LR, and ends finite and lower.
3. A NaN gradient behind a finite loss (``where(n > 0, h / sqrt(n), 0)`` on an all-zero row):
   the loss never shows it; unwatched, the first layer's weights silently turn NaN; watched, the
   poisoned steps are skipped and the layer where it starts is named.

Everything is generated here (no download) and runs in a few seconds.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

from gradwatch.errors import require

require("torch", "torch")  # a missing PyTorch raises MissingExtraError naming the extra to install

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.report import Report  # noqa: E402

WIDTH = 100


def _rule(title: str) -> None:
    print("=" * WIDTH)
    print(title)
    print("=" * WIDTH)


def gradient_picture(report: Report, width: int = 40) -> str:
    """Bars of each layer's last relative gradient ``||g|| / ||W||`` on a log scale."""
    rows = [(layer["layer"], layer["ratio"]) for layer in report.layers]
    finite = [r for _, r in rows if isinstance(r, float) and math.isfinite(r) and r > 0]
    if not finite:
        return "(no finite gradients to draw)"
    top = math.log10(max(finite))
    bottom = min(math.log10(min(finite)), top - 1.0)
    name_width = max(len(str(name)) for name, _ in rows)
    lines = [f"{'layer':<{name_width}}  relative gradient ||g||/||W|| (log scale, {10 ** bottom:.0e} .. {10 ** top:.0e})"]
    for name, ratio in rows:
        if not (isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0):
            bar, label = "", "no gradient" if not isinstance(ratio, float) or math.isnan(ratio) else str(ratio)
        else:
            bar = "#" * max(1, round(width * (math.log10(ratio) - bottom) / (top - bottom)))
            label = f"{ratio:.1e}"
        lines.append(f"{name:<{name_width}}  {bar:<{width}}  {label}")
    return "\n".join(lines)


def _show(report: Report, per_kind: int = 3) -> None:
    """The gradient picture, then the findings and (the first few of each kind of) actions."""
    print(gradient_picture(report))
    print()
    verdict = "HEALTHY" if report.healthy else "UNHEALTHY"
    print(f"gradwatch: {verdict} ({report.steps_measured} steps measured, policy={report.policy})")
    print("Findings:" if report.findings else "Findings: none")
    for finding in report.findings:
        print(f"  {finding}")
    if not report.actions:
        print("Actions: none")
        return
    print("Actions: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(report.action_counts.items())))
    shown: dict[str, int] = {}
    for action in report.actions:
        shown[action.kind] = shown.get(action.kind, 0) + 1
        if shown[action.kind] <= per_kind:
            print(f"  {action}")
        elif shown[action.kind] == per_kind + 1:
            print(f"  ... more {action.kind} actions ...")


def _classes(seed: int, n: int = 256, d_in: int = 16, k: int = 4) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return x, (x @ torch.randn(d_in, k, generator=g)).argmax(1)


def _regression(seed: int, n: int = 256) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, x[:, :1] * 2 + x[:, 1:2] ** 2 - 1


def _train(model: Any, opt: Any, steps: int, data: tuple[Any, Any], loss_fn: Any, watch: Any = None,
           batches: Any = None) -> list[float]:
    x, y = data
    losses = []
    for t in range(steps):
        xb = batches(t, x) if batches is not None else x
        opt.zero_grad()
        loss = loss_fn(model(xb), y)
        loss.backward()
        if watch is not None:
            watch.record_loss(loss)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _fmt_loss(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _sigmoid_mlp() -> Any:
    torch.manual_seed(0)
    mods: OrderedDict[str, Any] = OrderedDict()
    d = 16
    for i in range(10):
        mods[f"fc{i + 1}"] = nn.Linear(d, 32)
        mods[f"sigmoid{i + 1}"] = nn.Sigmoid()
        d = 32
    mods["out"] = nn.Linear(d, 4)
    return nn.Sequential(mods)


def vanishing_demo() -> Report:
    """Scenario 1: a 10-layer sigmoid MLP."""
    _rule("1. A deep sigmoid MLP (10 x Linear+Sigmoid, SGD): gradients vanish towards the input")
    data = _classes(0)
    model = _sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as w:
        losses = _train(model, opt, 60, data, nn.functional.cross_entropy, w)
    report = w.report()
    _show(report)
    print(f"\nloss: {_fmt_loss(losses[0])} -> {_fmt_loss(losses[-1])} after {len(losses)} steps: the early "
          "layers barely learn. The model itself was not changed: the recommendation is advice.")
    print()
    return report


def exploding_demo() -> tuple[Report, list[float], list[float]]:
    """Scenario 2: an MLP trained with SGD at lr=0.3, too high for it."""
    _rule("2. An MLP whose learning rate is too high (4 x Linear+Tanh, SGD lr=0.3)")

    def setup() -> tuple[Any, Any]:
        torch.manual_seed(0)
        layers: list[Any] = []
        d = 10
        for _ in range(4):
            layers += [nn.Linear(d, 64), nn.Tanh()]
            d = 64
        model = nn.Sequential(*layers, nn.Linear(d, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.3)

    data = _regression(1)
    model, opt = setup()
    plain = _train(model, opt, 150, data, nn.functional.mse_loss)
    first_nan = next((i for i, v in enumerate(plain) if not math.isfinite(v)), None)
    print(f"unwatched: loss {_fmt_loss(plain[0])} at step 0, {_fmt_loss(plain[20])} at step 20, "
          f"{'NaN from step ' + str(first_nan) if first_nan is not None else _fmt_loss(plain[-1])}")
    model, opt = setup()
    with gradwatch.watch(model, opt) as w:
        watched = _train(model, opt, 150, data, nn.functional.mse_loss, w)
    report = w.report()
    print(f"watched (policy=auto): loss {_fmt_loss(watched[0])} at step 0, {_fmt_loss(watched[-1])} at step "
          f"{len(watched) - 1}; LR now x{w.lr_factor:g} of the user's, clip level in force "
          f"{w.monitor.controls.clip_norm:.3g}\n")
    _show(report)
    print()
    return report, plain, watched


class NormalisedFeatures(nn.Module):
    """``h / ||h||`` written as ``where(n > 0, h / sqrt(n), 0)``: finite for an all-zero row, but
    the gradient there is NaN (the derivative of sqrt at 0, times 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(10, 16, bias=False)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x: Any) -> Any:
        h = self.embed(x)
        n = (h * h).sum(1, keepdim=True)
        h = torch.where(n > 0, h / n.sqrt(), torch.zeros_like(h))
        return self.head(self.body(h))


def nan_demo() -> tuple[Report, list[float], list[float]]:
    """Scenario 3: a NaN gradient behind a finite loss."""
    _rule("3. A NaN gradient behind a finite loss: where(n > 0, h / sqrt(n), 0) meets an all-zero input row")

    def batches(t: int, x: Any) -> Any:
        if t % 15 == 7:
            x = x.clone()
            x[3] = 0.0
        return x

    data = _regression(2, n=64)
    model = NormalisedFeatures()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    plain = _train(model, opt, 60, data, nn.functional.mse_loss, batches=batches)
    nan_weights = bool(torch.isnan(model.embed.weight).any())
    print(f"unwatched: loss {_fmt_loss(plain[0])} -> {_fmt_loss(plain[-1])} (always finite), but embed.weight "
          f"{'is NaN: the model silently ignores its input' if nan_weights else 'is finite'}")
    model = NormalisedFeatures()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with gradwatch.watch(model, opt) as w:
        watched = _train(model, opt, 60, data, nn.functional.mse_loss, w, batches=batches)
    report = w.report()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"watched (policy=auto): loss {_fmt_loss(watched[0])} -> {_fmt_loss(watched[-1])}, parameters "
          f"{'all finite' if finite else 'NOT finite'}\n")
    _show(report)
    print()
    return report, plain, watched


def main() -> int:
    """Run the three scenarios; returns the exit code (0)."""
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    start = time.perf_counter()
    vanishing_demo()
    exploding_demo()
    nan_demo()
    print(f"(gradwatch {gradwatch.__version__}, torch {torch.__version__}, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
