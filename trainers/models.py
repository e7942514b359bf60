"""Models of the paper's benchmarks, built for inputs scaled to [0, 1].

Weight decay λ is an L2 term in the loss, `λ/2 · Σ w²` over every kernel,
whose gradient `λ · w` is classic SGD weight decay. This is how the SAM
paper's code applies its `weight_decay` (so its 5e-4 means the same here),
and it keeps the term inside the loss, where SAM evaluates it at w + ε.
Biases and BatchNorm parameters are not decayed.
"""

import keras

from trainers import regularization
from trainers import shake_models


def small_cnn(input_shape, num_classes, weight_decay=0.0):
    """Two conv blocks and a dense head: ~0.4M weights, fast on a CPU."""
    reg = regularization.weight_decay_regularizer(weight_decay)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 3, padding="same", kernel_regularizer=reg),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", kernel_regularizer=reg),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(128, activation="relu", kernel_regularizer=reg),
            keras.layers.Dense(num_classes, kernel_regularizer=reg),
        ],
        name="small_cnn",
    )


def mlp(input_shape, num_classes, weight_decay=0.0, width=512):
    """Two ReLU hidden layers of `width` units: ~0.67M weights on 28x28.

    Without convolutions, pooling, dropout or BatchNorm it has nothing but
    the optimizer to keep it from fitting noisy labels, and it trains in
    seconds on a CPU: the model of the label-noise study
    (`benchmarks/generalization.py`).
    """
    reg = regularization.weight_decay_regularizer(weight_decay)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(
                width, activation="relu", kernel_regularizer=reg
            ),
            keras.layers.Dense(
                width, activation="relu", kernel_regularizer=reg
            ),
            keras.layers.Dense(num_classes, kernel_regularizer=reg),
        ],
        name="mlp",
    )


def _conv(channels, kernel, strides, reg):
    return keras.layers.Conv2D(
        channels,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=reg,
    )


def _bn_relu(h):
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(h)
    return keras.layers.ReLU()(h)


def residual_net(
    input_shape,
    num_classes,
    blocks_per_stage,
    widths,
    weight_decay=0.0,
    preactivation=True,
    name="resnet",
):
    """A CIFAR-style ResNet: three stages of two-conv basic blocks.

    With `widths=(16k, 32k, 64k)` and pre-activation blocks it is a Wide
    ResNet (Zagoruyko & Komodakis, 2016); with `(16, 32, 64)` and
    post-activation blocks, He et al.'s CIFAR ResNet.
    """
    reg = regularization.weight_decay_regularizer(weight_decay)
    inputs = keras.Input(input_shape)
    h = _conv(16, 3, 1, reg)(inputs)
    if not preactivation:
        h = _bn_relu(h)
    for stage, channels in enumerate(widths):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = h
            if preactivation:
                h = _bn_relu(h)
                if strides != 1 or shortcut.shape[-1] != channels:
                    shortcut = _conv(channels, 1, strides, reg)(h)
                h = _conv(channels, 3, strides, reg)(h)
                h = _conv(channels, 3, 1, reg)(_bn_relu(h))
            else:
                if strides != 1 or shortcut.shape[-1] != channels:
                    shortcut = _conv(channels, 1, strides, reg)(h)
                    shortcut = keras.layers.BatchNormalization()(shortcut)
                h = _bn_relu(_conv(channels, 3, strides, reg)(h))
                h = keras.layers.BatchNormalization()(
                    _conv(channels, 3, 1, reg)(h)
                )
            h = keras.layers.Add()([h, shortcut])
            if not preactivation:
                h = keras.layers.ReLU()(h)
    if preactivation:
        h = _bn_relu(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=reg)(h)
    return keras.Model(inputs, outputs, name=name)


def wide_resnet(input_shape, num_classes, depth, width, weight_decay=0.0):
    """WRN-depth-width; depth = 6n + 4."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4. Received: depth={depth}")
    return residual_net(
        input_shape,
        num_classes,
        (depth - 4) // 6,
        (16 * width, 32 * width, 64 * width),
        weight_decay,
        preactivation=True,
        name=f"wrn_{depth}_{width}",
    )


def cifar_resnet(input_shape, num_classes, depth, weight_decay=0.0):
    """He et al.'s CIFAR ResNet-depth; depth = 6n + 2 (ResNet-32: n = 5)."""
    if (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6n+2. Received: depth={depth}")
    return residual_net(
        input_shape,
        num_classes,
        (depth - 2) // 6,
        (16, 32, 64),
        weight_decay,
        preactivation=False,
        name=f"resnet{depth}",
    )


MODELS = {
    "mlp": mlp,
    "small_cnn": small_cnn,
    "resnet20": lambda s, c, wd=0.0: cifar_resnet(s, c, 20, wd),
    "resnet32": lambda s, c, wd=0.0: cifar_resnet(s, c, 32, wd),
    "wrn_16_4": lambda s, c, wd=0.0: wide_resnet(s, c, 16, 4, wd),
    "wrn_28_10": lambda s, c, wd=0.0: wide_resnet(s, c, 28, 10, wd),
    "shake_shake_26_2x32d": lambda s, c, wd=0.0: shake_models.shake_shake(
        s, c, 26, 32, wd
    ),
    "shake_shake_26_2x96d": lambda s, c, wd=0.0: shake_models.shake_shake(
        s, c, 26, 96, wd
    ),
    "pyramidnet_110_48": lambda s, c, wd=0.0: shake_models.pyramidnet_shakedrop(
        s, c, 110, 48, wd
    ),
    "pyramidnet_272_200": lambda s, c, wd=0.0: (
        shake_models.pyramidnet_shakedrop(s, c, 272, 200, wd)
    ),
}


def build(name, input_shape, num_classes, weight_decay=0.0):
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}; expected one of {sorted(MODELS)}."
        )
    return MODELS[name](input_shape, num_classes, weight_decay)
