"""F-SAM (`perturbation="friendly"`) against a NumPy oracle of the authors'
algorithm (nblt/F-SAM's `FriendlySAM.first_step`)."""

import os
import re

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import switching
from tests import backends
from tests import oracle
from tests.mixed_precision_test import dtype_policy
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MODES
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import batches
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent

RHO = 0.5
EPOCHS = 3
L2 = 0.01
# Not the defaults: with σ = 1, d = g − m and the wrong order's
# g − (λ m + (1 − λ) g) = λ (g − m) give the same ε.
SIGMA, DECAY = 0.8, 0.6


class FriendlySAM:
    """F-SAM's gradient of each step, by hand in float64, with its state.

    As the authors' `first_step`: the first step keeps its clean gradient
    g as the average m and perturbs along g; every later step perturbs
    along d = g − σ m, then sets m ← λ m + (1 − λ) g. ε is SAM's (or
    ASAM's) from d, on the tensors in `mask` only; the step returns the
    gradient at w + ε (GSAM-combined with g when `gsam_alpha`).
    `update_first` moves m before d is formed instead: the wrong order.
    """

    def __init__(
        self,
        sigma=SIGMA,
        decay=DECAY,
        adaptive=False,
        gsam_alpha=0.0,
        mask=(True, True),
        update_first=False,
    ):
        self.sigma, self.decay = sigma, decay
        self.adaptive, self.gsam_alpha = adaptive, gsam_alpha
        self.mask, self.update_first = mask, update_first
        self.average = None

    def __call__(self, w, b, x, y, rho, sample_weight=None):
        loss, full = oracle.softmax_regression_loss_and_grad(
            w, b, x, y, sample_weight, L2
        )
        clean = [g for g, on in zip(full, self.mask) if on]
        if self.average is None:
            self.average, direction = list(clean), list(clean)
        else:
            moved = [
                self.decay * m + (1 - self.decay) * g
                for m, g in zip(self.average, clean)
            ]
            if self.update_first:
                self.average = moved
            direction = [
                g - self.sigma * m for g, m in zip(clean, self.average)
            ]
            self.average = moved
        weights = [v for v, on in zip((w, b), self.mask) if on]
        eps = iter(oracle.perturbation(direction, weights, rho, self.adaptive))
        ew, eb = [next(eps) if on else 0.0 for on in self.mask]
        _, sam = oracle.softmax_regression_loss_and_grad(
            w + ew, b + eb, x, y, sample_weight, L2
        )
        if self.gsam_alpha:
            dot = sum(np.sum(g * p) for g, p in zip(full, sam))
            squared = sum(np.sum(p * p) for p in sam)
            sam = [
                p - self.gsam_alpha * (g - dot / (squared + 1e-12) * p)
                for g, p in zip(full, sam)
            ]
        return loss, list(sam)


def friendly_model(**kwargs):
    _, _, w0, b0 = softmax_data()
    kwargs = {"friendly_sigma": SIGMA, "friendly_decay": DECAY, **kwargs}
    return keras_sam.SAMModel(
        softmax_regression(w0, b0, l2=L2),
        rho=RHO,
        perturbation="friendly",
        **kwargs,
    )


def all_batches(epochs=EPOCHS):
    x, y, _, _ = softmax_data()
    return batches(x, y) * epochs


def oracle_weights(epochs=EPOCHS, **kwargs):
    """(W, b), the clean losses and the final average m of the oracle."""
    _, _, w0, b0 = softmax_data()
    fsam = FriendlySAM(**kwargs)
    w, b, losses = oracle.train_sgd_momentum(
        w0, b0, all_batches(epochs), RHO, LR, MOMENTUM, gradient_fn=fsam
    )
    return w, b, losses, fsam.average


def fit(model, epochs=EPOCHS, **compile_kwargs):
    x, y, _, _ = softmax_data()
    model.compile(optimizer=sgd(), loss=xent(), **compile_kwargs)
    return model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0
    )


def test_the_oracle_tells_the_order_sigma_and_sam_apart():
    # So that matching the oracle to 1e-6 pins the order down.
    want = oracle_weights()[0]
    for other in (
        dict(update_first=True),
        dict(sigma=0.0),
        dict(decay=0.9),
    ):
        got = oracle_weights(**other)[0]
        assert np.abs(got - want).max() > 1e-3, other
    sam, _, _ = oracle.train_sgd_momentum(
        *softmax_data()[2:], all_batches(), RHO, LR, MOMENTUM, l2=L2
    )
    np.testing.assert_allclose(oracle_weights(sigma=0.0)[0], sam, rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_matches_the_authors_algorithm_over_several_steps(mode):
    model = friendly_model()
    history = fit(model, **MODES[mode])
    want_w, want_b, losses, average = oracle_weights()
    oracle.assert_fit_matches(model, history, want_w, want_b, losses, EPOCHS)
    assert "sharpness" in history.history
    for got, want in zip(model._friendly_averages, average):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


VARIANTS = {
    "the_defaults": (
        dict(friendly_sigma=1.0, friendly_decay=0.9),
        dict(sigma=1.0, decay=0.9),
    ),
    "adaptive": (dict(adaptive=True), dict(adaptive=True)),
    "gsam": (dict(gsam_alpha=0.3), dict(gsam_alpha=0.3)),
    "kernel_only": (
        dict(perturbed_variables=["kernel"]),
        dict(mask=(True, False)),
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_options_that_combine_match_the_oracle(variant):
    sam_kwargs, oracle_kwargs = VARIANTS[variant]
    model = friendly_model(**sam_kwargs)
    fit(model, jit_compile=False)
    want_w, want_b, _, _ = oracle_weights(**oracle_kwargs)
    got_w, got_b = model.base.get_weights()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)


def test_the_pure_functions_start_keep_and_guard_the_average():
    from keras import ops

    g = [np.array([1.0, -2.0], "float32"), None]
    m = [np.array([0.5, 0.5], "float32"), np.array([3.0], "float32")]
    d = keras_sam.friendly_direction(g, m, 0.8)
    np.testing.assert_allclose(ops.convert_to_numpy(d[0]), [0.6, -2.4])
    assert d[1] is None
    new = keras_sam.friendly_average(g, m, 0.6)
    np.testing.assert_allclose(ops.convert_to_numpy(new[0]), [0.7, -0.5])
    np.testing.assert_array_equal(ops.convert_to_numpy(new[1]), [3.0])
    # The first step (m = 0) starts the average at g.
    zero = [np.zeros(2, "float32"), np.zeros(1, "float32")]
    first = keras_sam.friendly_average(g, zero, 0.6)
    np.testing.assert_array_equal(ops.convert_to_numpy(first[0]), g[0])
    # An overflowed gradient leaves it, and gives ε = 0.
    bad = [np.array([np.inf, 1.0], "float32"), None]
    kept = keras_sam.friendly_average(bad, m, 0.6)
    np.testing.assert_array_equal(ops.convert_to_numpy(kept[0]), m[0])
    eps = keras_sam.sam_perturbation(
        keras_sam.friendly_direction(bad, m, 0.8), 0.5
    )
    np.testing.assert_array_equal(ops.convert_to_numpy(eps[0]), [0.0, 0.0])


@pytest.mark.parametrize("mode", MODES)
def test_sigma_zero_is_sam(mode):
    friendly = friendly_model(friendly_sigma=0.0)
    friendly_history = fit(friendly, **MODES[mode])
    _, _, w0, b0 = softmax_data()
    sam = keras_sam.SAMModel(softmax_regression(w0, b0, l2=L2), rho=RHO)
    sam_history = fit(sam, **MODES[mode])
    for got, want in zip(friendly.base.get_weights(), sam.base.get_weights()):
        backends.assert_matches_plain_fit(got, want, mode)
    backends.assert_matches_plain_fit(
        friendly_history.history["loss"], sam_history.history["loss"], mode
    )


def test_a_resumed_run_continues_exactly(tmp_path):
    straight = friendly_model()
    fit(straight, epochs=3)
    first = friendly_model()
    fit(first, epochs=2)
    path = os.fspath(tmp_path / "fsam.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert resumed.perturbation == "friendly"
    for got, want in zip(resumed._friendly_averages, first._friendly_averages):
        assert np.any(want.numpy() != 0)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    x, y, _, _ = softmax_data()
    resumed.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.base.get_weights(), straight.base.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_get_config_round_trips_the_options():
    model = friendly_model(friendly_sigma=0.5)
    config = model.get_config()
    assert config["perturbation"] == "friendly"
    assert (config["friendly_sigma"], config["friendly_decay"]) == (0.5, 0.6)
    clone = keras_sam.SAMModel.from_config(config)
    assert clone.get_config() == config
    assert clone.options.friendly_decay == 0.6
    # A config written before F-SAM existed takes its defaults.
    for name in ("friendly_sigma", "friendly_decay"):
        del config[name]
    config["perturbation"] = "gradient"
    older = keras_sam.SAMModel.from_config(config)
    assert (older.friendly_sigma, older.friendly_decay) == (1.0, 0.9)


@backends.tensorflow_only
def test_two_replicas_with_sync_perturbations_take_the_single_device_step():
    from tests.distribute_test import assert_two_replicas_match_one_device

    assert_two_replicas_match_one_device(
        lambda: friendly_model(sync_perturbations=True),
        sgd,
        xent(),
        softmax_data()[:2],
        BATCH,
        EPOCHS,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(friendly_sigma=-1),
            "`friendly_sigma` must be >= 0. Received: friendly_sigma=-1",
        ),
        (dict(friendly_sigma="1"), "friendly_sigma='1'"),
        (dict(friendly_sigma=float("nan")), "friendly_sigma=nan"),
        (dict(friendly_decay=1.0), "`friendly_decay` must be < 1"),
        (dict(friendly_decay=-0.1), "Received: friendly_decay=-0.1"),
        (dict(friendly_decay=True), "friendly_decay=True"),
        (
            dict(micro_batches=2),
            "cannot be combined with `micro_batches` (F-SAM keeps one",
        ),
        (
            dict(switching=switching.Periodic(2)),
            "cannot be combined with `switching`",
        ),
    ],
    ids=[
        "negative_sigma",
        "string_sigma",
        "nan_sigma",
        "decay_one",
        "negative_decay",
        "boolean_decay",
        "micro_batches",
        "switching",
    ],
)
def test_bad_options_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        friendly_model(**kwargs)


def test_friendly_options_without_friendly_perturbation_are_refused():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`friendly_sigma` acts with `perturbation='friendly'` (F-SAM) "
            "only. Received: friendly_sigma=0.5, perturbation='gradient'"
        ),
    ):
        keras_sam.SAMModel(
            softmax_regression(*softmax_data()[2:]), friendly_sigma=0.5
        )


def test_a_bad_perturbation_lists_friendly():
    with pytest.raises(ValueError, match="or 'friendly' \\(F-SAM\\)"):
        keras_sam.SAMModel(
            softmax_regression(*softmax_data()[2:]), perturbation="fsam"
        )


def test_its_average_is_of_the_gradient_without_the_loss_scale():
    # The loss-scale optimizer's gradients are its scale (2**15) times the
    # loss's; the average, kept over steps between which that scale moves,
    # must hold the loss's own, as in float32.
    with dtype_policy("mixed_float16"):
        model = friendly_model()
        fit(model, jit_compile=False)
    assert float(model.optimizer.scale_loss(1.0)) == 2.0**15
    want_w, want_b, _, average = oracle_weights()
    for got, want in zip(model._friendly_averages, average):
        # float16 passes: 1e-4 from the float64 oracle; scaled: 4e3.
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-3)
    for got, want in zip(model.base.get_weights(), (want_w, want_b)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
