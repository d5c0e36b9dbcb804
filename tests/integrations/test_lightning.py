"""The Lightning callback on a real ``lightning.pytorch.Trainer`` (CPU, a few steps each)."""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

pytest.importorskip("lightning.pytorch")
import lightning.pytorch as pl  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.integrations.lightning import GradWatch  # noqa: E402
from gradwatch.sinks import JsonlSink, read_jsonl  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|GPU available|TPU available|LOCAL_RANK|log_every_n_steps|"
    "HPU available|Checkpoint directory|smaller than the logging interval|treespec, LeafSpec).*"
)


def mlp(depth: int = 3, width: int = 32, act: type[nn.Module] = nn.ReLU, d_out: int = 1, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    d = 10
    for i in range(depth):
        mods[f"fc{i + 1}"] = nn.Linear(d, width)
        mods[f"act{i + 1}"] = act()
        d = width
    mods["out"] = nn.Linear(d, d_out)
    return nn.Sequential(mods)


def regression(n: int = 256, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return TensorDataset(x, x[:, :1] * 2 + x[:, 1:2] ** 2 - 1)


def classes(n: int = 128, seed: int = 2) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return TensorDataset(x, (x @ torch.randn(10, 3, generator=g)).argmax(1))


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, *, lr: float, opt: str = "sgd", loss: str = "mse", fused: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.opt, self.loss_name, self.fused = net, lr, opt, loss, fused
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        loss = nn.functional.mse_loss(out, y) if self.loss_name == "mse" else nn.functional.cross_entropy(out, y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused or None)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(module: pl.LightningModule, data: TensorDataset, steps: int, callbacks=(), *, batch_size: int | None = None,
        ckpt_path=None, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **trainer_kwargs,
    )
    loader = DataLoader(data, batch_size=batch_size or len(data), shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


class PostStepNorm(pl.Callback):
    """Records the global gradient norm the optimizer actually used (after Lightning's clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_fit_start(self, trainer, pl_module):
        def record(opt, args, kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else math.nan)

        trainer.optimizers[0].register_step_post_hook(record)


def test_healthy_run_stays_silent_logs_norms_and_is_bit_for_bit_unwatched():
    watched = Module(mlp(), lr=1e-3, opt="adam")
    gw = GradWatch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(watched, regression(), 40, [gw])
    assert not [w for w in caught if "gradwatch" in str(w.message)]
    report = gw.report()
    assert report.healthy and report.actions == [] and report.steps_measured == 40
    assert report.framework == "lightning"
    metrics = trainer.callback_metrics
    assert {"grad_norm/total", "grad_norm/net.fc1", "grad_norm/net.out", "gradwatch/lr_factor"} <= set(metrics)
    assert float(metrics["grad_norm/total"]) == pytest.approx(report.history["global_norm"][-1], rel=1e-5)
    plain = Module(mlp(), lr=1e-3, opt="adam")
    fit(plain, regression(), 40)
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), plain.parameters()))


def test_vanishing_deep_sigmoid_mlp_gets_a_batchnorm_recommendation():
    gw = GradWatch()
    with pytest.warns(UserWarning, match="gradwatch: \\[warning\\] vanishing"):
        fit(Module(mlp(depth=10, act=nn.Sigmoid, d_out=3), lr=0.1, loss="ce"), classes(), 30, [gw])
    report = gw.report()
    assert "vanishing" in report.kinds("warning")
    (rec,) = [a for a in report.actions if a.kind == "recommend_batchnorm"]
    assert rec.params["insert_after"][0] == "net.fc1"


class PoisonedModule(Module):
    """At step ``at`` its inputs are 1000 times too large (a corrupt batch, finite)."""

    def __init__(self, *args, at: int = 60, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at = at

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.trainer.global_step == self.at:
            x = x * 1000.0
        return super().training_step((x, y), batch_idx)


def test_a_poisoned_batch_is_clipped_through_lightnings_clip_knob(tmp_path):
    module = PoisonedModule(mlp(depth=3, width=32, act=nn.ReLU), lr=0.05)
    gw, probe = GradWatch(sinks=[tmp_path / "run.jsonl"]), PostStepNorm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module, regression(), 120, [gw, probe])
    report = gw.report()
    exploding = [f for f in report.findings if f.kind == "exploding"]
    assert exploding and exploding[0].step == 60 and exploding[0].evidence["rule"] == "spike"
    assert report.action_counts.get("clip", 0) > 0
    assert math.isfinite(module.losses[-1]) and module.losses[-1] < module.losses[0]
    # Lightning clipped at gradwatch's level (it re-reads gradient_clip_val every step) ...
    clips = [a for a in report.actions if a.kind == "clip"]
    assert clips[0].step == 60
    for a in clips:
        assert probe.norms[a.step] == pytest.approx(a.params["max_norm"], rel=1e-4)
    # ... and the user's settings are back as they set them.
    assert trainer.gradient_clip_val is None and module.optimizers().param_groups[0]["lr"] == 0.05
    # One warning per finding kind, not one per step.
    kinds = [str(w.message).split("] ")[1].split(" ")[0] for w in caught if str(w.message).startswith("gradwatch: [")]
    assert sorted(kinds) == sorted(set(kinds)) and "exploding" in kinds
    records = read_jsonl(tmp_path / "run.jsonl")
    assert sum(r["event"] == "step" for r in records) == 120 and records[-1]["event"] == "report"


@pytest.mark.filterwarnings("ignore:gradwatch. .(error|warning). exploding:UserWarning")
def test_an_lr_too_high_is_rescued_with_a_rollback_and_a_smaller_lr():
    module, gw = Module(mlp(depth=4, width=64, act=nn.Tanh), lr=0.3), GradWatch()
    trainer = fit(module, regression(), 120, [gw])
    report = gw.report()
    assert "exploding" in report.kinds("warning")
    assert report.action_counts.get("rollback", 0) >= 1 and report.action_counts.get("lr_decay", 0) >= 1
    assert math.isfinite(module.losses[-1]) and module.losses[-1] < module.losses[0]
    assert trainer.gradient_clip_val is None and module.optimizers().param_groups[0]["lr"] == 0.3


class JumpLR(pl.Callback):
    """From step ``at`` on, the optimizer runs at ``lr`` (a broken schedule)."""

    def __init__(self, at: int, lr: float) -> None:
        self.at, self.lr = at, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.at:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def test_a_jumped_lr_is_rescued_with_rollback():
    """LR 0.05 -> 1e3 at step 30: auto holds the LR at its healthy value and, with snapshots,
    undoes the update made at 1e3; the run ends below its first loss."""
    module = Module(mlp(), lr=0.05)
    gw = GradWatch(rollback_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, regression(), 60, [JumpLR(30, 1e3), gw])
    report = gw.report()
    assert [a.step for a in report.actions if a.kind == "rollback"] == [31]
    assert any("jumped" in a.message for a in report.actions if a.kind == "lr_decay")
    assert gw.monitor.controls.lr_factor * 1e3 == pytest.approx(0.05)
    assert all(math.isfinite(v) for v in module.losses)
    assert module.losses[-1] < module.losses[0]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bf16_autocast_on_cpu_measures_every_step():
    gw = GradWatch()
    module = Module(mlp(), lr=1e-3, opt="adam")
    fit(module, regression(), 12, [gw], precision="bf16-mixed")
    report = gw.report()
    assert report.steps_measured == 12 and report.healthy
    assert all(math.isfinite(v) and v > 0 for v in report.history["global_norm"])


def fp16_scaler(init_scale: float = 2.0**10):
    """fp16 autocast with a real GradScaler on the CPU (Trainer(precision="16-mixed") on the CPU
    silently switches to bf16, which has no scaler)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_fused_optimizer_under_fp16_grad_scaler_is_measured_unscaled():
    plain_gw, fused_gw = GradWatch(policy="observe"), GradWatch(policy="observe")
    fit(Module(mlp(), lr=1e-3, opt="adam"), regression(), 3, [plain_gw], plugins=[fp16_scaler()])
    fit(Module(mlp(), lr=1e-3, opt="adam", fused=True), regression(), 3, [fused_gw], plugins=[fp16_scaler()])
    plain, fused = plain_gw.report().history, fused_gw.report().history
    assert len(fused["global_norm"]) == len(plain["global_norm"]) == 3
    # The fused optimizer's gradients are still multiplied by the loss scale (1024) in the hook;
    # the other's were unscaled by Lightning before it.
    assert fused["global_norm"] == pytest.approx(plain["global_norm"], rel=1e-3)
    assert 0.01 < plain["global_norm"][0] < 100


def test_gradient_accumulation_measures_once_per_optimizer_step():
    gw = GradWatch()
    trainer = fit(Module(mlp(), lr=1e-3, opt="adam"), regression(128), 5, [gw], batch_size=32,
                  accumulate_grad_batches=4)
    report = gw.report()
    assert trainer.global_step == 5 and report.steps_measured == 5 and gw.step == 5
    # The recorded loss is the optimizer step's mean loss over its 4 micro-batches.
    assert report.history["loss"][0] == pytest.approx(sum(trainer.lightning_module.losses[:4]) / 4, rel=1e-5)


@pytest.mark.filterwarnings("ignore:gradwatch. .error. exploding:UserWarning")
def test_checkpoint_resume_continues_the_monitor(tmp_path):
    module, gw = Module(mlp(depth=4, width=64, act=nn.Tanh), lr=0.3), GradWatch()
    trainer = fit(module, regression(), 60, [gw])
    assert gw.monitor.controls.lr_factor < 1.0  # remedy state worth resuming
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][gw.state_key]
    assert json.dumps(saved, sort_keys=True) == json.dumps(gw.state_dict(), sort_keys=True)  # NaN-safe equality

    resumed = GradWatch()
    assert resumed.state_key == gw.state_key
    fit(Module(mlp(depth=4, width=64, act=nn.Tanh), lr=0.3), regression(), 70, [resumed], ckpt_path=path)
    report = resumed.report()
    assert report.first_step == 0 and report.last_step == 69 and report.steps_measured == 70
    assert resumed.step == 70
    assert report.action_counts.get("clip", 0) >= gw.report().action_counts.get("clip", 0)
    assert resumed.monitor.controls.lr_factor <= gw.monitor.controls.lr_factor
    with pytest.raises(ValueError, match="expects what GradWatch.state_dict"):
        resumed.load_state_dict({"step": 3})


class ManualModule(PoisonedModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        if self.trainer.global_step == self.at:
            x = x * 1000.0
        loss = nn.functional.mse_loss(self.net(x), y)
        self.manual_backward(loss)
        opt.step()
        self.losses.append(float(loss.detach()))


@pytest.mark.filterwarnings("ignore:gradwatch. .(error|warning). exploding:UserWarning")
def test_manual_optimization_is_watched_and_clipped_by_hand():
    module, gw = ManualModule(mlp(depth=3, width=32, act=nn.ReLU), lr=0.05), GradWatch()
    fit(module, regression(), 120, [gw])
    report = gw.report()
    assert report.steps_measured == 120 and report.action_counts.get("clip", 0) > 0
    assert [a.step for a in report.actions if a.kind == "clip"][0] == 60
    assert math.isfinite(module.losses[-1]) and module.losses[-1] < module.losses[0]


def test_an_internal_error_warns_once_and_training_goes_on(monkeypatch):
    gw = GradWatch()
    monkeypatch.setattr(gw.monitor, "observe", lambda *a, **k: 1 / 0)
    module = Module(mlp(), lr=1e-3, opt="adam")
    with pytest.warns(gradwatch.GradwatchWarning, match="stopped monitoring") as caught:
        fit(module, regression(), 5, [gw])
    assert len([w for w in caught if issubclass(w.category, gradwatch.GradwatchWarning)]) == 1
    assert len(module.losses) == 5


def test_sinks_attached_to_the_callback(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl")
    gw = GradWatch(sinks=[sink], every=2)
    fit(Module(mlp(), lr=1e-3, opt="adam"), regression(), 6, [gw])
    assert [r["step"] for r in read_jsonl(tmp_path / "a.jsonl") if r["event"] == "step"] == [0, 2, 4]
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        GradWatch(every=0)


class LoudModule(Module):
    """Its loss is large enough that fp16 gradients scaled by GradScaler's initial 65536 overflow."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 1e4


def test_fp16_grad_scaler_overflows_are_counted_as_skipped_not_findings():
    gw = GradWatch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(LoudModule(mlp(), lr=1e-6, opt="adam"), regression(), 12, [gw],
            plugins=[fp16_scaler(init_scale=2.0**16)])
    report = gw.report()
    assert report.skipped_steps >= 1 and report.steps_measured + report.skipped_steps == 12
    assert report.healthy and "nonfinite" not in report.finding_counts
    assert not [w for w in caught if "gradwatch" in str(w.message)]


def test_param_norms_is_the_old_name_of_param_norm_every():
    with pytest.warns(DeprecationWarning, match=r"GradWatch\(param_norm_every=1\)"):
        assert GradWatch(param_norms=True).param_norm_every == 1
    assert GradWatch().param_norm_every == 10
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        GradWatch(every=True)
