"""Residual networks of the paper's CIFAR and SVHN benchmarks."""

import keras

from trainers.models import regularization


def conv(channels, kernel, strides, reg, initializer="he_normal"):
    """A "same" convolution without bias, decayed by the regularizer `reg`."""
    return keras.layers.Conv2D(
        channels,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer=initializer,
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
    h = conv(16, 3, 1, reg)(inputs)
    if not preactivation:
        h = _bn_relu(h)
    for stage, channels in enumerate(widths):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = h
            if preactivation:
                h = _bn_relu(h)
                if strides != 1 or shortcut.shape[-1] != channels:
                    shortcut = conv(channels, 1, strides, reg)(h)
                h = conv(channels, 3, strides, reg)(h)
                h = conv(channels, 3, 1, reg)(_bn_relu(h))
            else:
                if strides != 1 or shortcut.shape[-1] != channels:
                    shortcut = conv(channels, 1, strides, reg)(h)
                    shortcut = keras.layers.BatchNormalization()(shortcut)
                h = _bn_relu(conv(channels, 3, strides, reg)(h))
                h = keras.layers.BatchNormalization()(
                    conv(channels, 3, 1, reg)(h)
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
