"""Shake-Shake and PyramidNet-ShakeDrop, the SAM paper's largest CIFAR models.

Both regularize residual branches with random coefficients that differ
between the forward and the backward pass (Gastaldi, 2017; Yamada et al.,
2018). The coefficients are drawn from each layer's
`keras.random.SeedGenerator`, whose state is a variable of the model: the
two passes of a SAM step, which run statelessly from the same state, draw
the same coefficients, and a checkpoint restores the stream.

The architectures follow the SAM paper's code (itself following the
AutoAugment code that is the usual benchmark): Kaiming-normal convolution
kernels (fan-out), a final dense layer drawn from U(±1/√classes), BatchNorm
with momentum 0.9 and ε = 1e-5. Weight decay is the L2 term of
`trainers.models`.
"""

import math

import keras
from keras import ops

from trainers.models import regularization
from trainers.models import residual


def _conv(channels, kernel, strides, reg):
    fan_out = keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal"
    )
    return residual.conv(channels, kernel, strides, reg, fan_out)


def _bn(h, relu=False):
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(h)
    return keras.layers.ReLU()(h) if relu else h


def _head(h, num_classes, reg):
    h = keras.layers.GlobalAveragePooling2D()(h)
    scale = 1.0 / math.sqrt(num_classes)
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomUniform(-scale, scale),
        kernel_regularizer=reg,
    )(h)


def _per_example_shape(x):
    return (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)


@keras.saving.register_keras_serializable(package="keras_sam_trainers")
class ShakeShake(keras.layers.Layer):
    """Mixes two residual branches with random per-example weights.

    Called on `[a, b]`. In training, each example draws α ~ U(0, 1) for the
    forward pass and an independent β ~ U(0, 1) for the backward pass:

    ```
    forward:   α · a + (1 − α) · b
    gradient:  β · ∂L/∂out to a,  (1 − β) · ∂L/∂out to b
    inference: (a + b) / 2
    ```

    computed as `β a + (1 − β) b + stop_gradient((α − β)(a − b))`
    ("Shake-Shake-Image" of Gastaldi, "Shake-Shake regularization", 2017,
    arXiv 1705.07485).

    Args:
        seed: the seed of the layer's `keras.random.SeedGenerator`, or `None`
            for one drawn from Keras' global seed. Defaults to `None`.
        **kwargs: passed to `keras.layers.Layer`.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        a, b = inputs
        if not training:
            return 0.5 * (a + b)
        shape = _per_example_shape(a)
        alpha = keras.random.uniform(
            shape, dtype=a.dtype, seed=self.seed_generator
        )
        beta = keras.random.uniform(
            shape, dtype=a.dtype, seed=self.seed_generator
        )
        return b + beta * (a - b) + ops.stop_gradient((alpha - beta) * (a - b))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config["seed"] = self.seed
        return config


@keras.saving.register_keras_serializable(package="keras_sam_trainers")
class ShakeDrop(keras.layers.Layer):
    """Scales a residual branch by random per-example coefficients.

    In training, each example draws a gate `g ~ Bernoulli(1 − drop_rate)`
    and `α ~ U(alpha_range)`, `β ~ U(beta_range)`:

    ```
    forward:   (g + α − g α) · x
    gradient:  (g + β − g β) · ∂L/∂out
    inference: E[g + α − g α] · x = (1 − r + r · E[α]) · x,  r = drop_rate
    ```

    so a kept branch passes unchanged and a dropped one is scaled by α
    forward and β backward (Yamada et al., "ShakeDrop Regularization for
    Deep Residual Learning", 2018, arXiv 1802.02375).

    Args:
        drop_rate: the probability `r` in [0, 1] that the gate is closed.
            Defaults to `0.5`.
        alpha_range: the bounds of α's uniform distribution. Defaults to
            `(-1.0, 1.0)`.
        beta_range: the bounds of β's uniform distribution. Defaults to
            `(0.0, 1.0)`.
        seed: the seed of the layer's `keras.random.SeedGenerator`, or `None`
            for one drawn from Keras' global seed. Defaults to `None`.
        **kwargs: passed to `keras.layers.Layer`.
    """

    def __init__(
        self,
        drop_rate=0.5,
        alpha_range=(-1.0, 1.0),
        beta_range=(0.0, 1.0),
        seed=None,
        **kwargs,
    ):
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(
                f"`drop_rate` must be in [0, 1]. Received: drop_rate="
                f"{drop_rate}"
            )
        for name, bounds in (
            ("alpha_range", alpha_range),
            ("beta_range", beta_range),
        ):
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ValueError(
                    f"`{name}` must be a pair (low, high) with low <= high. "
                    f"Received: {name}={bounds}"
                )
        super().__init__(**kwargs)
        self.drop_rate = float(drop_rate)
        self.alpha_range = tuple(float(v) for v in alpha_range)
        self.beta_range = tuple(float(v) for v in beta_range)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        keep = 1.0 - self.drop_rate
        if not training:
            mean_alpha = 0.5 * sum(self.alpha_range)
            return inputs * (keep + self.drop_rate * mean_alpha)
        shape = _per_example_shape(inputs)
        dtype = inputs.dtype
        gate = ops.cast(
            keras.random.uniform(shape, seed=self.seed_generator) < keep,
            dtype,
        )
        alpha = keras.random.uniform(
            shape, *self.alpha_range, dtype=dtype, seed=self.seed_generator
        )
        beta = keras.random.uniform(
            shape, *self.beta_range, dtype=dtype, seed=self.seed_generator
        )
        forward = gate + alpha - gate * alpha
        backward = gate + beta - gate * beta
        return inputs * backward + ops.stop_gradient(
            inputs * (forward - backward)
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            drop_rate=self.drop_rate,
            alpha_range=self.alpha_range,
            beta_range=self.beta_range,
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_sam_trainers")
class ZeroPadChannels(keras.layers.Layer):
    """Appends `channels` zero channels: PyramidNet's parameter-free shortcut.

    Args:
        channels: the number of zero channels to append.
        **kwargs: passed to `keras.layers.Layer`.
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)

    def call(self, inputs):
        pad = [[0, 0]] * (len(inputs.shape) - 1) + [[0, self.channels]]
        return ops.pad(inputs, pad)

    def compute_output_shape(self, input_shape):
        return input_shape[:-1] + (input_shape[-1] + self.channels,)

    def get_config(self):
        config = super().get_config()
        config["channels"] = self.channels
        return config


def _shake_shake_shortcut(h, channels, strides, reg):
    # Gastaldi's shortcut where the width changes: two strided 1x1
    # convolutions, the second on the image shifted by one pixel, each
    # giving half of the channels.
    if h.shape[-1] == channels:
        return h
    shifted = keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(h)
    shifted = keras.layers.Cropping2D(((1, 0), (1, 0)))(shifted)
    paths = [_conv(channels // 2, 1, strides, reg)(x) for x in (h, shifted)]
    return _bn(keras.layers.Concatenate()(paths))


def _shake_shake_branch(h, channels, strides, reg):
    h = keras.layers.ReLU()(h)
    h = _bn(_conv(channels, 3, strides, reg)(h), relu=True)
    return _bn(_conv(channels, 3, 1, reg)(h))


def shake_shake(input_shape, num_classes, depth=26, width=96, weight_decay=0.0):
    """Shake-Shake `depth` 2x`width`d (Gastaldi, 2017); depth = 6n + 2.

    Three stages of `n` blocks with `width`, `2 width` and `4 width`
    channels; each block adds two branches of ReLU-conv-BN-ReLU-conv-BN,
    mixed by `ShakeShake`, to the input. The 26 2x96d model of the SAM
    paper has 26.2M weights.
    """
    if (depth - 2) % 6:
        raise ValueError(
            f"Shake-Shake depth must be 6n+2. Received: depth={depth}"
        )
    if width % 2:
        raise ValueError(
            f"Shake-Shake width must be even. Received: width={width}"
        )
    reg = regularization.weight_decay_regularizer(weight_decay)
    inputs = keras.Input(input_shape)
    h = _bn(_conv(16, 3, 1, reg)(inputs))
    for stage, channels in enumerate((width, 2 * width, 4 * width)):
        for block in range((depth - 2) // 6):
            strides = 2 if stage > 0 and block == 0 else 1
            branches = [
                _shake_shake_branch(h, channels, strides, reg) for _ in range(2)
            ]
            h = keras.layers.Add()(
                [
                    ShakeShake()(branches),
                    _shake_shake_shortcut(h, channels, strides, reg),
                ]
            )
    h = keras.layers.ReLU()(h)
    outputs = _head(h, num_classes, reg)
    return keras.Model(inputs, outputs, name=f"shake_shake_{depth}_2x{width}d")


def _pyramid_block(h, channels, strides, drop_rate, reg, name):
    # A nested functional model: one flat graph of PyramidNet-272's ~1000
    # layers is deeper than Keras' recursive graph walk allows.
    inputs = keras.Input(h.shape[1:])
    y = _conv(channels, 1, 1, reg)(_bn(inputs))
    y = _conv(channels, 3, strides, reg)(_bn(y, relu=True))
    y = _bn(_conv(4 * channels, 1, 1, reg)(_bn(y, relu=True)))
    y = ShakeDrop(drop_rate)(y)
    shortcut = inputs
    if strides != 1:
        shortcut = keras.layers.AveragePooling2D(2)(shortcut)
    if shortcut.shape[-1] != 4 * channels:
        shortcut = ZeroPadChannels(4 * channels - shortcut.shape[-1])(shortcut)
    outputs = keras.layers.Add()([y, shortcut])
    return keras.Model(inputs, outputs, name=name)(h)


def pyramidnet_shakedrop(
    input_shape, num_classes, depth=272, alpha=200, weight_decay=0.0
):
    """PyramidNet-`depth` with widening `alpha` and ShakeDrop; depth = 9n + 2.

    Han et al., "Deep Pyramidal Residual Networks" (2017), with bottleneck
    blocks BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN: block `k` of the
    `N = 3n` has `round(16 + k α / N)` channels inside and four times as
    many out, so the width grows linearly. Shortcuts are parameter free:
    2x2 average pooling where the resolution halves and zero channels
    appended. Each branch ends in a `ShakeDrop` whose drop rate grows
    linearly to 0.5 in the last block (Yamada et al., 2018). As in the SAM
    paper's code, widths are rounded, not truncated, which adds ~0.2M
    weights to the 26.0M of PyramidNet-272 α = 200.
    """
    if (depth - 2) % 9:
        raise ValueError(
            f"PyramidNet depth must be 9n+2. Received: depth={depth}"
        )
    reg = regularization.weight_decay_regularizer(weight_decay)
    blocks_per_stage = (depth - 2) // 9
    total_blocks = 3 * blocks_per_stage
    inputs = keras.Input(input_shape)
    h = _bn(_conv(16, 3, 1, reg)(inputs))
    for index in range(total_blocks):
        h = _pyramid_block(
            h,
            channels=int(round(16 + (index + 1) * alpha / total_blocks)),
            strides=2 if index and index % blocks_per_stage == 0 else 1,
            drop_rate=0.5 * (index + 1) / total_blocks,
            reg=reg,
            name=f"block_{index + 1}",
        )
    outputs = _head(_bn(h, relu=True), num_classes, reg)
    return keras.Model(inputs, outputs, name=f"pyramidnet_{depth}_{alpha}")
