"""Shake-Shake and PyramidNet-ShakeDrop: sizes, shake layers, SAM training."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import backends
from tests.trainers_models_test import sum_sizes
from tests.trainers_models_test import trainable_count
from trainers import models
from trainers.models import shake

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only


def tiny_models():
    return [
        shake.shake_shake((8, 8, 3), 10, depth=8, width=4),
        shake.pyramidnet_shakedrop((8, 8, 3), 10, depth=11, alpha=6),
    ]


@pytest.mark.parametrize(
    "name, count",
    [
        # Gastaldi's 26 2x96d: 26.2M.
        ("shake_shake_26_2x96d", 26_192_922),
        # Han et al.'s PyramidNet-272 α=200 has 26.0M weights with truncated
        # widths (26_049_562); the SAM paper's code rounds them (+0.16M).
        ("pyramidnet_272_200", 26_210_842),
        ("shake_shake_26_2x32d", 2_923_162),
        ("pyramidnet_110_48", 1_153_458),
    ],
)
def test_shake_models_have_the_published_number_of_weights(name, count):
    model = models.build(name, (32, 32, 3), 10)
    assert trainable_count(model) == count
    assert model.output_shape == (None, 10)


def test_pyramidnet_halves_the_image_per_stage_and_drops_more_deeper():
    # depth 20 = 9·2 + 2: three stages of two blocks.
    model = shake.pyramidnet_shakedrop((32, 32, 3), 10, depth=20, alpha=12)
    blocks = [layer for layer in model.layers if layer.name.startswith("block")]
    sizes = [block.output.shape[1] for block in blocks]
    assert sizes == [32, 32, 16, 16, 8, 8]
    rates = [
        layer.drop_rate
        for block in blocks
        for layer in block.layers
        if isinstance(layer, shake.ShakeDrop)
    ]
    # Linear in the block's index k, to 0.5 at the last: 0.5 · k / 6.
    np.testing.assert_allclose(rates, [0.5 * k / 6 for k in range(1, 7)])


def test_shake_shake_halves_the_image_per_stage():
    # depth 14 = 6·2 + 2: three stages of two blocks.
    model = shake.shake_shake((32, 32, 3), 10, depth=14, width=4)
    sides = [32, 32, 16, 16, 8, 8]
    assert sum_sizes(model) == [(side, side) for side in sides]


def test_bad_depths_and_rates_are_rejected():
    with pytest.raises(ValueError, match="6n\\+2. Received: depth=27"):
        shake.shake_shake((32, 32, 3), 10, depth=27)
    with pytest.raises(ValueError, match="9n\\+2. Received: depth=273"):
        shake.pyramidnet_shakedrop((32, 32, 3), 10, depth=273)
    with pytest.raises(ValueError, match="Received: width=5"):
        shake.shake_shake((32, 32, 3), 10, width=5)
    with pytest.raises(ValueError, match="drop_rate=1.5"):
        shake.ShakeDrop(1.5)
    with pytest.raises(ValueError, match="alpha_range=\\(1, -1\\)"):
        shake.ShakeDrop(alpha_range=(1, -1))


def test_weight_decay_is_an_l2_loss_on_every_kernel():
    for model in (
        shake.shake_shake((8, 8, 3), 10, 8, 4, weight_decay=5e-4),
        shake.pyramidnet_shakedrop((8, 8, 3), 10, 11, 6, 5e-4),
    ):
        kernels = [v for v in model.trainable_variables if len(v.shape) > 1]
        assert len(model.losses) == len(kernels)
        expected = 5e-4 / 2 * sum(np.sum(k.numpy() ** 2) for k in kernels)
        np.testing.assert_allclose(
            float(tf.add_n(model.losses)), expected, rtol=1e-5
        )


def branches(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 2, 2, 3)).astype("float32") for _ in "ab"]


def test_inference_is_the_expectation_of_the_training_coefficients():
    a, b = branches()
    np.testing.assert_allclose(
        shake.ShakeShake()([a, b], training=False), (a + b) / 2
    )
    # E[g + α − g α] with P(g = 1) = 0.7 and E[α] = 0.25.
    layer = shake.ShakeDrop(0.3, alpha_range=(-0.5, 1.0))
    np.testing.assert_allclose(
        layer(a, training=False), a * (0.7 + 0.3 * 0.25), rtol=1e-6
    )
    samples = np.stack([layer(np.ones((64, 1)), training=True) for _ in a])
    np.testing.assert_allclose(samples.mean(), 0.775, atol=0.03)


def test_inference_of_a_model_is_deterministic():
    x = np.random.default_rng(1).random((4, 8, 8, 3), np.float32)
    for model in tiny_models():
        np.testing.assert_array_equal(
            model(x, training=False), model(x, training=False)
        )


def test_training_coefficients_depend_on_the_seed_and_vary_by_example():
    # With a = 1 and b = 0 (or x = 1) the output is the forward coefficient.
    ones, zeros = np.ones((64, 1, 1, 1), "float32"), np.zeros((64, 1, 1, 1))
    for layer, inputs in (
        (shake.ShakeShake, [ones, zeros]),
        (shake.ShakeDrop, ones),
    ):

        def draw(seed):
            return layer(seed=seed)(inputs, training=True).numpy().ravel()

        np.testing.assert_array_equal(draw(1), draw(1))
        assert not np.allclose(draw(1), draw(2))
        assert len(np.unique(draw(1))) > 16


def test_training_forward_of_a_model_changes_from_call_to_call():
    x = np.random.default_rng(2).random((4, 8, 8, 3), np.float32)
    for model in tiny_models():
        assert not np.allclose(model(x, training=True), model(x, training=True))


def forward_and_gradients(layer, inputs):
    inputs = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(inputs if len(inputs) > 1 else inputs[0], training=True)
        loss = tf.reduce_sum(outputs)
    return outputs.numpy(), [g.numpy() for g in tape.gradient(loss, inputs)]


def test_shake_shake_forward_uses_alpha_and_gradient_uses_beta():
    a, b = branches()
    outputs, (grad_a, grad_b) = forward_and_gradients(
        shake.ShakeShake(seed=5), [a, b]
    )
    # The layer draws α, then β, per example from its SeedGenerator.
    generator = keras.random.SeedGenerator(5)
    alpha = keras.random.uniform((64, 1, 1, 1), seed=generator).numpy()
    beta = keras.random.uniform((64, 1, 1, 1), seed=generator).numpy()
    np.testing.assert_allclose(
        outputs, alpha * a + (1 - alpha) * b, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(grad_a, np.broadcast_to(beta, a.shape))
    np.testing.assert_allclose(grad_b, np.broadcast_to(1 - beta, b.shape))
    assert np.abs(alpha - beta).max() > 0.5


def test_shake_drop_forward_uses_alpha_and_gradient_uses_beta():
    x, _ = branches()
    outputs, (grad,) = forward_and_gradients(shake.ShakeDrop(0.5, seed=6), [x])
    # Draws, per example: the gate's uniform, α ~ U(-1, 1), β ~ U(0, 1).
    generator = keras.random.SeedGenerator(6)
    gate = keras.random.uniform((64, 1, 1, 1), seed=generator) < 0.5
    alpha = keras.random.uniform((64, 1, 1, 1), -1, 1, seed=generator)
    beta = keras.random.uniform((64, 1, 1, 1), seed=generator)
    gate, alpha, beta = (np.asarray(v, np.float32) for v in (gate, alpha, beta))
    assert 0 < gate.sum() < 64
    np.testing.assert_allclose(
        outputs, x * np.where(gate, 1.0, alpha), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        grad, np.broadcast_to(np.where(gate, 1.0, beta), x.shape), rtol=1e-6
    )


def test_seed_states_are_model_variables_that_fix_the_coefficients():
    # keras_sam evaluates both passes of a step statelessly from the same
    # non-trainable values: they must hold every shake layer's seed.
    x = np.random.default_rng(3).random((4, 8, 8, 3), np.float32)
    for model in tiny_models():
        shakes = [
            layer
            for layer in model._flatten_layers()
            if isinstance(layer, (shake.ShakeShake, shake.ShakeDrop))
        ]
        assert shakes
        state_paths = {v.path for v in model.non_trainable_variables}
        for layer in shakes:
            assert layer.seed_generator.state.path in state_paths
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        first, _ = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        second, _ = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        np.testing.assert_array_equal(first, second)


def test_tiny_models_train_two_sam_steps():
    rng = np.random.default_rng(4)
    x = rng.random((8, 8, 8, 3), np.float32)
    y = np.arange(8) % 10
    keras.utils.set_random_seed(0)
    for base in tiny_models():
        model = keras_sam.SAMModel(base, rho=0.05)
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = [v.numpy() for v in base.trainable_variables]
        history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        after = base.trainable_variables
        assert any(not np.allclose(b, a) for b, a in zip(before, after))


def test_shake_layers_round_trip_through_get_config():
    layers = [
        shake.ShakeShake(seed=3, name="shake"),
        shake.ShakeDrop(
            0.25, alpha_range=(-0.5, 0.5), beta_range=(0.1, 0.9), seed=4
        ),
        shake.ZeroPadChannels(5),
    ]
    for layer in layers:
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(layer)
        )
        assert type(restored) is type(layer)
        assert restored.get_config() == config


def test_tiny_models_save_and_load_as_keras_files(tmp_path):
    x = np.random.default_rng(5).random((2, 8, 8, 3), np.float32)
    for index, model in enumerate(tiny_models()):
        path = tmp_path / f"model_{index}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(
            loaded(x, training=False), model(x, training=False), rtol=1e-5
        )
