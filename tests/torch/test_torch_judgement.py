"""Judgement on ordinary runs nobody tuned for (the cases of "What was seen" in the judgement
issue), each on a real PyTorch run: scikit-learn's digits through a plain ``DataLoader`` with its
defaults, small models, CPU, a few seconds each."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
import torch  # noqa: E402
from gw_torch_models import same_params  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradwatch  # noqa: E402

torch.set_num_threads(1)


def digits() -> tuple[TensorDataset, TensorDataset]:
    """1347 training rows (a DataLoader of 64 ends on a batch of 3) and 450 test rows, standardised."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return TensorDataset(xt[:1347], yt[:1347]), TensorDataset(xt[1347:], yt[1347:])


def mlp(seed: int = 0, width: int = 64, depth: int = 2, d_in: int = 64, classes: int = 10) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def fit(model: nn.Module, opt: torch.optim.Optimizer, train: TensorDataset, *, epochs: int = 3, batch_size: int = 64,
        watch: dict | None = None, scheduler=None, before_step=None, seed: int = 0) -> tuple[list[float], gradwatch.Report | None]:
    """A user's loop: DataLoader defaults (shuffle, drop_last=False), cross-entropy."""
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    losses: list[float] = []
    w = gradwatch.watch(model, opt, **watch) if watch is not None else None
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            if before_step is not None:
                before_step(step, opt)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if w is not None:
                w.record_loss(loss)
            opt.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
    if w is not None:
        w.remove()
    return losses, None if w is None else w.report()


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    with torch.no_grad():
        x, y = data.tensors
        return float((model(x).argmax(1) == y).float().mean())


def alarms(report: gradwatch.Report) -> list[str]:
    return [f"{f.kind}@{f.step}: {f.message}" for f in report.findings if f.severity in ("warning", "error")]


# -- what healthy looks like -------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_short_last_batch_is_no_explosion_and_auto_leaves_the_run_alone(optimizer):
    train, test = digits()
    make = (lambda p: torch.optim.SGD(p, lr=0.1)) if optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=1e-3))
    plain = mlp()
    fit(plain, make(plain.parameters()), train, epochs=4)
    watched = mlp()
    _, report = fit(watched, make(watched.parameters()), train, epochs=4, watch={})
    assert report is not None and not alarms(report), alarms(report)
    assert not report.actions
    assert same_params(plain, watched)  # auto left it bit-for-bit alone
    assert accuracy(watched, test) == accuracy(plain, test) > 0.8


def test_a_logistic_regression_that_fits_to_zero_loss_is_not_dead_exploding_or_spiking():
    # Linearly separable with a margin: SGD at 0.5 drives the loss to exactly zero on most batches.
    g = torch.Generator().manual_seed(0)
    x = 4.0 * torch.randn(600, 5, generator=g)
    margin = x @ torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0])
    keep = margin.abs() > 1.0
    data = TensorDataset(x[keep], (margin[keep] > 0).long())
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    losses, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.5), data, epochs=150, watch={})
    assert report is not None
    assert min(losses) < 1e-3 and sum(losses[-50:]) / 50 < 1e-2  # fits (nearly) to zero
    assert not alarms(report), alarms(report)
    assert not report.actions


def test_an_mlp_under_one_cycle_fitting_its_data_has_no_dead_units():
    train, _ = digits()
    small = TensorDataset(*(t[:256] for t in train.tensors))
    model = mlp(width=128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    epochs, batches = 60, 4
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * batches)
    losses, report = fit(model, opt, small, epochs=epochs, watch={}, scheduler=schedule)
    assert report is not None and losses[-1] < 1e-3
    assert not alarms(report), alarms(report)


def test_batches_of_two_are_noisy_not_spiking():
    train, test = digits()
    model = mlp()
    _, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.01), train, epochs=1, batch_size=2, watch={})
    assert report is not None and not alarms(report), alarms(report)
    assert accuracy(model, test) > 0.8


def test_with_batches_of_one_sample_half_the_relus_are_off_but_none_is_dead():
    """Per batch of one sample, most of a narrow ReLU layer is off (a per-step share of zero rows
    says "dead" on step after step); followed unit by unit, no unit stays off."""
    train, test = digits()
    subset = TensorDataset(*(t[:400] for t in train.tensors))
    model = mlp(width=32, depth=2)
    shares: list[float] = []
    hook = model[3].register_forward_hook(lambda m, i, out: shares.append(float((out == 0).float().mean())))
    _, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.02), subset, epochs=1, batch_size=1,
                    watch={"policy": "observe"})
    hook.remove()
    assert report is not None
    assert np.mean(np.array(shares) >= 0.5) > 0.5  # the per-batch picture
    assert not [f for f in report.findings if f.kind == "dead_units"], report.summary()
    assert accuracy(model, test) > 0.5


def test_dying_relus_are_found_with_batches_of_two():
    train, _ = digits()
    model = mlp(width=64)
    with torch.no_grad():  # 80% of the first layer's units can never fire
        model[0].bias[:51] = -50.0
    _, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.01), train, epochs=1, batch_size=2,
                    watch={"policy": "observe"})
    assert report is not None
    dead = [f for f in report.findings if f.kind == "dead_units" and f.severity != "info"]
    assert dead and dead[0].layers == ("0",) and dead[0].step <= 15
    assert 0.75 <= dead[0].evidence["dead_fraction"]["0"] <= 0.85


def test_many_inactive_relus_in_a_model_that_learns_is_info_and_does_not_fail_a_check():
    train, test = digits()
    model = mlp(width=128)
    with torch.no_grad():  # 60% of the first layer's units can never fire: true, and harmless here
        model[0].bias[:77] = -50.0
    _, report = fit(model, torch.optim.Adam(model.parameters(), lr=1e-3), train, epochs=5, watch={"policy": "observe"})
    assert report is not None
    dead = [f for f in report.findings if f.kind == "dead_units"]
    assert dead and all(f.severity == "info" for f in dead)
    assert not report.fails("warning") and accuracy(model, test) > 0.85


# -- broken from step 0 ------------------------------------------------------------------------------


def test_a_cnn_with_weights_x30_at_init_is_reported_from_step_0():
    train, _ = digits()
    images = TensorDataset(train.tensors[0].reshape(-1, 1, 8, 8), train.tensors[1])
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 64, 10))
    with torch.no_grad():
        for p in cnn.parameters():
            p.mul_(30.0)
    _, report = fit(cnn, torch.optim.Adam(cnn.parameters(), lr=1e-3), images, epochs=1, watch={"policy": "observe"})
    assert report is not None
    first = [f for f in report.findings if f.kind == "exploding"][0]
    assert first.step == 0 and first.severity == "error" and "knows nothing" in first.message


def diabetes() -> TensorDataset:
    """scikit-learn's diabetes regression, features and target standardised (442 rows)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))


def fit_regression(scale: float, *, batch_size: int, record_before_backward: bool = False, loss_factor: float = 1.0,
                   target_scale: float = 1.0, output_factor: float = 1.0) -> tuple[gradwatch.Report, float | None]:
    """An MLP regressor, its weight matrices ``scale`` times PyTorch's init, Adam, mean squared error."""
    data = diabetes()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    with gradwatch.watch(model, opt, policy="observe") as w:
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                out = model(x).squeeze(-1)
                loss = nn.functional.mse_loss(out if output_factor == 1.0 else output_factor * out, target_scale * y)
                if loss_factor != 1.0:
                    loss = loss_factor * loss
                if record_before_backward:
                    w.record_loss(loss)
                loss.backward()
                if not record_before_backward:
                    w.record_loss(loss)
                opt.step()
        return w.report(), w.driver.null.value


@pytest.mark.parametrize("batch_size", [4, 32])
@pytest.mark.parametrize("record_before_backward", [False, True], ids=["after-backward", "before-backward"])
def test_a_regression_net_with_weights_x10_at_init_is_reported_from_its_first_losses(batch_size, record_before_backward):
    """No chance level for a squared error, but the targets give one: a model at init outputs about
    zero and scores about the mean squared target; weights x10 score hundreds of times that."""
    report, null = fit_regression(10.0, batch_size=batch_size, record_before_backward=record_before_backward)
    assert null is not None and 0.5 < null < 2.0  # standardised targets: about 1
    found = [f for f in report.findings if f.kind == "exploding"]
    assert found and found[0].evidence["rule"] == "loss_over_chance" and found[0].step <= 6
    assert found[0].severity == "error" and "outputs zeros" in found[0].message


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_a_healthy_regression_net_is_not_judged_against_its_targets(batch_size):
    report, null = fit_regression(1.0, batch_size=batch_size)
    assert null is not None
    assert not [f for f in report.findings if f.evidence.get("rule") == "loss_over_chance"]


def test_the_null_level_follows_the_targets_scale_and_refuses_a_loss_it_cannot_read():
    """Targets in their own units (a mean of 152, not standardised) make a zero output score their
    mean square. A scaled loss (0.5 * mse) is not a mean squared error, and one of a transformed
    output (mse(0.5 * output, y)) fails the check that the recovered error gives the loss back:
    no level at all, rather than a wrong one."""
    report, null = fit_regression(10.0, batch_size=32, target_scale=77.0)
    assert null is not None and 77.0 ** 2 * 0.5 < null < 77.0 ** 2 * 2
    for change in ({"loss_factor": 0.5}, {"output_factor": 0.5}):
        report, null = fit_regression(10.0, batch_size=32, **change)
        assert null is None
        assert not [f for f in report.findings if f.evidence.get("rule") == "loss_over_chance"]


def test_an_explosion_that_ends_in_nan_is_called_an_explosion():
    train, _ = digits()
    model = mlp(width=128, depth=8)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.5)
    _, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), train, epochs=1,
                    watch={"policy": "observe"})
    assert report is not None
    kinds = {f.kind for f in report.findings if f.severity in ("warning", "error")}
    assert {"exploding", "nonfinite"} <= kinds
    first_exploding = min(f.step for f in report.findings if f.kind == "exploding")
    first_nonfinite = min(f.step for f in report.findings if f.kind == "nonfinite")
    assert first_exploding <= first_nonfinite  # the cause is named no later than the symptom


def test_a_relu_rnn_that_is_nan_at_step_1_is_an_explosion():
    train, _ = digits()
    rows = TensorDataset(train.tensors[0].reshape(-1, 8, 8), train.tensors[1])

    class RNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.rnn = nn.RNN(8, 64, nonlinearity="relu", batch_first=True)
            self.head = nn.Linear(64, 10)
            with torch.no_grad():
                q, _ = torch.linalg.qr(torch.randn(64, 64))
                recurrent = self.rnn.weight_hh_l0
                assert isinstance(recurrent, torch.Tensor)
                recurrent.copy_(q * 12.0)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = RNN()
    _, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), rows, epochs=1, watch={"policy": "observe"})
    assert report is not None
    assert "exploding" in report.kinds("warning")


def _small_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 64, 10))


@pytest.mark.parametrize("seed", [0, 1])
def test_adam_at_a_mistyped_lr_with_batches_of_four_is_found_when_the_loss_settles_at_chance(seed):
    """One update tens of times the weights, the loss up a hundredfold and back down to ln 10,
    where it stays: what Adagrad's first step at a high LR also looks like for a dozen steps. The
    healthy run at a sane LR, same batches, has no ``exploding`` alarm."""
    train, _ = digits()
    images = TensorDataset(train.tensors[0][:400].reshape(-1, 1, 8, 8), train.tensors[1][:400])
    cnn = _small_cnn(seed)
    losses, report = fit(cnn, torch.optim.Adam(cnn.parameters(), lr=1.5), images, epochs=1, batch_size=4,
                         watch={"policy": "observe"}, seed=seed)
    assert report is not None and max(losses[:3]) > 50 * losses[0]
    found = [f for f in report.findings if f.kind == "exploding" and f.severity == "warning"]
    assert found and found[0].evidence["rule"] == "update_ratio" and "knows nothing" in found[0].message

    sane = _small_cnn(seed)
    _, report = fit(sane, torch.optim.Adam(sane.parameters(), lr=1e-3), images, epochs=1, batch_size=4,
                    watch={"policy": "observe"}, seed=seed)
    assert report is not None and "exploding" not in report.kinds("warning"), alarms(report)


def test_adam_at_a_mistyped_lr_with_batches_of_four_is_rescued_from_before_its_first_update():
    """Found 28 steps after the update that wrecked it: the snapshots were held while the update
    was followed, so the rollback restores the initial weights (not a later, already wrecked
    copy) and the run at the lowered LR learns as one at a sane LR does."""
    train, test = digits()
    images = TensorDataset(train.tensors[0].reshape(-1, 1, 8, 8), train.tensors[1])
    held_out = TensorDataset(test.tensors[0].reshape(-1, 1, 8, 8), test.tensors[1])
    broken, sane = _small_cnn(0), _small_cnn(0)
    _, report = fit(broken, torch.optim.Adam(broken.parameters(), lr=1.5), images, epochs=2, batch_size=4,
                    watch={"policy": "auto"})
    fit(sane, torch.optim.Adam(sane.parameters(), lr=1e-3), images, epochs=2, batch_size=4)
    assert report is not None
    rollbacks = [a for a in report.actions if a.kind == "rollback"]
    assert rollbacks and rollbacks[0].step >= 20
    assert accuracy(broken, held_out) >= 0.9 * accuracy(sane, held_out) > 0.8


def test_adam_at_lr_1_from_step_0_is_found_and_rescued():
    train, test = digits()
    plain, sane = mlp(), mlp()
    fit(plain, torch.optim.Adam(plain.parameters(), lr=1.0), train, epochs=5)
    fit(sane, torch.optim.Adam(sane.parameters(), lr=1e-3), train, epochs=5)
    assert accuracy(plain, test) < 0.5  # unwatched: the units die at once, the run is lost

    model = mlp()
    _, report = fit(model, torch.optim.Adam(model.parameters(), lr=1.0), train, epochs=5, watch={})
    assert report is not None and "exploding" in report.kinds("warning")
    assert report.action_counts.get("lr_decay", 0) >= 1 and report.action_counts.get("rollback", 0) >= 1
    assert accuracy(model, test) >= 0.8 * accuracy(sane, test)


# -- remedies that act on the cause ------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "lr", "jumped"), [("adam", 1e-3, 1.0), ("sgd", 0.1, 10.0)])
def test_an_lr_jump_mid_run_is_rescued_by_default(optimizer, lr, jumped):
    train, test = digits()

    def jump(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 60:
            for group in opt.param_groups:
                group["lr"] = jumped

    make = (lambda p: torch.optim.Adam(p, lr=lr)) if optimizer == "adam" else (lambda p: torch.optim.SGD(p, lr=lr))
    plain, sane = mlp(), mlp()
    fit(plain, make(plain.parameters()), train, epochs=4, before_step=jump)
    fit(sane, make(sane.parameters()), train, epochs=4)
    model = mlp()
    _, report = fit(model, make(model.parameters()), train, epochs=4, before_step=jump, watch={})
    assert report is not None and report.action_counts.get("rollback", 0) >= 1
    assert accuracy(plain, test) < 0.5  # unwatched, the run is lost
    assert accuracy(model, test) >= 0.9 * accuracy(sane, test)  # watched, it ends as if nothing happened


def test_every_step_nonfinite_is_not_skipped_forever():
    """An init that makes every step non-finite after the first two: skipping step after step
    would leave the parameters where they are, for ever. auto goes back to the last healthy
    parameters and cuts the LR."""
    train, _ = digits()
    model = mlp(width=128, depth=8)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.5)
    losses, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), train, epochs=2, watch={})
    assert report is not None and report.action_counts.get("rollback", 0) >= 1
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    assert report.action_counts.get("skip_step", 0) < len(losses) // 2


# -- saying what it does --------------------------------------------------------------------------


def test_actions_are_announced_while_they_happen_and_summed_up_at_the_end(caplog):
    train, _ = digits()

    def jump(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 60:
            for group in opt.param_groups:
                group["lr"] = 10.0

    model = mlp()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        _, report = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), train, epochs=4, before_step=jump, watch={})
    lines = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert report is not None and report.action_counts
    verbs = {"skip_step": "skipped step", "clip": "clipped the gradient norm", "lr_decay": "lowered the learning rate",
             "rollback": "rolled back at step"}
    for kind in report.action_counts:
        assert any(verbs[kind] in line for line in lines), (kind, lines)
    assert lines[-1].startswith("gradwatch: run done")
    assert len(lines) <= 2 * len(report.action_counts) + 2  # rate-limited, not one line per step
    assert report.verdict() == "RESCUED" and "RESCUED" in report.summary()
