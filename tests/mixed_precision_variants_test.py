"""Every variant under mixed_float16 and mixed_bfloat16, through an overflow.

The first batch has infinite inputs, so its gradients are not finite and
the loss-scale optimizer skips the step. The variants' state (AE-SAM's
statistics, LookSAM's direction) and the logged metrics must stay finite,
and SAM must keep running on the finite batches that follow.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_sam
from keras_sam import switching
from tests import oracle
from tests.mixed_precision_test import dtype_policy
from tests.sam_model_test import BATCH
from tests.sam_model_test import RHO
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent
from tests.variants_test import VARIANT_SETTINGS

EPOCHS = 3  # 3 steps each; the first step of the first epoch overflows.


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    with dtype_policy(request.param):
        yield request.param


def overflowing_dataset():
    x, y, _, _ = softmax_data()
    x = x.copy()
    x[:BATCH] = np.inf
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


@pytest.mark.parametrize("variant", VARIANT_SETTINGS)
def test_an_overflow_leaves_every_variant_finite_and_running(
    mixed_policy, variant
):
    _, _, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0), rho=RHO, **VARIANT_SETTINGS[variant]()
    )
    # Keras wraps the optimizer for mixed_float16 only; bfloat16 needs the
    # wrapper to skip a non-finite step at all.
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(sgd()), loss=xent()
    )
    history = model.fit(
        overflowing_dataset(), epochs=EPOCHS, shuffle=False, verbose=0
    )

    assert float(model.optimizer.dynamic_scale) < 2.0**15  # it overflowed
    for variable in model.base.weights + model.non_trainable_variables:
        assert np.all(np.isfinite(variable.numpy())), variable.path
    assert np.abs(model.base.get_weights()[0] - w0).max() > 1e-2
    # Momentum-SAM has no clean pass, so it logs neither.
    logged = () if variant == "msam" else ("grad_norm", "sharpness")
    for name in logged:
        assert np.all(np.isfinite(history.history[name])), name
        assert max(history.history[name]) > 0, name
    if "sam_fraction" in history.history:
        assert max(history.history["sam_fraction"]) > 0
    policy = model.switching
    if isinstance(policy, switching.GradientNormOutlier):
        assert float(policy.started.numpy()) == 1.0
        assert float(policy.mean.numpy()) > 0
    if model.looksam_alpha is not None:
        directions = model._looksam_directions
        assert any(np.abs(d.numpy()).max() > 0 for d in directions)


def test_ae_sam_ignores_a_non_finite_gradient_norm():
    policy = switching.GradientNormOutlier(decay=0.5, c_start=0.0)
    assert bool(policy(tf.constant(0, tf.int64), tf.constant(4.0)))
    for bad in (np.inf, np.nan):
        assert not bool(
            policy(tf.constant(1, tf.int64), tf.constant(bad, tf.float32))
        )
        assert float(policy.mean.numpy()) == 4.0
        assert float(policy.variance.numpy()) == 0.0
    # The next finite norm updates the statistics as if nothing happened:
    # μ = 0.5·4 + 0.5·6 = 5, σ² = 0.5·(6 − 5)² = 0.5.
    assert bool(policy(tf.constant(2, tf.int64), tf.constant(6.0)))
    assert float(policy.mean.numpy()) == 5.0
    assert float(policy.variance.numpy()) == 0.5


def test_ae_sam_keeps_float32_statistics_under_mixed_float16(mixed_policy):
    policy = switching.GradientNormOutlier()
    assert policy.dtype_policy.name == "float32"
    assert bool(policy(tf.constant(0, tf.int64), tf.constant(2.0)))
    assert policy.mean.dtype == "float32"


def test_ae_sam_keeps_statistics_of_the_gradient_without_the_loss_scale():
    # The loss-scale optimizer's gradients are its scale (2**15) times the
    # loss's; AE-SAM's statistics, kept over steps between which that scale
    # moves, must hold the loss's own ‖g‖², as in float32.
    def statistics(policy_name):
        with dtype_policy(policy_name):
            x, y, w0, b0 = softmax_data()
            model = keras_sam.SAMModel(
                softmax_regression(w0, b0),
                rho=RHO,
                switching=switching.GradientNormOutlier(0.5),
            )
            model.compile(optimizer=sgd(), loss=xent())
            model.fit(
                x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
            )
        policy = model.switching
        scale = float(model.optimizer.scale_loss(1.0))
        return scale, [float(policy.mean), float(policy.variance)]

    _, want = statistics("float32")
    scale, got = statistics("mixed_float16")
    assert scale == 2.0**15
    # float16 passes: 3e-4 apart; scaled: 2**30 times.
    np.testing.assert_allclose(got, want, rtol=1e-2)


def test_looksam_keeps_its_direction_when_a_sam_step_is_not_finite():
    x, y, w0, b0 = softmax_data()
    x, y = x[:BATCH], y[:BATCH]
    model = softmax_regression(w0, b0)
    directions = [
        keras.Variable(np.full(w.shape, 0.5, "float32")) for w in (w0, b0)
    ]

    def compute_loss(x, y, y_pred, sample_weight):
        loss = xent()(y, y_pred, sample_weight)
        # The clean pass is traced first, the perturbed pass second.
        compute_loss.calls += 1
        return loss if compute_loss.calls % 2 else loss * factor

    def step():
        compute_loss.calls = 0
        return keras_sam.compute_sam_gradients(
            model,
            compute_loss,
            x,
            y,
            options=keras_sam.options.SAMOptions(
                rho=RHO, switching=switching.Periodic(3), looksam_alpha=0.7
            ),
            step=ops.convert_to_tensor(0),
            looksam_directions=directions,
        )

    factor = np.float32(np.nan)  # A perturbed pass that overflowed.
    step()
    for d in directions:
        np.testing.assert_array_equal(d.numpy(), np.full(d.shape, 0.5))

    factor = np.float32(1.0)
    step()
    _, clean = oracle.softmax_regression_loss_and_grad(w0, b0, x, y)
    _, sam = oracle.sam_gradient(w0, b0, x, y, RHO)
    for g, s, d in zip(clean, sam, directions):
        np.testing.assert_allclose(
            d.numpy(),
            s - np.sum(g * s) / np.sum(g * g) * g,
            rtol=1e-4,
            atol=1e-6,
        )
