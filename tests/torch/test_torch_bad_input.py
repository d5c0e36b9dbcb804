"""Bad input to ``gradwatch.watch`` gets a clear error at the call that is wrong (the rule, the
value, the fix), never a silent wrong report or an "internal error" later."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from gw_torch_models import mlp, regression_data, same_params, train  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import GradwatchWarning  # noqa: E402


def test_an_optimizer_that_steps_with_a_closure_is_refused():
    model = mlp()
    with pytest.raises(TypeError, match="LBFGS: its step\\(closure\\) evaluates"):
        gradwatch.watch(model, torch.optim.LBFGS(model.parameters()))


def test_a_closure_passed_to_step_stops_watching_with_one_clear_warning():
    model, reference = mlp(seed=3), mlp(seed=3)
    x, y = regression_data()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)

    def step_with_closure(net, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt) as w:
            for _ in range(5):
                step_with_closure(model, opt)
    for _ in range(5):
        step_with_closure(reference, ref_opt)
    messages = [str(c.message) for c in caught if issubclass(c.category, GradwatchWarning)]
    assert len(messages) == 1 and "step(closure) recomputes the gradients" in messages[0]
    assert not w.failsafe.active and w.report().steps_measured == 0
    assert same_params(model, reference)  # training went on unchanged

    strict_model = mlp(seed=3)
    strict_opt = torch.optim.SGD(strict_model.parameters(), lr=0.05)
    with gradwatch.watch(strict_model, strict_opt, strict=True), pytest.raises(TypeError, match="closure"):
        step_with_closure(strict_model, strict_opt)


def test_watching_the_same_model_or_optimizer_twice_is_refused_until_removed():
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    first = gradwatch.watch(model, opt)
    with pytest.raises(RuntimeError, match="model .* already watched"):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="optimizer .* already watched"):
        gradwatch.watch(None, opt)
    first.remove()
    with gradwatch.watch(model, opt) as second:  # free again once removed
        train(model, opt, 3, watch=second)
    assert second.report().steps_measured == 3


def test_an_optimizer_that_does_not_train_the_model_is_refused():
    model, other = mlp(seed=0), mlp(seed=1)
    with pytest.raises(ValueError, match="holds none of the model's 8 parameters"):
        gradwatch.watch(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_a_model_without_parameters_is_refused():
    with pytest.raises(ValueError, match="has no parameters"):
        gradwatch.watch(nn.ReLU(), torch.optim.SGD(mlp().parameters(), lr=0.1))


@pytest.mark.parametrize("loss, match", [
    ("x", "received str 'x'"),
    (torch.ones(4), "tensor of shape \\(4,\\)"),
    (None, "received NoneType"),
    (True, "received bool"),
])
def test_record_loss_refuses_what_is_not_a_scalar_loss_at_the_call(loss, match):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, strict=True) as w:
        with pytest.raises(TypeError, match=match):
            w.record_loss(loss)
        train(model, opt, 3, watch=w)  # the watch is unharmed and goes on
    assert w.report().steps_measured == 3 and w.failsafe.active is False  # removed


def test_every_option_is_checked_the_same_way_in_every_adapter():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for bad in (True, 0, 1.5):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            gradwatch.watch(model, opt, every=bad)
    with pytest.raises(ValueError, match="rollback_every must be .auto., None"):
        gradwatch.watch(model, opt, rollback_every=True)
    with pytest.raises(TypeError, match="Each sink must be"):
        gradwatch.watch(model, opt, sinks=[42])
