"""``gradwatch check`` on compiled Keras 3 models (the default backend of this process)."""

from __future__ import annotations

import pytest

pytest.importorskip("keras")
import keras  # noqa: E402

pytest.importorskip("gradwatch.integrations.keras")


def test_healthy_keras_mlp_exits_0(check):
    run = check("keras_healthy", "--steps", "12")
    assert run.code == 0, run.out + run.err
    data = run.data
    assert data["healthy"] is True and data["framework"].startswith("keras")
    assert data["steps_measured"] == 12  # 8 batches per epoch: fit ran 2 epochs, stopped at 12


def test_vanishing_keras_mlp_exits_1(check):
    run = check("keras_vanishing", "--steps", "20")
    assert run.code == 1, run.out + run.err
    assert "vanishing" in run.kinds() and "vanishing" in run.failed_cases()
    finding = next(f for f in run.data["findings"] if f["kind"] == "vanishing")
    assert finding["layers"][0] == "dense_0"


@pytest.mark.parametrize("factory", ["keras_pydataset", "keras_generator"])
def test_datasets_run_the_steps_asked(check, factory):
    run = check(factory, "--steps", "10")
    assert run.code == 0, run.out + run.err
    assert run.data["steps_measured"] == 10


def test_uncompiled_model_is_a_usage_error(check):
    run = check("keras_uncompiled", outputs=False)
    assert run.code == 2 and "not compiled; call model.compile(optimizer=..., loss=...)" in run.err


@pytest.mark.parametrize("factory", ["keras_tf_data", "keras_tf_data_repeated"])
def test_tf_data_runs_the_steps_asked(check, factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.data pipelines are fed to fit on the TensorFlow backend here")
    pytest.importorskip("tensorflow")
    run = check(factory, "--steps", "11")
    assert run.code == 0, run.out + run.err
    assert run.data["steps_measured"] == 11
