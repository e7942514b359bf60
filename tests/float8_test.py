"""SAM on a model quantized for float8 training (`model.quantize("float8")`).

Keras' float8 layers keep their scaling state (scales, amax histories) in
trainable variables flagged `overwrite_with_gradient`: each pass returns the
state's new values as their "gradients" and the optimizer assigns them. The
references are plain Keras `fit` steps: the state of a SAM step is the
clean pass's, as a plain step at w leaves it, and the SAM update is a plain
step from w + ε, with ε over the weights alone, moved back by ε.
"""

import keras
import numpy as np
import pytest

import keras_sam

RHO = 0.05
ROWS = 32


def quantized_model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.quantize("float8")
    return model


def data():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(ROWS, 6)).astype("float32")
    return x, rng.integers(0, 3, ROWS)


def compile_sgd(model, momentum=0.0):
    # learning_rate=1: a plain step w - g gives g back without scaling.
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def plain_step(x, y, weights_shift=None):
    """A plain one-batch `fit` step; `weights_shift` is added first to the
    weights (the variables not flagged)."""
    model = compile_sgd(quantized_model())
    if weights_shift is not None:
        for v, shift in zip(model.trainable_variables, weights_shift):
            v.assign(v.numpy() + shift)
    initial = [v.numpy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return model, initial


def assigned_flags(model):
    return [v.overwrite_with_gradient for v in model.trainable_variables]


def sam_fit(x, y, momentum=0.0, **options):
    model = compile_sgd(
        keras_sam.SAMModel(quantized_model(), **options), momentum
    )
    history = model.fit(
        x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0
    )
    return model, history.history


def plain_gradients(x, y):
    """A plain step's model, its gradients (float64) and their norm over
    the variables not flagged."""
    plain, w0 = plain_step(x, y)
    gradients = [
        (w - v.numpy()).astype("float64")
        for w, v in zip(w0, plain.trainable_variables)
    ]
    norm = np.sqrt(
        sum(
            np.sum(g**2)
            for g, flag in zip(gradients, assigned_flags(plain))
            if not flag
        )
    )
    return plain, gradients, norm


def test_the_model_has_flagged_scaling_state():
    flags = assigned_flags(quantized_model())
    assert sum(flags) == 12 and len(flags) == 16


def test_sam_steps_along_the_weights_gradient_and_keeps_the_clean_state():
    x, y = data()
    plain, gradients, norm = plain_gradients(x, y)
    flags = assigned_flags(plain)
    epsilon = [
        np.zeros_like(g) if f else RHO * g / norm
        for g, f in zip(gradients, flags)
    ]
    at_epsilon, _ = plain_step(x, y, [e.astype("float32") for e in epsilon])
    expected = [
        v.numpy() - e for v, e in zip(at_epsilon.trainable_variables, epsilon)
    ]

    model, logs = sam_fit(x, y, rho=RHO)

    # The logged ‖g‖ is the weights' alone; it had counted the scaling
    # state, several times larger, which shrank ε as much.
    np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)
    for v, p, e, flag in zip(
        model.base.trainable_variables,
        plain.trainable_variables,
        expected,
        flags,
    ):
        if flag:
            np.testing.assert_array_equal(v.numpy(), p.numpy(), v.path)
        else:
            np.testing.assert_allclose(v.numpy(), e, atol=2e-6, err_msg=v.path)
            assert np.max(np.abs(v.numpy() - p.numpy())) > 1e-4, v.path


@pytest.mark.parametrize("micro_batches", [2])
def test_micro_batches_keep_the_largest_state_of_their_clean_passes(
    micro_batches,
):
    x, y = data()
    halves = [
        plain_step(x[part], y[part])[0]
        for part in np.array_split(np.arange(ROWS), micro_batches)
    ]
    model, _ = sam_fit(x, y, rho=RHO, micro_batches=micro_batches)
    for i, flag in enumerate(assigned_flags(model.base)):
        if flag:
            expected = np.maximum(
                *[h.trainable_variables[i].numpy() for h in halves]
            )
            np.testing.assert_allclose(
                model.base.trainable_variables[i].numpy(),
                expected,
                rtol=1e-6,
                err_msg=model.base.trainable_variables[i].path,
            )


def test_rho_zero_is_bitwise_a_plain_fit():
    x, y = data()
    plain, _ = plain_step(x, y)
    model, _ = sam_fit(x, y, rho=0.0)
    for v, p in zip(model.base.variables, plain.variables):
        np.testing.assert_array_equal(v.numpy(), p.numpy(), v.path)


@pytest.mark.parametrize(
    "options",
    [
        dict(adaptive=True),
        dict(gsam_alpha=0.1),
        dict(looksam_alpha=0.5, switching=keras_sam.switching.Periodic(2)),
        dict(perturbation="friendly"),
        dict(perturbed_variables=[".*kernel"]),
        # Its one pass is at w on the first step (the momentum is zero).
        dict(perturbation="momentum", momentum=0.9),
    ],
    ids=lambda options: next(iter(options)),
)
def test_every_variant_leaves_the_scaling_state_out(options):
    x, y = data()
    plain, _, norm = plain_gradients(x, y)
    model, logs = sam_fit(x, y, rho=RHO, **options)
    if options.get("perturbation") != "momentum":  # logs no ‖g‖
        np.testing.assert_allclose(logs["grad_norm"][0], norm, rtol=1e-5)
    for v, p, flag in zip(
        model.base.trainable_variables,
        plain.trainable_variables,
        assigned_flags(plain),
    ):
        if flag:
            np.testing.assert_array_equal(v.numpy(), p.numpy(), v.path)


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution runs on the JAX backend",
)
def test_data_parallel_keeps_the_largest_state_of_the_shards():
    # Each device's shard is a half of the batch (conftest.py makes two
    # CPU devices); the shards' steps run vmapped (`map_shards`).
    x, y = data()
    halves = [
        plain_step(x[part], y[part])[0] for part in np.split(np.arange(ROWS), 2)
    ]
    previous = keras.distribution.distribution()
    devices = keras.distribution.list_devices("cpu")[:2]
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    try:
        model, _ = sam_fit(x, y, rho=RHO)
    finally:
        keras.distribution.set_distribution(previous)
    for i, flag in enumerate(assigned_flags(model.base)):
        if flag:
            np.testing.assert_allclose(
                model.base.trainable_variables[i].numpy(),
                np.maximum(*[h.trainable_variables[i].numpy() for h in halves]),
                rtol=1e-6,
                err_msg=model.base.trainable_variables[i].path,
            )


def test_the_analysis_measures_the_weights_not_the_scaling_state():
    # In training mode the scaling state's "gradients" had entered the
    # Hessian (Lanczos failed to converge) and m-sharpness's ε (the two
    # modes disagreed). The forward pass at fixed state is the same in both
    # modes, so both measure the same landscape.
    import tensorflow as tf

    from keras_sam import analysis

    x, y = data()
    model = quantized_model()
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    state = [v.numpy() for v in model.trainable_variables]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    eigenvalues, sharpness = [], []
    for training in (False, True):
        eigenvalues.append(
            analysis.hessian_top_eigenvalues(
                model, batches, loss, training=training
            )
        )
        sharpness.append(
            analysis.m_sharpness(model, batches, loss, RHO, 16, training)
        )
    np.testing.assert_allclose(eigenvalues[1], eigenvalues[0], rtol=1e-5)
    np.testing.assert_allclose(sharpness[1], sharpness[0], rtol=1e-5)
    assert eigenvalues[0][0] > 0 and sharpness[0] > 0
    for v, before in zip(model.trainable_variables, state):
        np.testing.assert_array_equal(v.numpy(), before)
