"""Trainer models: published sizes and the paper's weight decay."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import backends
from trainers import models
from trainers.models import residual

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def sum_sizes(model):
    """(height, width) of each residual sum's feature map, in order."""
    return [
        tuple(layer.output.shape[1:3])
        for layer in model.layers
        if isinstance(layer, keras.layers.Add)
    ]


@pytest.mark.parametrize(
    "name, count",
    [
        # Zagoruyko & Komodakis' WRNs with 1x1 projection shortcuts; the
        # same counts as the reference PyTorch implementations.
        ("wrn_16_4", 2_748_890),
        ("wrn_28_10", 36_479_194),
        # He et al.'s CIFAR ResNet-32 has 0.46M weights with identity
        # shortcuts; 1x1 projections where the width changes add 2.8k.
        ("resnet32", 466_906),
    ],
)
def test_cifar_models_have_the_published_number_of_weights(name, count):
    model = models.build(name, (32, 32, 3), 10)
    assert trainable_count(model) == count
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize(
    "name, blocks, relus",
    [
        # Post-activation (He et al.): a ReLU after the stem, after each
        # block's first convolution and after each sum.
        ("resnet20", 3, 1 + 2 * 9),
        # Pre-activation (Zagoruyko & Komodakis): a ReLU before each of a
        # block's convolutions and one before the pooling.
        ("wrn_16_4", 2, 2 * 6 + 1),
    ],
)
def test_residual_nets_halve_the_image_per_stage_and_place_their_relus(
    name, blocks, relus
):
    model = models.build(name, (32, 32, 3), 10)
    sides = [32] * blocks + [16] * blocks + [8] * blocks
    assert sum_sizes(model) == [(side, side) for side in sides]
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("ReLU") == relus
    if name == "resnet20":
        assert all(
            kinds[i + 1] == "ReLU" for i, k in enumerate(kinds) if k == "Add"
        )


def test_small_cnn_maps_fashion_mnist_to_ten_logits():
    model = models.build("small_cnn", (28, 28, 1), 10)
    assert model.output_shape == (None, 10)
    assert trainable_count(model) < 500_000


def test_weight_decay_gradient_is_lambda_w_on_kernels_only():
    # The paper's code adds weight_decay / 2 · Σ w², so its 5e-4 is a
    # decay of 5e-4 · w per step of the gradient.
    weight_decay = 5e-4
    model = models.build("resnet20", (32, 32, 3), 10, weight_decay)
    with tf.GradientTape() as tape:
        penalty = tf.add_n(model.losses)
    variables = model.trainable_variables
    gradients = tape.gradient(penalty, variables)
    kernels = [v for v in variables if len(v.shape) > 1]
    assert len(model.losses) == len(kernels)
    for variable, gradient in zip(variables, gradients):
        if len(variable.shape) > 1:
            np.testing.assert_allclose(
                gradient, weight_decay * variable.numpy(), rtol=1e-5
            )
        else:  # biases and BatchNorm
            assert gradient is None
    expected = weight_decay / 2 * sum(np.sum(k.numpy() ** 2) for k in kernels)
    np.testing.assert_allclose(float(penalty), expected, rtol=1e-5)


def test_no_weight_decay_adds_no_loss():
    assert not models.build("small_cnn", (28, 28, 1), 10).losses


def test_bad_depths_and_names_are_rejected():
    with pytest.raises(ValueError, match="6n\\+4. Received: depth=27"):
        residual.wide_resnet((32, 32, 3), 10, 27, 10)
    with pytest.raises(ValueError, match="6n\\+2. Received: depth=33"):
        residual.cifar_resnet((32, 32, 3), 10, 33)
    with pytest.raises(ValueError, match="Unknown model 'vgg'"):
        models.build("vgg", (32, 32, 3), 10)


def test_every_model_trains_one_step_on_its_inputs():
    x = np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
    y = np.arange(4) % 10
    for name in ("resnet20", "wrn_16_4"):
        model = models.build(name, (32, 32, 3), 10, weight_decay=5e-4)
        model.compile(
            keras.optimizers.SGD(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        loss = model.train_on_batch(x, y)
        assert np.isfinite(loss)
