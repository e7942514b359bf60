"""benchmarks.gpu_step_time, the GPU timing script, run small on the CPU."""

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the GPU machines run JAX only"
)


@pytest.fixture
def gpu_step_time(monkeypatch):
    from benchmarks import gpu_step_time

    # A model small enough for a test, built like the script's own, with
    # BatchNorm statistics and dropout's random state to carry over.
    monkeypatch.setitem(gpu_step_time.SHAPES, "small_cnn", ((8, 8, 1), 3))
    return gpu_step_time


@pytest.mark.parametrize("sam", [False, True])
def test_the_timed_step_is_the_step_fit_takes(gpu_step_time, sam):
    import jax

    step, state, data = gpu_step_time.compiled_step("small_cnn", sam, 4)
    _, state = step(state, data)
    timed = [np.asarray(v) for v in state[0]]

    # The same model, compiled and fed alike, takes the same two steps in
    # fit: the timed step is Keras' own, its state carried whole.
    keras.utils.set_random_seed(0)
    base = gpu_step_time.build("small_cnn")
    model = gpu_step_time.keras_sam.SAMModel(base) if sam else base
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = (np.asarray(t) for t in jax.device_get(data))
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(timed, model.trainable_variables):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_measured_row_and_its_table(gpu_step_time):
    row = gpu_step_time.measure("small_cnn", "bfloat16", 4, 1, 2, 1)
    # The mixed policy is the measurement's only: it is reset after.
    assert keras.config.dtype_policy().name == "float32"
    assert row["precision"] == "bfloat16" and row["anchor_ms"] is None
    assert row["sgd_ms"] > 0 and row["sam_ms"] > 0
    assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    table = gpu_step_time.markdown([row], "cpu")
    assert "| small_cnn | bfloat16 | 4 |" in table
    assert f"{row['ratio_median']:.2f}×" in table and "| — |" in table


def test_an_unknown_model_is_named(gpu_step_time):
    with pytest.raises(SystemExit, match="unknown model 'vgg'"):
        gpu_step_time.main(["--models=vgg"])
