"""Momentum-SAM (`perturbation="momentum"`) against two NumPy oracles."""

import os

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import switching
from tests import backends
from tests import oracle
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MODES
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import batches
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent

RHO = 0.3
EPOCHS = 3
L2 = 0.01


def msam_model(rho=RHO, l2=L2, **kwargs):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0, l2=l2),
        rho=rho,
        perturbation="momentum",
        **kwargs,
    )
    return model


def all_batches(epochs=EPOCHS, sample_weight=None):
    x, y, _, _ = softmax_data()
    return batches(x, y, sample_weight) * epochs


@pytest.mark.parametrize("mode", MODES)
def test_matches_the_keras_convention_oracle_over_several_steps(mode):
    x, y, w0, b0 = softmax_data()
    model = msam_model()
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    history = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0
    )
    want_w, want_b, losses = oracle.train_momentum_sam(
        w0, b0, all_batches(), RHO, LR, MOMENTUM, l2=L2
    )
    # The logged loss is the loss at w + ε, averaged over the epoch's steps.
    oracle.assert_fit_matches(model, history, want_w, want_b, losses, EPOCHS)
    assert "sharpness" not in history.history


def test_is_the_authors_pytorch_formulation_at_a_constant_rate():
    _, _, w0, b0 = softmax_data()
    keras_w, keras_b, _ = oracle.train_momentum_sam(
        w0, b0, all_batches(), RHO, LR, MOMENTUM, l2=L2
    )
    authors_w, authors_b = oracle.train_momentum_sam_as_published(
        w0, b0, all_batches(), RHO, LR, MOMENTUM, l2=L2
    )
    np.testing.assert_allclose(keras_w, authors_w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(keras_b, authors_b, rtol=1e-9, atol=1e-12)
    plain_w, _, _ = oracle.train_sgd_momentum(
        w0, b0, all_batches(), 0.0, LR, MOMENTUM, l2=L2
    )
    assert np.abs(plain_w - keras_w).max() > 1e-3


def test_sample_weights_follow_the_oracle():
    x, y, w0, b0 = softmax_data()
    sample_weight = np.linspace(0.2, 2.0, len(y)).astype("float32")
    model = msam_model()
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
    )
    want_w, want_b, _ = oracle.train_momentum_sam(
        w0,
        b0,
        all_batches(sample_weight=sample_weight),
        RHO,
        LR,
        MOMENTUM,
        l2=L2,
    )
    np.testing.assert_allclose(model.base.get_weights()[0], want_w, rtol=1e-5)


def test_perturbing_only_the_kernel_follows_the_masked_oracle():
    x, y, w0, b0 = softmax_data()
    model = msam_model(perturbed_variables=["kernel"])
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    want = oracle.train_momentum_sam(
        w0, b0, all_batches(), RHO, LR, MOMENTUM, l2=L2, mask=(True, False)
    )
    whole = oracle.train_momentum_sam(
        w0, b0, all_batches(), RHO, LR, MOMENTUM, l2=L2
    )
    assert np.abs(whole[0] - want[0]).max() > 1e-3  # the mask tells
    for got, expected in zip(model.base.get_weights(), want[:2]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_step_reports_its_one_pass():
    # `compute_sam_gradients` returns the loss and ‖∇L‖ of the pass at
    # w + ε, and no sharpness, as its docstring says.
    x, y, w0, b0 = softmax_data()
    x, y = x[:BATCH], y[:BATCH]
    rng = np.random.RandomState(3)
    mw, mb = rng.randn(*w0.shape), rng.randn(*b0.shape)
    norm = np.sqrt(np.sum(mw**2) + np.sum(mb**2))
    want_loss, want = oracle.softmax_regression_loss_and_grad(
        w0 + RHO * mw / norm, b0 + RHO * mb / norm, x, y
    )
    result = keras_sam.compute_sam_gradients(
        softmax_regression(w0, b0),
        lambda x, y, y_pred, sample_weight: xent()(y, y_pred),
        x,
        y,
        options=keras_sam.SAMOptions(rho=RHO, perturbation="momentum"),
        momentums=[keras.Variable(m.astype("float32")) for m in (mw, mb)],
    )
    numpy = keras.ops.convert_to_numpy
    for got, expected in zip(result.gradients, want):
        np.testing.assert_allclose(numpy(got), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(numpy(result.loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(
        numpy(result.grad_norm),
        np.sqrt(sum(np.sum(g**2) for g in want)),
        rtol=1e-6,
    )
    assert float(numpy(result.sharpness)) == 0.0


def test_rho_zero_is_the_plain_fit():
    x, y, w0, b0 = softmax_data()
    model = msam_model(rho=0.0)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    plain = softmax_regression(w0, b0, l2=L2)
    plain.compile(optimizer=sgd(), loss=xent())
    plain.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    for a, b in zip(model.base.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_resumed_run_continues_exactly(tmp_path):
    x, y, _, _ = softmax_data()
    straight = msam_model()
    straight.compile(optimizer=sgd(), loss=xent())
    straight.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    first = msam_model()
    first.compile(optimizer=sgd(), loss=xent())
    first.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    path = os.fspath(tmp_path / "msam.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert resumed.perturbation == "momentum"
    resumed.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.base.get_weights(), straight.base.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@backends.tensorflow_only
def test_two_replicas_take_the_single_device_step():
    from tests.distribute_test import assert_two_replicas_match_one_device

    assert_two_replicas_match_one_device(
        lambda: msam_model(), sgd, xent(), softmax_data()[:2], BATCH, EPOCHS
    )


@pytest.mark.parametrize(
    "optimizer, message",
    [
        (keras.optimizers.Adam(), "Received: optimizer=Adam"),
        (keras.optimizers.SGD(0.1), "SGD(momentum=0.0)"),
    ],
    ids=["adam", "sgd_without_momentum"],
)
def test_an_optimizer_without_momentum_is_refused(optimizer, message):
    x, y, _, _ = softmax_data()
    model = msam_model()
    model.compile(optimizer=optimizer, loss=xent())
    with pytest.raises(ValueError, match=re_escape(message)):
        model.fit(x, y, batch_size=BATCH, verbose=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(adaptive=True),
        dict(micro_batches=2),
        dict(gsam_alpha=0.1),
        dict(switching=switching.Periodic(2)),
        dict(sync_perturbations=True),
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_combinations_without_a_meaning_are_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"cannot be combined with `{name}`"):
        msam_model(**kwargs)


def test_a_layer_unfrozen_without_compiling_again_is_refused_naming_it():
    # The optimizer's momentum of a variable it was not built with had
    # failed in a bare `KeyError` of a Python object id.
    x, y, w0, b0 = softmax_data()
    backbone = softmax_regression(w0, b0)
    backbone.trainable = False
    base = keras.Sequential(
        [keras.Input(x.shape[1:]), backbone, keras.layers.Dense(w0.shape[1])]
    )
    model = keras_sam.SAMModel(base, rho=0.5, perturbation="momentum")
    model.compile(optimizer=sgd(), loss=xent(), run_eagerly=True)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    backbone.trainable = True
    with pytest.raises(ValueError, match=r"Unknown variables: \['.*kernel"):
        model.fit(x, y, batch_size=BATCH, verbose=0)


def test_a_bad_perturbation_names_the_value():
    with pytest.raises(ValueError, match="perturbation='gradients'"):
        keras_sam.SAMModel(
            softmax_regression(*softmax_data()[2:]), perturbation="gradients"
        )


def re_escape(text):
    import re

    return re.escape(text)
