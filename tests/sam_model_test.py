"""SAMModel.fit against a hand-derived NumPy oracle and against plain fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_sam
from tests import backends
from tests import oracle

N, D, C = 24, 5, 3
BATCH = 8
RHO = 0.5
LR, MOMENTUM = 0.2, 0.9

MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(jit_compile=False),
    "jit": dict(jit_compile=True),
}


def softmax_data(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(N, D).astype("float32")
    y = rng.randint(0, C, N).astype("int32")
    w = (0.5 * rng.randn(D, C)).astype("float32")
    b = (0.1 * rng.randn(C)).astype("float32")
    return x, y, w, b


def softmax_regression(w, b, l2=0.0):
    regularizer = keras.regularizers.L2(l2) if l2 else None
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(C, kernel_regularizer=regularizer),
        ]
    )
    model.set_weights([w, b])
    return model


def sgd():
    return keras.optimizers.SGD(LR, momentum=MOMENTUM)


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def batches(x, y, sample_weight=None):
    out = []
    for i in range(0, N, BATCH):
        s = slice(i, i + BATCH)
        sw = None if sample_weight is None else sample_weight[s]
        out.append((x[s], y[s], sw))
    return out


def assert_one_epoch_matches_the_oracle(weights, parts=1, loss=None):
    """`weights` (W, b) after one epoch of SGD with momentum on SAM
    gradients, each batch cut into `parts` with their own ε, match the
    NumPy oracle; so does the epoch's mean `loss`, if given."""
    x, y, w0, b0 = softmax_data()
    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0,
        b0,
        batches(x, y),
        RHO,
        LR,
        MOMENTUM,
        gradient_fn=oracle.split_sam_gradient,
        parts=parts,
    )
    np.testing.assert_allclose(weights[0], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights[1], want_b, rtol=1e-5, atol=1e-6)
    if loss is not None:
        np.testing.assert_allclose(loss, np.mean(want_losses), rtol=1e-5)
    if parts > 1:
        full_w, _, _ = oracle.train_sgd_momentum(
            w0, b0, batches(x, y), RHO, LR, MOMENTUM
        )
        assert np.abs(full_w - want_w).max() > 1e-4


VARIANTS = {
    "sam": dict(kwargs={}, l2=0.0, weighted=False),
    "asam": dict(kwargs=dict(adaptive=True, eta=0.05), l2=0.0, weighted=False),
    "asam_all": dict(
        kwargs=dict(adaptive=True, eta=0.05, adaptive_variables="all"),
        l2=0.0,
        weighted=False,
    ),
    # davda54/sam's ASAM, and the ASAM authors' CIFAR example (η = 0 was
    # refused).
    "asam_all_eta_0": dict(
        kwargs=dict(adaptive=True, eta=0.0, adaptive_variables="all"),
        l2=0.0,
        weighted=False,
    ),
    "sam_weighted_l2": dict(kwargs={}, l2=0.01, weighted=True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fit_matches_numpy_oracle_over_momentum_steps(mode, variant):
    spec = VARIANTS[variant]
    x, y, w0, b0 = softmax_data()
    sw = (
        np.random.RandomState(1).uniform(0.2, 2.0, N)
        if spec["weighted"]
        else None
    )
    kwargs = spec["kwargs"]
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0, spec["l2"]), rho=RHO, **kwargs
    )
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    history = model.fit(
        x, y, sample_weight=sw, batch_size=BATCH, shuffle=False, verbose=0
    )

    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0, b0, batches(x, y, sw), RHO, LR, MOMENTUM, l2=spec["l2"], **kwargs
    )
    got_w, got_b = model.base.get_weights()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
    # The logged loss is the clean loss at w, averaged over the epoch.
    np.testing.assert_allclose(
        history.history["loss"][0], np.mean(want_losses), rtol=1e-5
    )
    # The oracle is sensitive to ε: plain SGD would land elsewhere.
    sgd_w, _, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y, sw), 0.0, LR, MOMENTUM, l2=spec["l2"]
    )
    assert np.abs(sgd_w - want_w).max() > 1e-2


@backends.tensorflow_only
def test_sam_gradients_matches_oracle_in_a_custom_loop():
    x, y, w0, b0 = softmax_data()
    model = softmax_regression(w0, b0, l2=0.01)
    optimizer = sgd()

    @tf.function
    def step(x, y):
        loss, grads = keras_sam.sam_gradients(
            model, x, y, xent(), rho=RHO, optimizer=optimizer
        )
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses = [float(step(bx, by)) for bx, by, _ in batches(x, y)]
    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), RHO, LR, MOMENTUM, l2=0.01
    )
    np.testing.assert_allclose(model.get_weights()[0], want_w, rtol=1e-5)
    np.testing.assert_allclose(model.get_weights()[1], want_b, rtol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_micro_batches_average_the_sam_gradients_of_each_part(micro_batches):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0), rho=RHO, micro_batches=micro_batches
    )
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    want_w, want_b, _ = oracle.train_sgd_momentum(
        w0,
        b0,
        batches(x, y),
        RHO,
        LR,
        MOMENTUM,
        gradient_fn=oracle.split_sam_gradient,
        parts=micro_batches,
    )
    np.testing.assert_allclose(model.base.get_weights()[0], want_w, rtol=1e-5)
    np.testing.assert_allclose(model.base.get_weights()[1], want_b, rtol=1e-5)


def bn_dropout_model(seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.4),
            keras.layers.Dense(C),
        ]
    )


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_rho_zero_is_bitwise_plain_fit_with_dropout_and_batchnorm(
    mode, micro_batches
):
    # With ρ = 0 there is no ε to give each micro-batch: the step is the
    # base step on the whole batch, BatchNorm normalizing over all of it.
    x, y, _, _ = softmax_data()
    trained = []
    for wrap in (
        lambda m: m,
        lambda m: keras_sam.SAMModel(m, rho=0.0, micro_batches=micro_batches),
    ):
        model = wrap(bn_dropout_model())
        model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        trained.append([v.numpy() for v in model.variables])
    assert len(trained[0]) == len(trained[1])
    for plain, sam in zip(*trained):
        backends.assert_matches_plain_fit(sam, plain, mode)


def test_batchnorm_moving_stats_update_once_from_the_clean_pass():
    x, y, _, _ = softmax_data()
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(4, use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.Dense(C),
        ]
    )
    hidden = x @ base.layers[0].kernel.numpy()
    model = keras_sam.SAMModel(base, rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=N, epochs=1, shuffle=False, verbose=0)
    bn = base.layers[1]
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), 0.1 * hidden.mean(axis=0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        bn.moving_variance.numpy(),
        0.9 + 0.1 * hidden.var(axis=0),
        rtol=1e-5,
    )


def test_both_passes_use_batch_statistics_and_match_an_assign_reference():
    x, y, _, _ = softmax_data()
    model = bn_dropout_model(seed=5)
    model.layers[2].rate = 0.0
    reference = bn_dropout_model(seed=5)
    reference.layers[2].rate = 0.0
    # Make moving stats differ from batch stats, so training=False would show.
    for m in (model, reference):
        m.layers[1].moving_mean.assign(np.full(16, 3.0, "float32"))

    _, got = keras_sam.sam_gradients(model, x, y, xent(), rho=RHO)

    def loss(y_pred):
        return xent()(y, y_pred)

    grads = backends.gradients(reference, loss, x)
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    for v, g in zip(reference.trainable_variables, grads):
        v.assign(v.numpy() + RHO * g / (norm + 1e-12))
    want = backends.gradients(reference, loss, x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(g), w, rtol=1e-4, atol=1e-6
        )


class UnseededNoise(keras.layers.Layer):
    """Noise from `keras.random.normal` with `seed=None`, as ported code
    draws it: from Keras' global SeedGenerator."""

    def call(self, x, training=False):
        return x + keras.random.normal(ops.shape(x)) if training else x


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="JAX refuses unseeded draws"
)
@pytest.mark.parametrize(
    "mode",
    ["eager", "graph"] + (["jit"] if backends.BACKEND == "tensorflow" else []),
)
@pytest.mark.parametrize("rho", [0.0, 5.0])
def test_unseeded_random_ops_draw_as_in_plain_fit(rho, mode):
    # The loss is linear in the head W, so its gradient zᵀy / n needs only
    # the noisy inputs z: SAM at any ρ trains as plain `fit` exactly when
    # both passes draw the same noise and the global generator advances
    # step by step as in `fit`. It had stayed put: the same noise every
    # step.
    rng = np.random.RandomState(0)
    x = rng.rand(16, D).astype("float32")
    y = rng.randn(16, 2).astype("float32")

    def trained(wrap):
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [
                keras.Input((D,)),
                UnseededNoise(),
                keras.layers.Dense(2, use_bias=False),
            ]
        )
        model = wrap(base)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=lambda y, y_pred: ops.mean(ops.sum(y * y_pred, axis=-1)),
            **MODES[mode],
        )
        keras.utils.set_random_seed(1)
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
        return base.get_weights()[0]

    plain = trained(lambda base: base)
    sam = trained(lambda base: keras_sam.SAMModel(base, rho=rho))
    np.testing.assert_array_equal(sam, plain)


@pytest.mark.parametrize("rho", [0.0, 5.0])
def test_random_brightness_trains_as_in_plain_fit(rho):
    # On PyTorch (where this can fail) `RandomBrightness` adds its delta
    # to its input in place; the perturbed pass had seen the clean pass's
    # brightened images. The head's gradient needs only its inputs (the
    # loss is linear in it).
    rng = np.random.RandomState(0)
    x = (0.5 * rng.rand(8, 4, 4, 1)).astype("float32")
    y = rng.randn(8, 2).astype("float32")

    def trained(wrap):
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [
                keras.Input((4, 4, 1)),
                keras.layers.RandomBrightness(0.3, value_range=(0, 1), seed=3),
                keras.layers.Flatten(),
                keras.layers.Dense(2, use_bias=False),
            ]
        )
        model = wrap(base)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=lambda y, y_pred: ops.mean(ops.sum(y * y_pred, axis=-1)),
            run_eagerly=True,
        )
        model.fit(x.copy(), y, batch_size=4, shuffle=False, verbose=0)
        return base.get_weights()[0]

    plain = trained(lambda base: base)
    sam = trained(lambda base: keras_sam.SAMModel(base, rho=rho))
    np.testing.assert_allclose(sam, plain, rtol=0, atol=1e-6)


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, i):
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[rows], self.y[rows]


def test_rho_zero_shuffles_a_py_dataset_as_plain_fit():
    # Keras shuffles a PyDataset's batches with Python's `random`, which
    # making Keras' global seed generator draws from: the step makes it
    # and must leave Python's stream as it was.
    x, y, w0, b0 = softmax_data()

    def trained(wrap):
        base = softmax_regression(w0, b0)
        model = wrap(base)
        model.compile(optimizer=sgd(), loss=xent())
        keras.utils.set_random_seed(0)
        model.fit(_Batches(x, y, 4), epochs=2, verbose=0)
        return base.get_weights()

    plain = trained(lambda base: base)
    sam = trained(lambda base: keras_sam.SAMModel(base, rho=0.0))
    for got, want in zip(sam, plain):
        np.testing.assert_array_equal(got, want)


def test_both_passes_draw_the_same_dropout_masks():
    # y_pred = dropout(x) W with an invertible W gives the clean pass's
    # dropped inputs z = y_pred W⁻¹. The loss Σ y⊙y_pred / n is linear in
    # W, so the gradient at W + ε is that of the clean mask, zᵀy / n; with
    # another mask in the perturbed pass it would differ.
    rng = np.random.RandomState(0)
    x = rng.randn(64, D).astype("float32")
    y = rng.randn(64, D).astype("float32")
    kernel = (np.eye(D) + 0.1 * rng.randn(D, D)).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dropout(0.5),  # unseeded, as users write it
            keras.layers.Dense(D, use_bias=False),
        ]
    )
    model.set_weights([kernel])

    def linear_loss(y_true, y_pred):
        return ops.mean(ops.sum(ops.multiply(y_true, y_pred), axis=-1))

    result = keras_sam.sam_step.compute_sam_gradients(
        model,
        lambda x, y, y_pred, sample_weight: linear_loss(y, y_pred),
        x,
        y,
        rho=RHO,
    )
    z = keras.ops.convert_to_numpy(result.y_pred) @ np.linalg.inv(kernel)
    dropped = np.abs(z) < 1e-4
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(z[~dropped], 2 * x[~dropped], rtol=1e-3)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(result.gradients[0]),
        z.T @ y / len(x),
        rtol=1e-3,
        atol=1e-4,
    )


def test_perturbed_pass_writes_no_variable():
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(bn_dropout_model(), rho=5.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=xent())
    model.build((None, D))
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    for b, a in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b)


def test_zero_gradient_gives_zero_perturbation_and_finite_weights():
    base = keras.Sequential(
        [keras.Input((D,)), keras.layers.Dense(1, kernel_initializer="zeros")]
    )
    model = keras_sam.SAMModel(base, rho=RHO)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.ones((8, D), "float32")
    history = model.fit(x, np.zeros((8, 1)), epochs=2, verbose=0)
    assert history.history["loss"] == [0.0, 0.0]
    for w in base.get_weights():
        np.testing.assert_array_equal(w, np.zeros_like(w))


def test_jit_compile_auto_resolves_as_keras_does():
    plain = softmax_regression(*softmax_data()[2:])
    plain.compile(optimizer="sgd", loss=xent(), jit_compile="auto")
    model = keras_sam.SAMModel(softmax_regression(*softmax_data()[2:]))
    model.compile(optimizer="sgd", loss=xent(), jit_compile="auto")
    assert model.jit_compile == plain.jit_compile
    if backends.BACKEND == "tensorflow":
        assert model.jit_compile is False  # Keras' rule on a CPU-only machine.


def test_evaluate_and_predict_are_the_base_models():
    x, y, w0, b0 = softmax_data()
    base = softmax_regression(w0, b0)
    base.compile(loss=xent(), metrics=["accuracy"])
    model = keras_sam.SAMModel(softmax_regression(w0, b0))
    model.compile(optimizer="sgd", loss=xent(), metrics=["accuracy"])
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), base.predict(x, verbose=0)
    )
    assert model.evaluate(x, y, verbose=0) == base.evaluate(x, y, verbose=0)
    assert model.base is not base and isinstance(model.base, keras.Model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=-0.1), "`rho` must be >= 0. Received: rho=-0.1"),
        (dict(rho="big"), "Received: rho='big'"),
        (dict(eta=-0.01), "`eta` must be >= 0. Received: eta=-0.01"),
        (dict(micro_batches=0), "Received: micro_batches=0"),
        (
            dict(micro_batches=2, sync_perturbations=True),
            "Received: micro_batches=2",
        ),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(kwargs, message):
    base = softmax_regression(*softmax_data()[2:])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        keras_sam.SAMModel(base, **kwargs)


def test_base_that_is_not_a_keras_model_is_rejected():
    with pytest.raises(ValueError, match="`base` must be a Keras model.*Dense"):
        keras_sam.SAMModel(keras.layers.Dense(3))
