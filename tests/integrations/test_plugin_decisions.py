"""A ``gradwatch_select_actions`` plugin's decision is final, in every PyTorch adapter: the
Monitor owns it (``monitor.controls``), and the torch loop, the Lightning run and the Hugging Face
run all carry it out, on measured and unmeasured steps alike (docs/hooks.md). The Keras side is
``tests/keras/test_keras_plugins.py``, run once per backend."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.plugins import Hooks, make_plugin_manager  # noqa: E402
from gradwatch.testing import healthy  # noqa: E402

torch.set_num_threads(1)
LR, FACTOR = 0.1, 0.5  # 0.1 * 0.5 is exactly the float 0.05: bit-for-bit comparisons hold


class HalveTheLR:
    """From the first decision on, the learning rate runs at half the schedule (the policy
    alone would leave a healthy run untouched)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    @gradwatch.hookimpl
    def gradwatch_select_actions(self, findings, stats, decision, monitor):
        return dataclasses.replace(
            decision, lr_factor=FACTOR, controls=dataclasses.replace(decision.controls, lr_factor=FACTOR)
        )

    @gradwatch.hookimpl
    def gradwatch_on_step(self, stats, decision, monitor):
        self.lrs.append(stats.lr)


def monitor_with(plugin: HalveTheLR, framework: str = "") -> gradwatch.Monitor:
    manager = make_plugin_manager(autoload=False)
    manager.register(plugin)
    return gradwatch.Monitor(hooks=Hooks(manager), framework=framework)


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return x, x[:, :1] - 2 * x[:, 1:2]


def loop(net: nn.Module, lr: float, steps: int, watch=None) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=lr) if watch is None else watch.optimizers[0]
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        if watch is not None:
            watch.record_loss(loss)
        opt.step()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_the_monitor_reports_the_plugins_controls():
    plugin = HalveTheLR()
    monitor = monitor_with(plugin)
    for stats in healthy(steps=3):
        decision = monitor.observe(stats)
        assert decision.lr_factor == FACTOR and decision.controls.lr_factor == FACTOR
    assert monitor.controls.lr_factor == FACTOR
    restored = gradwatch.Monitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.controls.lr_factor == FACTOR  # checkpoints keep the final controls too


@pytest.mark.parametrize("every", [1, 2, 3])
def test_torch_watch_runs_at_the_plugins_lr_on_every_step(every):
    watched, reference = model(), model()
    plugin = HalveTheLR()
    opt = torch.optim.SGD(watched.parameters(), lr=LR)
    with gradwatch.watch(watched, opt, every=every, monitor=monitor_with(plugin, "torch"), strict=True) as w:
        loop(watched, LR, 9, watch=w)
    loop(reference, LR * FACTOR, 9)
    assert same(watched, reference)  # the unmeasured steps ran at the plugin's LR too
    assert plugin.lrs[1:] == [pytest.approx(LR * FACTOR)] * (len(plugin.lrs) - 1)


def test_lightning_runs_at_the_plugins_lr_on_every_step():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from gradwatch.integrations.lightning import GradWatch

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module, lr: float) -> None:
            super().__init__()
            self.net, self.lr = net, lr

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    def fit(net: nn.Module, lr: float, callbacks: list) -> None:
        trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Module(net, lr), DataLoader(TensorDataset(*data()), batch_size=64))

    watched, reference = model(), model()
    plugin = HalveTheLR()
    fit(watched, LR, [GradWatch(every=2, monitor=monitor_with(plugin, "lightning"), strict=True)])
    fit(reference, LR * FACTOR, [])
    assert same(watched, reference)
    assert len(plugin.lrs) == 4


def test_hugging_face_trainer_runs_at_the_plugins_lr_on_every_step(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from gradwatch.integrations.transformers import GradWatch

    class Regressor(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, labels):
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    class Rows(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = data()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"x": self.x[i], "labels": self.y[i]}

    def train(net: nn.Module, lr: float, callbacks: list, out: str) -> None:
        args = TrainingArguments(
            output_dir=str(tmp_path / out), max_steps=8, per_device_train_batch_size=64, learning_rate=lr,
            lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
            use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
        )
        Trainer(model=Regressor(net), args=args, train_dataset=Rows(), callbacks=callbacks).train()

    watched, reference = model(), model()
    plugin = HalveTheLR()
    train(watched, LR, [GradWatch(every=2, monitor=monitor_with(plugin, "transformers"), strict=True)], "w")
    train(reference, LR * FACTOR, [], "r")
    assert same(watched, reference)
    assert len(plugin.lrs) == 4
