"""What one SAMModel step computes in the cases that are easy to get wrong:
partial batches with micro-batches, a base with its own `compute_loss`,
ASAM's normalized variables, switching with micro-batches, ρ = 0, and the
logged sharpness and gradient norm. Every number comes from tests/oracle.py.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_sam
from keras_sam import switching
from tests import backends
from tests import oracle
from tests.distribute_test import mirrored
from tests.mixed_precision_test import dtype_policy
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MODES
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import D
from tests.sam_model_test import N
from tests.sam_model_test import bn_dropout_model
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent


def batches_of(size, x, y, sample_weight=None):
    return [
        (
            x[i : i + size],
            y[i : i + size],
            None if sample_weight is None else sample_weight[i : i + size],
        )
        for i in range(0, len(x), size)
    ]


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# -- 1. micro-batches that do not divide the batch ---------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight"])
def test_micro_batches_refuse_a_loss_the_parts_mean_would_change(reduction):
    # Parts are weighted by their share of the examples: the whole batch's
    # loss for a mean over examples, not for a sum (half the step with two
    # parts) or a mean weighted by sample weights.
    x, y, w0, b0 = softmax_data()
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction
    )

    weights = np.linspace(0.5, 1.5, len(y))

    def fit(loss, micro_batches, rho=RHO):
        model = keras_sam.SAMModel(
            softmax_regression(w0, b0), rho=rho, micro_batches=micro_batches
        )
        model.compile(optimizer=sgd(), loss=loss)
        model.fit(x, y, sample_weight=weights, batch_size=BATCH, verbose=0)

    with pytest.raises(ValueError, match=f"'{reduction}'.*micro_batches=2 "):
        fit([loss], micro_batches=2)
    with pytest.raises(ValueError, match=f"'{reduction}'.*micro_batches=2 "):
        keras_sam.sam_gradients(
            softmax_regression(w0, b0), x, y, loss, weights, micro_batches=2
        )
    fit(loss, micro_batches=1)
    fit(loss, micro_batches=2, rho=0.0)  # the base step: the whole batch
    fit(xent(), micro_batches=2)


@pytest.mark.parametrize("mode", MODES)
def test_unequal_micro_batches_match_the_array_split_oracle(mode):
    # Batches of 11, 11 and 2 examples cut in 3: (4, 4, 3) twice, then
    # (1, 1, 0), whose empty part must count for nothing.
    x, y, w0, b0 = softmax_data()
    sw = np.random.RandomState(1).uniform(0.2, 2.0, N).astype("float32")
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0), rho=RHO, micro_batches=3
    )
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    history = model.fit(
        x, y, sample_weight=sw, batch_size=11, shuffle=False, verbose=0
    )
    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0,
        b0,
        batches_of(11, x, y, sw),
        RHO,
        LR,
        MOMENTUM,
        gradient_fn=oracle.array_split_sam_gradient,
        parts=3,
    )
    assert_close(model.base.get_weights(), [want_w, want_b])
    # Keras averages the logged loss over examples: 11, 11 and 2.
    np.testing.assert_allclose(
        history.history["loss"][0],
        np.average(want_losses, weights=[11, 11, 2]),
        rtol=1e-5,
    )
    # Dropping the remainder (the old XLA behaviour) lands elsewhere.
    dropped = [
        (bx[: len(bx) // 3 * 3], by[: len(bx) // 3 * 3], bs[: len(bx) // 3 * 3])
        for bx, by, bs in batches_of(11, x, y, sw)
    ]
    drop_w, _, _ = oracle.train_sgd_momentum(
        w0,
        b0,
        dropped,
        RHO,
        LR,
        MOMENTUM,
        gradient_fn=oracle.split_sam_gradient,
        parts=3,
    )
    assert np.abs(drop_w - want_w).max() > 1e-3


# -- 2. a base model with its own objective ----------------------------------


class PenalizedObjective(keras.Sequential):
    """Twice the compiled loss plus 0.1 · mean(logits²)."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x, y, y_pred, sample_weight, training=training
        )
        return 2.0 * loss + 0.1 * ops.mean(ops.square(y_pred))


def penalized_model(w, b):
    model = PenalizedObjective([keras.Input((D,)), keras.layers.Dense(3)])
    model.set_weights([w, b])
    return model


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_a_base_compute_loss_is_the_objective_of_both_passes(mode):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(penalized_model(w0, b0), rho=RHO)
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    history = model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)

    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0,
        b0,
        batches_of(BATCH, x, y),
        RHO,
        LR,
        MOMENTUM,
        loss_and_grad=oracle.penalized_loss_and_grad,
    )
    assert_close(model.base.get_weights(), [want_w, want_b])
    np.testing.assert_allclose(
        history.history["loss"][0], np.mean(want_losses), rtol=1e-5
    )
    evaluated = model.evaluate(x, y, batch_size=N, verbose=0)
    want_loss, _ = oracle.penalized_loss_and_grad(want_w, want_b, x, y)
    np.testing.assert_allclose(evaluated, want_loss, rtol=1e-5)


def test_a_base_compute_loss_at_rho_zero_is_the_base_fit():
    x, y, w0, b0 = softmax_data()
    plain = penalized_model(w0, b0)
    plain.compile(optimizer=sgd(), loss=xent())
    plain_history = plain.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    model = keras_sam.SAMModel(penalized_model(w0, b0), rho=0.0)
    model.compile(optimizer=sgd(), loss=xent())
    history = model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        history.history["loss"], plain_history.history["loss"], rtol=1e-6
    )
    assert_close(model.base.get_weights(), plain.get_weights())
    # The base's own compiled loss stays its own.
    assert plain._compile_loss is not None
    assert model.base._compile_loss is None


# -- 3. ASAM's normalized variables ------------------------------------------


def test_asam_conventions_differ_measurably_on_a_model_with_biases():
    x, y, w0, b0 = softmax_data()
    trained = {}
    for scope in ("weights", "all"):
        model = keras_sam.SAMModel(
            softmax_regression(w0, b0),
            rho=1.0,
            adaptive=True,
            adaptive_variables=scope,
        )
        model.compile(optimizer=sgd(), loss=xent())
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        trained[scope] = model.base.get_weights()
        want = oracle.train_sgd_momentum(
            w0,
            b0,
            batches_of(BATCH, x, y) * 2,
            1.0,
            LR,
            MOMENTUM,
            adaptive=True,
            adaptive_variables=scope,
        )[:2]
        assert_close(trained[scope], want)
    difference = np.abs(trained["weights"][1] - trained["all"][1]).max()
    assert difference > 1e-3


def test_asam_weights_are_kernels_and_scales_not_biases_or_offsets():
    model = keras_sam.SAMModel(bn_dropout_model(), adaptive=True)
    variables = model.trainable_variables
    mask = keras_sam.selection.adaptive_variables_mask(variables, "weights")
    names = [v.name for v in variables]
    assert names == ["kernel", "bias", "gamma", "beta", "kernel", "bias"]
    assert mask == [True, False, True, False, True, False]
    assert keras_sam.selection.adaptive_variables_mask(variables, "all") is None


def test_asam_perturbation_applies_t_only_where_the_mask_says():
    rng = np.random.RandomState(3)
    grads = [rng.randn(3, 2), rng.randn(2)]
    weights = [rng.randn(3, 2), rng.randn(2)]
    got = keras_sam.asam_perturbation(
        [ops.convert_to_tensor(g, "float32") for g in grads],
        [ops.convert_to_tensor(w, "float32") for w in weights],
        rho=0.5,
        eta=0.1,
        adaptive_mask=[True, False],
    )
    t = [np.abs(weights[0]) + 0.1, np.ones(2)]
    norm = np.sqrt(sum(np.sum((ti * g) ** 2) for ti, g in zip(t, grads)))
    for out, ti, g in zip(got, t, grads):
        np.testing.assert_allclose(out, 0.5 * ti**2 * g / norm, rtol=1e-5)


def test_bad_adaptive_variables_name_the_argument_and_value():
    with pytest.raises(ValueError, match="adaptive_variables='bias'"):
        keras_sam.SAMModel(
            softmax_regression(*softmax_data()[2:]),
            adaptive=True,
            adaptive_variables="bias",
        )


def test_adaptive_variables_round_trip_through_get_config():
    model = keras_sam.SAMModel(
        softmax_regression(*softmax_data()[2:]),
        adaptive=True,
        adaptive_variables="all",
    )
    clone = keras_sam.SAMModel.from_config(model.get_config())
    assert clone.adaptive_variables == "all"


# -- 6. switching asks once per step -----------------------------------------


def test_switching_with_micro_batches_decides_once_per_step():
    decay, c = 0.5, 0.0
    x, y, w0, b0 = softmax_data()
    policy = switching.GradientNormOutlier(decay=decay, c_start=c)
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0), rho=RHO, micro_batches=2, switching=policy
    )
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    is_sam = oracle.gradient_norm_outlier(decay, c, c, 1)
    norms, decisions = [], []

    def gradient(w, b, x, y, rho, sample_weight=None):
        loss, clean = oracle.softmax_regression_loss_and_grad(w, b, x, y)
        norms.append(sum(np.sum(g**2) for g in clean))
        decisions.append(is_sam(len(decisions), norms[-1]))
        if decisions[-1]:
            return oracle.split_sam_gradient(w, b, x, y, rho, parts=2)
        return loss, list(clean)

    want = oracle.train_sgd_momentum(
        w0, b0, batches_of(BATCH, x, y) * 2, RHO, LR, MOMENTUM, gradient
    )[:2]
    assert 0 < sum(decisions) < len(decisions)
    assert_close(model.base.get_weights(), want)
    mean, variance = norms[0], 0.0
    for n in norms[1:]:
        mean = decay * mean + (1 - decay) * n
        variance = decay * variance + (1 - decay) * (n - mean) ** 2
    np.testing.assert_allclose(policy.mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(policy.variance.numpy(), variance, rtol=1e-4)


# -- 10. ρ = 0 costs one pass -------------------------------------------------


class CallCounter:
    """Counts executed (not traced) calls: a `tf.Variable` incremented by
    the graph on TensorFlow, a host callback on JAX, a Python counter on
    PyTorch."""

    def __init__(self):
        if backends.BACKEND == "tensorflow":
            self.variable = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.calls = 0

    def increment(self):
        if backends.BACKEND == "tensorflow":
            self.variable.assign_add(1)
        elif backends.BACKEND == "jax":
            import jax

            jax.debug.callback(self._add_one)
        else:  # PyTorch runs the step eagerly.
            self._add_one()

    def _add_one(self):
        self.calls += 1

    def reset(self):
        self.calls = 0
        if backends.BACKEND == "tensorflow":
            self.variable.assign(0)

    def count(self):
        if backends.BACKEND == "tensorflow":
            return int(self.variable.numpy())
        return self.calls


CALLS = CallCounter()


class CountingDense(keras.layers.Dense):
    """A Dense layer that counts its executed calls in `CALLS`."""

    def call(self, inputs):
        CALLS.increment()
        return super().call(inputs)


def counting_model(w, b):
    model = keras.Sequential([keras.Input((D,)), CountingDense(3)])
    model.set_weights([w, b])
    return model


def alternating_rho(step):
    return ops.where(ops.equal(step % 2, 0), RHO, 0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "rho, passes",
    [(0.0, [1, 1, 1]), (RHO, [2, 2, 2]), (alternating_rho, [2, 1, 2])],
    ids=["zero", "positive", "schedule_reaching_zero"],
)
def test_rho_zero_runs_no_perturbed_pass(mode, rho, passes):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(counting_model(w0, b0), rho=rho)
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    model.fit(
        x,
        y,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        # After Keras' build, which calls the model once on PyTorch.
        callbacks=[
            keras.callbacks.LambdaCallback(
                on_train_begin=lambda logs: CALLS.reset()
            )
        ],
    )
    assert CALLS.count() == sum(passes)
    rhos = iter([float(rho(t)) if callable(rho) else rho for t in range(3)])

    def gradient(w, b, x, y, rho, sample_weight=None):
        return oracle.sam_gradient(w, b, x, y, next(rhos))

    want = oracle.train_sgd_momentum(
        w0, b0, batches_of(BATCH, x, y), None, LR, MOMENTUM, gradient
    )[:2]
    assert_close(model.base.get_weights(), want)


# -- 12. sharpness and gradient norm as metrics -------------------------------


def sharpness_and_norm(w, b, x, y, rho, parts=1):
    """Per-part L(w + ε) − L(w) and ‖g‖, averaged over equal parts."""
    sharpness, norms = [], []
    for xi, yi in zip(np.split(x, parts), np.split(y, parts)):
        loss, grads = oracle.softmax_regression_loss_and_grad(w, b, xi, yi)
        ew, eb = oracle.perturbation(grads, [w, b], rho)
        perturbed, _ = oracle.softmax_regression_loss_and_grad(
            w + ew, b + eb, xi, yi
        )
        sharpness.append(perturbed - loss)
        norms.append(np.sqrt(sum(np.sum(g**2) for g in grads)))
    return np.mean(sharpness), np.mean(norms)


def oracle_metrics(parts=1, is_sam=lambda t: True):
    """The epoch's mean sharpness (over SAM steps) and mean ‖g‖."""
    x, y, w0, b0 = softmax_data()
    sharpness, norms = [], []

    def gradient(w, b, x, y, rho, sample_weight=None):
        step = len(norms)
        s, g = sharpness_and_norm(w, b, x, y, rho, parts)
        if not is_sam(step):
            # A step without SAM has one clean pass, on the whole batch.
            norms.append(sharpness_and_norm(w, b, x, y, rho)[1])
            return oracle.softmax_regression_loss_and_grad(w, b, x, y)
        norms.append(g)
        sharpness.append(s)
        return oracle.split_sam_gradient(w, b, x, y, rho, parts=parts)

    oracle.train_sgd_momentum(
        w0, b0, batches_of(BATCH, x, y), RHO, LR, MOMENTUM, gradient
    )
    return np.mean(sharpness), np.mean(norms)


def fit_and_log(mode="graph", strategy=None, **sam_kwargs):
    x, y, w0, b0 = softmax_data()
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras_sam.SAMModel(
            softmax_regression(w0, b0), rho=RHO, **sam_kwargs
        )
        model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    history = model.fit(dataset, verbose=0)
    return model, history.history


@pytest.mark.parametrize("mode", MODES)
def test_sharpness_and_grad_norm_are_logged_as_the_oracle_computes(mode):
    _, logs = fit_and_log(mode)
    sharpness, norm = oracle_metrics()
    assert sharpness > 1e-2
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=1e-4)
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)


def test_sharpness_and_grad_norm_are_means_over_micro_batches():
    _, logs = fit_and_log(micro_batches=2)
    sharpness, norm = oracle_metrics(parts=2)
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=1e-4)
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)


def test_a_step_without_sam_logs_the_whole_batchs_grad_norm():
    _, logs = fit_and_log(micro_batches=2, switching=switching.Periodic(2))
    sharpness, norm = oracle_metrics(parts=2, is_sam=lambda t: t % 2 == 0)
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=1e-4)
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)


@backends.tensorflow_only
def test_sharpness_and_grad_norm_are_means_over_replicas():
    _, logs = fit_and_log(strategy=mirrored())
    sharpness, norm = oracle_metrics(parts=2)
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=1e-4)
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)


@backends.tensorflow_only
def test_synced_grad_norm_is_the_global_batchs_as_on_jax():
    # Every replica takes the global batch's ε; its logged ‖g‖ is that
    # batch's too, as JAX's step computes it over the global batch.
    _, logs = fit_and_log(strategy=mirrored(), sync_perturbations=True)
    sharpness, norm = oracle_metrics()
    _, replicas_norm = oracle_metrics(parts=2)
    assert replicas_norm > norm * 1.01
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=1e-4)
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)


def test_sharpness_averages_only_the_steps_that_ran_sam():
    _, logs = fit_and_log(switching=switching.Periodic(2))
    sharpness, norm = oracle_metrics(is_sam=lambda t: t % 2 == 0)
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=1e-4)
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)
    assert logs["sam_fraction"][0] == pytest.approx(2 / 3)


def test_grad_norm_is_unscaled_under_mixed_float16():
    with dtype_policy("mixed_float16"):
        model, logs = fit_and_log()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    sharpness, norm = oracle_metrics()
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=2e-2)
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=5e-2)


def test_evaluate_does_not_log_the_training_metrics():
    model, logs = fit_and_log(switching=switching.Periodic(2))
    assert {"sharpness", "grad_norm", "sam_fraction"} <= set(logs)
    x, y, _, _ = softmax_data()
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(evaluated) == {"loss"}


@pytest.mark.parametrize("mode", ["graph", "jit"])
@pytest.mark.parametrize("n", [8, 2], ids=["parts_3_3_2", "parts_1_1_0"])
def test_unequal_micro_batches_average_batchnorm_updates_by_size(mode, n):
    x, y, _, _ = softmax_data()
    x, y = x[:n], y[:n]
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(4, use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.Dense(3),
        ]
    )
    hidden = x @ base.layers[0].kernel.numpy()
    model = keras_sam.SAMModel(base, rho=RHO, micro_batches=3)
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    model.fit(x, y, batch_size=n, shuffle=False, verbose=0)
    parts = [p for p in np.array_split(hidden, 3) if len(p)]
    shares = [len(p) / n for p in parts]
    bn = base.layers[1]
    np.testing.assert_allclose(
        bn.moving_mean.numpy(),
        0.1 * sum(s * p.mean(axis=0) for s, p in zip(shares, parts)),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        bn.moving_variance.numpy(),
        0.9 + 0.1 * sum(s * p.var(axis=0) for s, p in zip(shares, parts)),
        rtol=1e-5,
    )
    assert all(np.all(np.isfinite(w)) for w in base.get_weights())
