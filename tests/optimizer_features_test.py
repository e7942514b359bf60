"""SAMModel with the Keras optimizer's own features, against NumPy oracles.

Gradient accumulation, EMA of the weights and gradient clipping are the
base optimizer's: SAMModel hands it one SAM gradient per batch. These
tests pin down what that means (docs/keras_features.md) with
`oracle.train_keras_sgd`, a hand-written Keras SGD on SAM gradients.
"""

import keras
import numpy as np
import pytest

import keras_sam
from tests import backends
from tests import oracle
from tests.sam_model_test import BATCH
from tests.sam_model_test import RHO
from tests.sam_model_test import batches
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent

LR, MOMENTUM = 0.2, 0.9
EPOCHS = 2  # 3 batches each: 6 calls of the optimizer

MODES = {
    "graph": dict(jit_compile=False),
    "jit": dict(jit_compile=True),
}
# `torch.compile` takes minutes per test here; the PyTorch trainer's
# default (eager) is what "graph" runs on PyTorch.
MODE_PARAMS = [
    pytest.param(
        mode,
        marks=pytest.mark.skipif(
            backends.BACKEND == "torch" and mode == "jit",
            reason="torch.compile is slow; eager is covered by 'graph'",
        ),
    )
    for mode in MODES
]


def fit(optimizer_kwargs, mode="graph", rho=RHO, epochs=EPOCHS, lr=LR):
    """The base model's (W, b) after `fit` with SGD(**optimizer_kwargs)."""
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=rho)
    model.compile(
        optimizer=keras.optimizers.SGD(
            lr, momentum=MOMENTUM, **optimizer_kwargs
        ),
        loss=xent(),
        **MODES[mode],
    )
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model.base.get_weights()


def oracle_fit(rho=RHO, epochs=EPOCHS, lr=LR, **kw):
    """`oracle.train_keras_sgd` on the batches `fit` sees."""
    x, y, w0, b0 = softmax_data()
    return oracle.train_keras_sgd(
        w0,
        b0,
        batches(x, y) * epochs,
        rho,
        lr,
        MOMENTUM,
        **kw,
    )


def assert_weights(got, want_w, want_b):
    np.testing.assert_allclose(got[0], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("steps", [2, 3])
def test_gradient_accumulation_averages_sam_gradients_with_per_batch_eps(
    steps, mode
):
    got = fit(dict(gradient_accumulation_steps=steps), mode)

    want_w, want_b, _, _ = oracle_fit(accumulation_steps=steps)
    assert_weights(got, want_w, want_b)
    # One ε per accumulated update (from the union of the batches) is a
    # different algorithm and lands elsewhere.
    x, y, w0, b0 = softmax_data()
    merged = [
        (
            np.concatenate([bx for bx, _, _ in group]),
            np.concatenate([by for _, by, _ in group]),
        )
        for group in zip(*[iter(batches(x, y) * EPOCHS)] * steps)
    ]
    other_w, _, _, _ = oracle.train_keras_sgd(w0, b0, merged, RHO, LR, MOMENTUM)
    assert np.abs(other_w - want_w).max() > 1e-4
    # And accumulation is not SAM on every batch.
    every_w, _, _, _ = oracle_fit()
    assert np.abs(every_w - want_w).max() > 1e-2


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize(
    "ema",
    [
        dict(ema_momentum=0.5),
        dict(ema_momentum=0.5, ema_overwrite_frequency=2),
        dict(ema_momentum=0.5, gradient_accumulation_steps=2),
    ],
    ids=["ema", "ema_overwrite_every_2", "ema_with_accumulation_2"],
)
def test_ema_averages_the_unperturbed_weights_and_fit_ends_on_it(ema, mode):
    got = fit(dict(use_ema=True, **ema), mode)

    kwargs = dict(
        ema_momentum=ema["ema_momentum"],
        ema_overwrite_frequency=ema.get("ema_overwrite_frequency"),
        accumulation_steps=ema.get("gradient_accumulation_steps"),
    )
    _, _, _, average = oracle_fit(**kwargs)
    # `fit` ends by writing the average into the weights.
    assert_weights(got, *average)
    no_ema_w, _, _, _ = oracle_fit(
        accumulation_steps=kwargs["accumulation_steps"]
    )
    assert np.abs(average[0] - no_ema_w).max() > 1e-3


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize(
    "clipping",
    [
        dict(clipnorm=0.05),
        dict(global_clipnorm=0.05),
        dict(clipvalue=0.01),
        dict(global_clipnorm=0.05, gradient_accumulation_steps=2),
    ],
    ids=[
        "clipnorm",
        "global_clipnorm",
        "clipvalue",
        "global_clipnorm_with_accumulation_2",
    ],
)
def test_clipping_applies_to_the_sam_gradient(clipping, mode):
    clipping = dict(clipping)
    steps = clipping.pop("gradient_accumulation_steps", None)
    got = fit(dict(gradient_accumulation_steps=steps, **clipping), mode)

    want_w, want_b, _, _ = oracle_fit(accumulation_steps=steps, **clipping)
    assert_weights(got, want_w, want_b)
    # The clip is active: without it the weights land elsewhere.
    free_w, _, _, _ = oracle_fit(accumulation_steps=steps)
    assert np.abs(free_w - want_w).max() > 1e-2


def test_rho_schedule_counts_calls_as_the_learning_rate_under_accumulation():
    # ρ = 0.5 for call 0 only, then 0: a schedule sees the step Keras gives
    # a learning-rate schedule (calls to `apply`), not `iterations`
    # (updates, calls // 2).
    rho = keras.optimizers.schedules.PiecewiseConstantDecay([0], [RHO, 0.0])
    got = fit(dict(gradient_accumulation_steps=2), rho=rho)

    want_w, want_b, _, _ = oracle_fit(
        rho=lambda t: RHO if t == 0 else 0.0, accumulation_steps=2
    )
    assert_weights(got, want_w, want_b)
    per_update_w, _, _, _ = oracle_fit(
        rho=lambda t: RHO if t // 2 == 0 else 0.0, accumulation_steps=2
    )
    assert np.abs(per_update_w - want_w).max() > 1e-4


def test_rho_following_learning_rate_uses_the_applied_rate_under_accumulation():
    # The optimizer's rate is LR for calls 0-1 and LR / 2 from call 2 on
    # (Keras evaluates it at the call); ρ should follow: 0.5, then 0.
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([1], [LR, LR / 2])
    rho = keras_sam.schedules.RhoFollowingLearningRate(
        lr, rho_max=RHO, rho_min=0.0, lr_max=LR, lr_min=LR / 2
    )
    got = fit(dict(gradient_accumulation_steps=2), rho=rho, lr=lr)

    want_w, want_b, _, _ = oracle_fit(
        rho=lambda t: RHO if t <= 1 else 0.0,
        lr=lambda t: LR if t <= 1 else LR / 2,
        accumulation_steps=2,
    )
    assert_weights(got, want_w, want_b)
