"""Remedies as the optimizer sees them: skip, clip, lr_decay under schedulers, rollback, and the
steps GradScaler skips on its own."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from gw_torch_models import mlp, regression_data, same_params, train  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.policy import Decision, Policy  # noqa: E402


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [torch.as_tensor(v).clone() for s in opt.state.values() for v in s.values()]


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
], ids=["sgd_momentum", "adam", "adamw"])
def test_skip_step_changes_neither_params_nor_optimizer_state(make_opt):
    model = mlp(seed=11, depth=2, width=16)
    opt = make_opt(model.parameters())
    seen = {}

    def poison(t: int) -> None:
        if t == 12:
            model[2].weight.grad[0, 0] = float("nan")
            seen["params"] = [p.detach().clone() for p in model.parameters()]
            seen["state"] = state_tensors(opt)

    with gradwatch.watch(model, opt) as w:
        x, y = regression_data(n=32)
        for t in range(13):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            poison(t)
            opt.step()
    assert [a.kind for a in w.report().actions] == ["skip_step"]
    assert all(torch.equal(a, b) for a, b in zip(seen["params"], model.parameters()))
    after = state_tensors(opt)
    assert len(after) == len(seen["state"]) and all(torch.equal(a, b) for a, b in zip(seen["state"], after))


class FixedPolicy(Policy):
    """Clip at ``clip`` every step and/or set the LR factor from ``from_step`` on."""

    name = "fixed"

    def __init__(self, clip: float | None = None, lr_factor: float = 1.0, from_step: int = 0) -> None:
        self.clip, self.lr_factor, self.from_step = clip, lr_factor, from_step

    def decide(self, findings, stats, state, *, can_rollback=False, immediate=True):
        if stats.step >= self.from_step:
            state = state._replace(lr_factor=self.lr_factor)
        return Decision(step=stats.step, clip_norm=self.clip, lr_factor=state.lr_factor,
                        controls=state.controls), state


def test_clip_equals_clip_grad_norm_at_the_same_threshold():
    plain = mlp(seed=12, depth=3, width=32)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    train(plain, plain_opt, 25,
          before_step=lambda t: torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.3))
    model = mlp(seed=12, depth=3, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with gradwatch.watch(model, opt, policy=FixedPolicy(clip=0.3)) as w:
        train(model, opt, 25, watch=w)
    assert same_params(plain, model)


SCHEDULERS = {
    "lambda_warmup": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10)),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15, eta_min=1e-3),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_decay_holds_under_schedulers_and_keeps_their_shape(name):
    def run(policy):
        model = mlp(seed=13, depth=2, width=16)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = SCHEDULERS[name](opt)
        w = gradwatch.watch(model, opt, policy=policy) if policy is not None else None
        used = []
        opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))  # after gradwatch's
        scheduled = []

        def record(t):
            scheduled.append(opt.param_groups[0]["lr"])

        train(model, opt, 40, watch=w, scheduler=scheduler, before_step=record)
        return used, scheduled, scheduler.get_last_lr()

    plain_used, plain_scheduled, plain_last = run(None)
    used, scheduled, last = run(FixedPolicy(lr_factor=0.25, from_step=8))
    assert scheduled == plain_scheduled and last == plain_last  # the user's schedule, untouched
    assert used[:8] == plain_used[:8]
    for t in range(8, 40):
        assert used[t] == pytest.approx(0.25 * plain_scheduled[t], rel=1e-12), t


@pytest.mark.parametrize("param_norm_every", [1, 10, 1000])
def test_rollback_restores_the_last_healthy_snapshot_when_params_turn_nonfinite(param_norm_every):
    model = mlp(seed=14, depth=2, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = regression_data(n=64)
    snapshots = {}
    # Parameter norms are reused between refreshes, but a non-finite step always measures them.
    with gradwatch.watch(model, opt, rollback_every=5, param_norm_every=param_norm_every) as w:
        losses = []
        for t in range(40):
            if t == 25:  # something outside the gradients corrupted the weights
                with torch.no_grad():
                    model[0].weight[0, 0] = float("inf")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.record_loss(loss)
            if t == 20:
                snapshots[20] = [p.detach().clone() for p in model.parameters()]
            opt.step()
            losses.append(float(loss.detach()))
            if t == 25:
                snapshots[25] = [p.detach().clone() for p in model.parameters()]
    report = w.report()
    assert report.action_counts.get("rollback") == 1
    rollback = [a for a in report.actions if a.kind == "rollback"][0]
    assert rollback.step == 25
    # Snapshots are refreshed every 5 healthy steps: the one of step 20 was restored at step 25.
    assert all(torch.equal(a, b) for a, b in zip(snapshots[20], snapshots[25]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


def test_without_rollback_every_there_is_no_snapshot_and_no_rollback():
    model = mlp(seed=14, depth=2, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradwatch.watch(model, opt, rollback_every=None) as w:
        def corrupt(t):
            if t == 5:
                with torch.no_grad():
                    model[0].weight[0, 0] = float("inf")
        train(model, opt, 8, watch=w, before_step=corrupt)
    assert "rollback" not in w.report().action_counts
    assert w.driver.rollbacks.snapshot is None


def amp_loop(model, opt, scaler, w, steps, x, y, overflow_at=()):
    for t in range(steps):
        opt.zero_grad()
        xb = x * 1e30 if t in overflow_at else x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(xb), y)
        scaler.scale(loss).backward()
        if w is not None:
            w.record_loss(loss)
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_skipped_steps_are_counted_not_called_explosions(fused):
    x, y = regression_data(n=64)

    def make():
        model = mlp(seed=15, depth=2, width=16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        return model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**8)

    plain, plain_opt, plain_scaler = make()
    amp_loop(plain, plain_opt, plain_scaler, None, 40, x, y, overflow_at=(10, 30))
    model, opt, scaler = make()
    with gradwatch.watch(model, opt, scaler=scaler) as w:
        amp_loop(model, opt, scaler, w, 40, x, y, overflow_at=(10, 30))
    report = w.report()
    assert report.skipped_steps == 2 and [s["step"] for s in report.skipped] == [10, 30]
    assert report.healthy and report.findings == [] and report.actions == []
    assert report.steps_measured == 38 and w.step == 40
    assert same_params(plain, model)
    assert "update" not in scaler.__dict__  # remove() unpatched the scaler


def test_fused_optimizer_norms_are_unscaled():
    x, y = regression_data(n=64)
    norms = {}
    for fused in (False, True):
        model = mlp(seed=16, depth=2, width=16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        with gradwatch.watch(model, opt, scaler=scaler) as w:
            amp_loop(model, opt, scaler, w, 5, x, y)
        norms[fused] = w.report().history["global_norm"]
    assert norms[True] == pytest.approx(norms[False], rel=1e-5)
    assert norms[True][0] < 100  # not multiplied by the scale 4096


def test_auto_rescue_keeps_training_going_with_a_scheduler():
    def setup():
        model = mlp(seed=0, act=nn.ReLU, depth=2, width=64)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.9)

    plain, plain_opt, plain_sched = setup()
    plain_losses = train(plain, plain_opt, 150, scheduler=plain_sched)
    assert not math.isfinite(plain_losses[-1])
    model, opt, sched = setup()
    with gradwatch.watch(model, opt) as w:
        losses = train(model, opt, 150, watch=w, scheduler=sched)
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0]
    assert sched.get_last_lr() == plain_sched.get_last_lr()
    counts = copy.deepcopy(w.report().action_counts)
    assert counts.get("clip", 0) + counts.get("lr_decay", 0) > 0, counts  # it was steered, not lucky


class StandingClip(FixedPolicy):
    """A clip level put in force at step 0, as the auto policy does when the norm explodes."""

    def decide(self, findings, stats, state, *, can_rollback=False, immediate=True):
        state = state._replace(clip_norm=self.clip)
        clip = self.clip if stats.global_norm > self.clip else None
        return Decision(step=stats.step, clip_norm=clip, controls=state.controls), state


def test_a_standing_clip_also_applies_on_unmeasured_steps():
    plain = mlp(seed=17, depth=2, width=16)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    train(plain, plain_opt, 12, before_step=lambda t: torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.2))
    model = mlp(seed=17, depth=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, every=4, policy=StandingClip(clip=0.2)) as w:
        train(model, opt, 12, watch=w)
    assert w.report().steps_measured == 3
    assert same_params(plain, model)


def test_a_mistyped_lr_jump_is_undone_with_a_rollback():
    model = mlp(seed=0, act=nn.Tanh, depth=3, width=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)

    def mistype(t: int) -> None:
        if t == 40:
            opt.param_groups[0]["lr"] = 2.0  # 100x the LR the run was healthy with

    with gradwatch.watch(model, opt, rollback_every=5) as w:
        losses = train(model, opt, 60, watch=w, before_step=mistype)
    report = w.report()
    # the jumped update at step 40 shows in the norm from 41 on; a jump is called on its second
    # step in a row (one alone could be a short batch): at 42 or 43, depending on the rule
    assert [a.kind for a in report.actions] == ["lr_decay", "rollback"]
    assert 42 <= report.actions[0].step == report.actions[1].step <= 43
    assert w.lr_factor == pytest.approx(0.01)  # the LR the user set, times 0.01: back to 0.02
    assert opt.param_groups[0]["lr"] == 2.0  # the user's own value is left as set
    assert losses[-1] < losses[39] and max(losses[report.actions[1].step + 1:]) <= losses[39]
