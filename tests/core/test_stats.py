from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch import Layout, StepStats
from gradwatch.stats import guess_role, layer_of


def test_layout_from_names_guesses_layers_and_roles():
    layout = Layout.from_names(
        ["encoder.0.weight", "encoder.0.bias", "embed.weight", "norm.weight", "dense_1/kernel", "dense_1/bias"],
        numel=[6, 3, 50, 3, 12, 4],
    )
    assert layout.layers == ("encoder.0", "encoder.0", "embed", "norm", "dense_1", "dense_1")
    assert layout.roles == ("weight", "bias", "embedding", "norm", "weight", "bias")
    assert layout.layer_names() == ("encoder.0", "embed", "norm", "dense_1")
    assert list(layout.layer_ids) == [0, 0, 1, 2, 3, 3]


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("fc.weight", "weight"),
        ("fc.bias", "bias"),
        ("bn1.weight", "norm"),
        ("layer_norm.bias", "norm"),
        ("batch_normalization/gamma", "norm"),
        ("embedding/embeddings", "embedding"),
        ("lstm/lstm_cell/recurrent_kernel", "weight"),
        ("conv.depthwise_kernel", "weight"),
        ("pos_emb", "embedding"),
        ("some_scalar", "other"),
    ],
)
def test_guess_role(name, role):
    assert guess_role(name) == role


def test_layer_of():
    assert layer_of("a.b.weight") == "a.b"
    assert layer_of("dense/kernel") == "dense"
    assert layer_of("weight") == "weight"


def test_layout_rejects_mismatched_lengths_and_unknown_roles():
    with pytest.raises(ValueError, match="one entry per parameter tensor: 2 names but 1 layers"):
        Layout(("a", "b"), ("x",), ("weight", "bias"), (1, 1))
    with pytest.raises(ValueError, match="Unknown parameter role"):
        Layout(("a",), ("x",), ("kernel",), (1,))


def test_stepstats_defaults_and_global_norm():
    layout = Layout.from_names(["fc1.weight", "fc1.bias"], numel=[12, 3])
    s = StepStats(step=0, layout=layout, grad_norm=[3.0, 4.0])
    assert s.global_norm == pytest.approx(5.0)
    assert s.finite
    assert s.loss is None and s.lr is None
    assert np.isnan(s.param_norm).all() and not s.params_measured
    assert s.has_grad.all()
    assert list(s.nonfinite) == [0, 0]
    assert not s.params_nonfinite.any()


def test_stepstats_non_finite_and_missing_gradients():
    layout = Layout.from_names(["a.weight", "b.weight", "c.weight"])
    s = StepStats(step=1, layout=layout, grad_norm=[np.nan, 1.0, 0.0], has_grad=[True, True, False],
                  param_norm=[np.inf, 1.0, 1.0])
    assert not s.finite
    assert list(s.nonfinite) == [1, 0, 0]
    assert list(s.params_nonfinite) == [True, False, False]
    # A tensor without a gradient does not count, even if its entry is garbage.
    t = StepStats(step=1, layout=layout, grad_norm=[1.0, 1.0, np.nan], has_grad=[True, True, False])
    assert t.finite
    assert t.global_norm == pytest.approx(math.sqrt(2))


def test_stepstats_rejects_wrong_shapes():
    layout = Layout.from_names(["a.weight", "b.weight"])
    with pytest.raises(ValueError, match=r"grad_norm needs one value per parameter tensor \(2\)"):
        StepStats(step=0, layout=layout, grad_norm=[1.0, 2.0, 3.0])


def test_layer_norms_aggregate_tensors_of_a_layer():
    layout = Layout.from_names(["fc.weight", "fc.bias", "out.weight"])
    s = StepStats(step=0, layout=layout, grad_norm=[3.0, 4.0, 1.0], param_norm=[1.0, 1.0, 2.0])
    assert s.layer_grad_norms() == pytest.approx({"fc": 5.0, "out": 1.0})
    assert s.layer_grad_norms(("weight",)) == pytest.approx({"fc": 3.0, "out": 1.0})
    assert s.layer_param_norms(("weight",)) == pytest.approx({"fc": 1.0, "out": 2.0})


def test_stepstats_to_dict_is_json_friendly():
    import json

    layout = Layout.from_names(["a.weight"])
    s = StepStats(step=3, layout=layout, grad_norm=[np.nan], param_norm=[np.inf], loss=float("nan"), lr=float("inf"))
    d = s.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["grad_norm"] == [None] and d["param_norm"] == ["inf"]  # the convention of reports and sinks
    assert d["loss"] is None and d["lr"] == "inf"


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("encoder.layer.0.attention.self.query.weight", "other"),
        ("model.layers.3.self_attn.k_proj.weight", "other"),
        ("multi_head_attention/query/kernel", "other"),
        ("model.layers.3.self_attn.v_proj.weight", "weight"),
        ("multi_head_attention/value/kernel", "weight"),
        ("keyboard.weight", "weight"),
    ],
)
def test_attention_query_and_key_projections_are_not_compared_across_depth(name, role):
    assert guess_role(name) == role
