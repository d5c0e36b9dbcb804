"""The Hugging Face ``Trainer`` callback on a tiny config-built BERT (CPU, no download)."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

pytest.importorskip("transformers")
import transformers  # noqa: E402

pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradwatch  # noqa: E402
from gradwatch.integrations.transformers import GradWatch  # noqa: E402

torch.set_num_threads(1)
transformers.utils.logging.set_verbosity_error()


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether most of the first four tokens are < 50."""

    def __init__(self, n: int = 64, seq: int = 16, regression: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(3, 100, (n, seq), generator=g)
        y = (self.x[:, :4] < 50).sum(1).ge(2)
        self.y = y.float() if regression else y.long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def tiny_bert(regression: bool = False, cls=BertForSequenceClassification):
    torch.manual_seed(0)
    settings: dict[str, Any] = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=1 if regression else 2,
        problem_type="regression" if regression else "single_label_classification",
    )
    config = BertConfig(**settings)
    return cls(config)


class LoggedLosses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


class InjectLR(TrainerCallback):
    """From ``at`` on, every optimizer step runs at ``lr`` (a broken schedule)."""

    def __init__(self, at: int, lr: float) -> None:
        self.at, self.lr = at, lr

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step >= self.at:
            for group in optimizer.param_groups:
                group["lr"] = self.lr


def train(model, callbacks, tmp_path, *, steps: int, lr: float, optim: str = "adamw_torch",
          regression: bool = False, **kwargs) -> Trainer:
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
        lr_scheduler_type="constant", optim=optim, report_to=[], use_cpu=True, logging_steps=5,
        save_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
    )
    args = TrainingArguments(**{**settings, **kwargs})
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(regression=regression), callbacks=list(callbacks))
    trainer.train()
    return trainer


def gradwatch_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "gradwatch" in str(w.message)]


def test_healthy_run_is_silent_and_bit_for_bit_the_unwatched_run(tmp_path):
    watched, gw = tiny_bert(), GradWatch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(watched, [gw], tmp_path, steps=40, lr=5e-4)
    report = gw.report()
    assert report.healthy and report.findings == [] and report.actions == []
    assert report.steps_measured == 40 and report.framework == "transformers"
    assert gradwatch_warnings(caught) == []
    assert trainer.args.max_grad_norm == 1.0  # handed back to the Trainer
    # gradwatch did the Trainer's max_grad_norm=1.0 clipping itself, exactly as the Trainer does.
    plain = tiny_bert()
    train(plain, [], tmp_path, steps=40, lr=5e-4)
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), plain.parameters()))
    # The losses gradwatch read from the model outputs are the Trainer's.
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged[0] == pytest.approx(sum(report.history["loss"][:5]) / 5, rel=1e-4)


def test_an_injected_lr_of_1e3_is_caught_and_kept_finite(tmp_path):
    # max_grad_norm=0: the user turned the Trainer's clipping off. Unwatched, the run's loss goes
    # to NaN within a few steps, and the Trainer's logged loss hides it (logging_nan_inf_filter).
    plain, plain_log = tiny_bert(regression=True), LoggedLosses()
    train(plain, [InjectLR(25, 1e3), plain_log], tmp_path, steps=50, lr=0.05, optim="sgd",
          regression=True, max_grad_norm=0.0)
    assert not all(torch.isfinite(p).all() for p in plain.parameters())
    assert all(math.isfinite(v) for v in plain_log.losses)  # the filter hid it

    # Without snapshots (rollback_every=None) auto can only clip and bring the LR back.
    model, gw, log = tiny_bert(regression=True), GradWatch(rollback_every=None), LoggedLosses()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, [InjectLR(25, 1e3), gw, log], tmp_path, steps=50, lr=0.05, optim="sgd",
              regression=True, max_grad_norm=0.0)
    # One warning per finding kind: the explosion, the loss spike, and the units the blow-up killed.
    kinds = sorted(m.split("] ")[1].split(" ")[0] for m in gradwatch_warnings(caught))
    assert kinds == sorted(set(kinds)) and "exploding" in kinds
    report = gw.report()
    exploding = [f for f in report.findings if f.kind == "exploding"]
    # Caught at the first step whose gradients were computed after the first update at LR 1e3.
    assert min(f.step for f in exploding) == 26
    assert report.action_counts.get("clip", 0) > 0 and report.action_counts.get("lr_decay", 0) >= 1
    assert gw.monitor.controls.lr_factor < 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in report.history["loss"])


def test_an_injected_lr_of_1e3_is_rescued_with_rollback(tmp_path):
    """With snapshots (rollback_every=1) auto undoes the update made at the jumped LR and brings
    the LR back to where the run was healthy: the run ends below its first loss."""
    model, gw = tiny_bert(regression=True), GradWatch(rollback_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, [InjectLR(25, 1e3), gw], tmp_path, steps=50, lr=0.05, optim="sgd",
              regression=True, max_grad_norm=0.0)
    report = gw.report()
    rollback = [a for a in report.actions if a.kind == "rollback"]
    decay = [a for a in report.actions if a.kind == "lr_decay"]
    assert [a.step for a in rollback] == [26] and decay[0].step == 26
    assert "jumped" in decay[0].message
    assert gw.monitor.controls.lr_factor * 1e3 == pytest.approx(0.05)  # back at the user's LR
    losses = report.history["loss"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class PoisonedBert(BertForSequenceClassification):
    """A BERT whose loss is NaN on one training forward pass (a corrupt batch)."""

    poison_at = 12

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.poison_at + 1:
                out.loss = out.loss * float("nan")
        return out


def test_a_nan_loss_is_counted_and_reported_though_the_logged_loss_hides_it(tmp_path):
    model, gw = tiny_bert(cls=PoisonedBert), GradWatch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(model, [gw], tmp_path, steps=20, lr=5e-4)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged and all(math.isfinite(v) for v in logged)  # logging_nan_inf_filter=True hid it
    assert gw.nonfinite_losses == 1 and gw.micro_batches == 20
    report = gw.report()
    (nonfinite,) = [f for f in report.findings if f.kind == "nonfinite"]
    assert nonfinite.step == 12 and nonfinite.severity == "error"
    assert [a.kind for a in report.actions] == ["skip_step"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the poisoned step was skipped
    messages = gradwatch_warnings(caught)
    assert any("1 micro-batch loss(es) NaN/Inf at optimizer step 12" in m for m in messages)
    assert any("1 of 20 micro-batch losses were NaN/Inf" in m for m in messages)


def test_state_round_trip_and_internal_errors(tmp_path, monkeypatch):
    gw = GradWatch()
    train(tiny_bert(), [gw], tmp_path, steps=3, lr=5e-4)
    saved = json.loads(json.dumps(gw.state()))  # as the Trainer keeps it, in trainer_state.json
    assert saved["args"] == {"policy": "auto", "every": 1, "param_norm_every": 10, "strict": False}
    restored = GradWatch(**saved["args"])
    restored.gradwatch_state = saved["attributes"]["gradwatch_state"]  # what Trainer does on resume
    assert restored.report().to_dict() == gw.report().to_dict() and restored.step == 3

    broken = GradWatch()
    monkeypatch.setattr(broken.monitor, "observe", lambda *a, **k: 1 / 0)
    with pytest.warns(gradwatch.GradwatchWarning, match="stopped monitoring"):
        trainer = train(tiny_bert(), [broken], tmp_path, steps=4, lr=5e-4)
    assert trainer.state.global_step == 4 and trainer.args.max_grad_norm == 1.0


def test_resume_from_a_real_checkpoint_continues_the_monitor(tmp_path):
    gw = GradWatch()
    train(tiny_bert(), [gw], tmp_path, steps=6, lr=5e-4, save_strategy="steps", save_steps=6)
    checkpoint = tmp_path / "out" / "checkpoint-6"
    assert (checkpoint / "trainer_state.json").exists()

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=9, per_device_train_batch_size=16, learning_rate=5e-4,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        seed=0, data_seed=0, restore_callback_states_from_checkpoint=True,
    )
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(), callbacks=[GradWatch()])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    (live,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradWatch)]
    report = live.report()
    assert live.step == 9 and report.steps_measured == 9 and report.first_step == 0 and report.healthy
    assert report.history["global_norm"][:6] == gw.report().history["global_norm"]


def test_with_every_2_a_nan_loss_on_an_unmeasured_step_is_still_counted(tmp_path):
    class PoisonedOnStep13(PoisonedBert):
        poison_at = 13  # an odd step: not measured with every=2

    gw = GradWatch(every=2, rollback_every=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_bert(cls=PoisonedOnStep13), [gw], tmp_path, steps=20, lr=5e-4)
    # Step 13 is not measured, so its NaN gradients are not seen and not skipped (docs: every):
    # without a snapshot the weights stay NaN and every later loss is NaN. All 7 (steps 13-19)
    # are counted, the 4 of unmeasured steps on the device, read at the end.
    assert gw.report().steps_measured == 10 and gw.micro_batches == 20 and gw.nonfinite_losses == 7
    assert any("7 of 20 micro-batch losses were NaN/Inf" in m for m in gradwatch_warnings(caught))

    # With the default snapshots the next measured step finds the weights non-finite and rolls back.
    model, gw = tiny_bert(cls=PoisonedOnStep13), GradWatch(every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, [gw], tmp_path, steps=20, lr=5e-4)
    assert [a.step for a in gw.report().actions if a.kind == "rollback"] == [14]
    assert gw.nonfinite_losses == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_old_names_work_for_one_release_with_a_deprecation_warning():
    from gradwatch.integrations import transformers as adapter

    with pytest.warns(DeprecationWarning, match="GradWatchCallback is now GradWatch"):
        old = adapter.GradWatchCallback
    assert old is GradWatch
    with pytest.warns(DeprecationWarning, match="param_norm_every=0"):
        assert GradWatch(param_norms=False).param_norm_every == 0
