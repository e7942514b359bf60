"""SAMModel under the mixed_float16 policy (loss scaling, overflow)."""

import contextlib

import keras
import numpy as np
import pytest

import keras_sam
from tests import backends
from tests import oracle
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import batches
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy `name`, then float32 again."""
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.fixture
def mixed_float16():
    with dtype_policy("mixed_float16"):
        yield


def test_mixed_float16_scales_the_loss_and_matches_the_oracle(mixed_float16):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)

    want_w, want_b, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), RHO, LR, MOMENTUM
    )
    got_w, got_b = model.base.get_weights()
    assert got_w.dtype == np.float32
    # float16 activations: close to the float64 oracle, not bitwise. An
    # unscaled loss would leave the weights 2^15 times too close to w0.
    np.testing.assert_allclose(got_w, want_w, rtol=2e-2, atol=5e-3)
    np.testing.assert_allclose(got_b, want_b, rtol=2e-2, atol=5e-3)
    assert np.abs(got_w - w0).max() > 0.1


def test_overflowing_first_gradient_skips_the_step_without_nan(mixed_float16):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    scale_before = model.optimizer.initial_scale
    # 6e4 · |w| overflows float16 logits: the clean gradient is not finite.
    model.fit(6e4 * x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
    got_w, got_b = model.base.get_weights()
    np.testing.assert_array_equal(got_w, w0)
    np.testing.assert_array_equal(got_b, b0)
    assert float(model.optimizer.dynamic_scale) == scale_before / 2
    # Training then continues normally on finite data.
    model.fit(x, y, batch_size=BATCH, verbose=0)
    assert np.all(np.isfinite(model.base.get_weights()[0]))
    assert np.abs(model.base.get_weights()[0] - w0).max() > 0.01


def _custom_loop_step(model, optimizer, x, y):
    """One SAM step of a custom loop, and its update: on JAX the stateless
    loop's, as Keras' `LossScaleOptimizer.apply` fails there eagerly."""
    if backends.BACKEND != "jax":
        _, gradients = keras_sam.sam_gradients(
            model, x, y, xent(), rho=RHO, optimizer=optimizer
        )
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return
    trainable = [v.value for v in model.trainable_variables]
    optimizer_variables = [v.value for v in optimizer.variables]
    _, gradients, _ = keras_sam.stateless_sam_gradients(
        model,
        trainable,
        [v.value for v in model.non_trainable_variables],
        x,
        y,
        xent(),
        rho=RHO,
        optimizer=optimizer,
        optimizer_variables=optimizer_variables,
    )
    values = optimizer.stateless_apply(
        optimizer_variables, gradients, trainable
    )
    for variables, new in zip(
        (model.trainable_variables, optimizer.variables), values
    ):
        for variable, value in zip(variables, new):
            variable.assign(value)


def test_a_custom_loop_scales_by_the_optimizer_it_must_be_given(
    mixed_float16,
):
    x, y, w0, b0 = softmax_data()
    model = softmax_regression(w0, b0)
    with pytest.raises(ValueError, match="Received: optimizer=None for"):
        keras_sam.sam_gradients(model, x[:BATCH], y[:BATCH], xent(), rho=RHO)
    with pytest.raises(ValueError, match="Received: optimizer=None for"):
        keras_sam.stateless_sam_gradients(
            model,
            [v.value for v in model.trainable_variables],
            [],
            x[:BATCH],
            y[:BATCH],
            xent(),
            rho=RHO,
        )
    optimizer = keras.optimizers.LossScaleOptimizer(sgd())
    optimizer.build(model.trainable_variables)
    for x_batch, y_batch, _ in batches(x, y):
        _custom_loop_step(model, optimizer, x_batch, y_batch)

    want_w, want_b, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), RHO, LR, MOMENTUM
    )
    got_w, got_b = model.get_weights()
    # Its `apply` divided by 2^15 what the loss was scaled by.
    np.testing.assert_allclose(got_w, want_w, rtol=2e-2, atol=5e-3)
    np.testing.assert_allclose(got_b, want_b, rtol=2e-2, atol=5e-3)
    assert np.abs(got_w - w0).max() > 0.1
