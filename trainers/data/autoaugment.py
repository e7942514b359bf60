"""AutoAugment's CIFAR-10 and SVHN policies on batches of [0, 1] images.

Cubuk et al., "AutoAugment: Learning Augmentation Strategies from Data"
(CVPR 2019, arXiv 1805.09501). A policy is 25 sub-policies of two
operations `(name, probability, magnitude)`; each image draws one
sub-policy, then applies each of its operations with its probability, in
order. Magnitudes 0..9 map linearly onto the paper's ranges (appendix,
table 1), with torchvision's conventions where the paper is silent:

| operation | magnitude 9 | operation | magnitude 9 |
|---|---|---|---|
| ShearX/Y | ±0.3 | Color, Contrast, | factor 1 ± 0.9 |
| TranslateX/Y | ±150/331 of the side | Brightness, Sharpness | |
| Rotate | ±30° | Posterize | 4 bits (0: 8) |
| Solarize | threshold 0 (0: 256) | AutoContrast, Equalize, Invert | — |

The sign of signed magnitudes is drawn per image. Every operation gives,
on 8-bit images, PIL's result as used by the AutoAugment code: exactly for
the geometric ones (nearest neighbour at pixel centres, shears about the
top-left corner, rotation about the centre, grey fill 128/255) and for
Equalize, Invert, Posterize and Solarize; within one level of 255 for
AutoContrast and 1.5 for the blends (Color, Contrast, Brightness,
Sharpness), which are not rounded to 8 bits here.

The SAM paper's code draws, for CIFAR, from the 95 sub-policies that the
AutoAugment authors released with their CIFAR code, not from these 25.

Images are float32 in [0, 1], NHWC; the functions keep the shape, the dtype
and the range. The draws are stateless given a `seed` of shape `[2]`, as in
`trainers.data.augment`.
"""

import math

import tensorflow as tf

CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

SVHN_POLICY = (
    (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
    (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
    (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
    (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
    (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
    (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
    (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
    (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
    (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
    (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
    (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
    (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
    (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
    (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
    (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
    (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
    (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
    (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
    (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
)

POLICIES = {"cifar10": CIFAR10_POLICY, "svhn": SVHN_POLICY}

MAX_MAGNITUDE = 9
FILL_VALUE = 128 / 255


def _per_image(values):
    return values[:, None, None, None]


def _levels(images):
    """The 8-bit levels 0..255 of [0, 1] images, as int32."""
    return tf.cast(tf.round(images * 255.0), tf.int32)


def _grayscale(images):
    if images.shape[-1] == 3:
        return tf.image.rgb_to_grayscale(images)
    return tf.reduce_mean(images, axis=-1, keepdims=True)


def _blend(degenerate, images, factor):
    """PIL's ImageEnhance: `degenerate + factor · (images − degenerate)`."""
    blended = degenerate + _per_image(factor) * (images - degenerate)
    return tf.clip_by_value(blended, 0.0, 1.0)


def auto_contrast(images):
    """Stretches each channel of each image to the full range [0, 1]."""
    low = tf.reduce_min(images, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2], keepdims=True)
    spread = high - low
    stretched = (images - low) / tf.where(spread > 0, spread, 1.0)
    return tf.where(spread > 0, stretched, images)


def equalize(images):
    """PIL's histogram equalization of each channel of each image."""
    shape = tf.shape(images)
    batch, channels = shape[0], shape[3]
    levels = tf.transpose(_levels(images), [0, 3, 1, 2])
    levels = tf.reshape(levels, [batch, channels, -1])
    offsets = tf.range(batch * channels) * 256
    counts = tf.math.bincount(
        tf.reshape(levels + tf.reshape(offsets, [batch, channels, 1]), [-1]),
        minlength=batch * channels * 256,
        maxlength=batch * channels * 256,
    )
    counts = tf.reshape(counts, [batch, channels, 256])
    top = 255 - tf.argmax(
        tf.reverse(counts, axis=[-1]) > 0, axis=-1, output_type=tf.int32
    )
    top_count = tf.gather(counts, top, batch_dims=2)
    step = (tf.reduce_sum(counts, axis=-1) - top_count) // 255
    safe_step = tf.maximum(step, 1)[..., None]
    before = tf.cumsum(counts, axis=-1, exclusive=True)
    lut = tf.minimum((before + safe_step // 2) // safe_step, 255)
    equalized = tf.where(
        (step > 0)[..., None], tf.gather(lut, levels, batch_dims=2), levels
    )
    equalized = tf.reshape(equalized, [batch, channels, shape[1], shape[2]])
    return tf.cast(tf.transpose(equalized, [0, 2, 3, 1]), images.dtype) / 255


def invert(images):
    return 1.0 - images


def posterize(images, bits):
    """Keeps the `bits` (per image, 1..8) high bits of each 8-bit level."""
    step = tf.cast(2 ** (8 - _per_image(bits)), tf.int32)
    return tf.cast(_levels(images) // step * step, images.dtype) / 255


def solarize(images, threshold):
    """Inverts the levels at or above `threshold` (per image, 0..256)."""
    above = tf.cast(_levels(images), tf.float32) >= _per_image(threshold)
    return tf.where(above, 1.0 - images, images)


def color(images, factor):
    return _blend(_grayscale(images), images, factor)


def contrast(images, factor):
    mean = tf.reduce_mean(_grayscale(images), axis=[1, 2, 3], keepdims=True)
    return _blend(mean, images, factor)


def brightness(images, factor):
    return _blend(tf.zeros_like(images), images, factor)


def sharpness(images, factor):
    """Blends with PIL's SMOOTH filter, which leaves the border as is."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], images.dtype) / 13
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, images.shape[-1], 1])
    smooth = tf.nn.depthwise_conv2d(images, kernel, [1] * 4, "VALID")
    smooth = tf.pad(smooth, [[0, 0], [1, 1], [1, 1], [0, 0]])
    shape = tf.shape(images)
    interior = tf.pad(tf.ones(shape[1:3] - 2), [[1, 1], [1, 1]])
    smooth = tf.where(interior[None, :, :, None] > 0, smooth, images)
    return _blend(smooth, images, factor)


def _affine(values):
    """Rows `[a0, a1, a2, b0, b1, b2, 0, 0]`: output (x, y) reads input
    `(a0 x + a1 y + a2, b0 x + b1 y + b2)`."""
    zero = tf.zeros_like(values[0])
    return tf.stack(list(values) + [zero, zero], axis=1)


# The geometric operations map (fraction of the maximum magnitude, sign,
# height, width), each `[batch]`, to affine transforms. Shears sample at
# pixel centres, as PIL does: `shear / 2` is the shear of the half pixel
# between a pixel's index and its centre.
def _shear_x(level, sign, height, width):
    shear = 0.3 * level * sign
    one, zero = tf.ones_like(shear), tf.zeros_like(shear)
    return _affine([one, shear, shear / 2, zero, one, zero])


def _shear_y(level, sign, height, width):
    shear = 0.3 * level * sign
    one, zero = tf.ones_like(shear), tf.zeros_like(shear)
    return _affine([one, zero, zero, shear, one, shear / 2])


def _pixels(level, sign, side):
    # Truncated to whole pixels, as torchvision does.
    return tf.cast(
        tf.cast(150 / 331 * side * level * sign, tf.int32), "float32"
    )


def _translate_x(level, sign, height, width):
    pixels = _pixels(level, sign, width)
    one, zero = tf.ones_like(pixels), tf.zeros_like(pixels)
    return _affine([one, zero, pixels, zero, one, zero])


def _translate_y(level, sign, height, width):
    pixels = _pixels(level, sign, height)
    one, zero = tf.ones_like(pixels), tf.zeros_like(pixels)
    return _affine([one, zero, zero, zero, one, pixels])


def _rotate(level, sign, height, width):
    radians = 30.0 * level * sign * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    x_span, y_span = width - 1.0, height - 1.0
    x_offset = (x_span - (cos * x_span - sin * y_span)) / 2
    y_offset = (y_span - (sin * x_span + cos * y_span)) / 2
    return _affine([cos, -sin, x_offset, sin, cos, y_offset])


def _factor(level, sign):
    return 1.0 + 0.9 * level * sign


_GEOMETRIC = {
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}
# name: (function, its argument from the fraction of the maximum magnitude
# and the sign, or None).
_POINT = {
    "AutoContrast": (auto_contrast, None),
    "Equalize": (equalize, None),
    "Invert": (invert, None),
    "Posterize": (posterize, lambda level, sign: 8 - tf.round(4 * level)),
    "Solarize": (solarize, lambda level, sign: 256 * (1 - level)),
    "Color": (color, _factor),
    "Contrast": (contrast, _factor),
    "Brightness": (brightness, _factor),
    "Sharpness": (sharpness, _factor),
}
OPERATIONS = tuple(sorted(_GEOMETRIC) + sorted(_POINT))


def apply_operation(images, name, magnitude, sign=None):
    """Applies operation `name` to each image with its own magnitude.

    Args:
        images: float32 `[batch, height, width, channels]` in [0, 1].
        name: one of `OPERATIONS`.
        magnitude: `[batch]` magnitudes in [0, `MAX_MAGNITUDE`].
        sign: `[batch]` signs ±1 of signed operations; `None` for +1.

    Returns:
        The transformed images.
    """
    images = tf.convert_to_tensor(images)
    level = tf.cast(magnitude, tf.float32) / MAX_MAGNITUDE
    sign = tf.ones_like(level) if sign is None else tf.cast(sign, "float32")
    if name in _GEOMETRIC:
        shape = tf.cast(tf.shape(images), tf.float32)
        # TensorFlow's op, not `keras.ops.image`, which runs the backend's
        # (JAX's or PyTorch's) and cannot take a `tf.data` graph tensor.
        transformed = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=_GEOMETRIC[name](level, sign, shape[1], shape[2]),
            output_shape=tf.shape(images)[1:3],
            fill_value=FILL_VALUE,
            interpolation="NEAREST",
            fill_mode="CONSTANT",
        )
        return tf.ensure_shape(transformed, images.shape)
    function, argument = _POINT[name]
    if argument is None:
        return function(images)
    return function(images, argument(level, sign))


def _table(policy, stage):
    names, probabilities, magnitudes = zip(
        *[
            (OPERATIONS.index(name), probability, magnitude or 0)
            for name, probability, magnitude in (sub[stage] for sub in policy)
        ]
    )
    return (
        tf.constant(names, tf.int32),
        tf.constant(probabilities, tf.float32),
        tf.constant(magnitudes, tf.float32),
    )


def autoaugment(images, policy, seed=None):
    """Applies a random sub-policy of `policy` to each image.

    Args:
        images: float32 `[batch, height, width, channels]` in [0, 1].
        policy: a key of `POLICIES` (`"cifar10"`, `"svhn"`) or a table of
            sub-policies, each a sequence of `(name, probability,
            magnitude)`, all of one length.
        seed: a stateless seed of shape `[2]`, or `None` for fresh draws.

    Returns:
        The augmented images.
    """
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"Unknown AutoAugment policy {policy!r}; expected one of "
                f"{sorted(POLICIES)}."
            )
        policy = POLICIES[policy]
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    seed = tf.cast(tf.reshape(seed, [2]), tf.int64)
    choice_seed, apply_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3)
    )
    batch = tf.shape(images)[0]
    stages = len(policy[0])
    choice = tf.random.stateless_uniform(
        [batch], choice_seed, minval=0, maxval=len(policy), dtype=tf.int32
    )
    draws = tf.random.stateless_uniform([batch, stages], apply_seed)
    signs = tf.where(
        tf.random.stateless_uniform([batch, stages], sign_seed) < 0.5,
        -1.0,
        1.0,
    )
    for stage in range(stages):
        names, probabilities, magnitudes = (
            tf.gather(column, choice) for column in _table(policy, stage)
        )
        chosen = tf.where(draws[:, stage] < probabilities, names, -1)
        used = {sub[stage][0] for sub in policy}
        augmented = images
        for name in sorted(used):
            selected = chosen == OPERATIONS.index(name)
            operated = apply_operation(
                images, name, magnitudes, signs[:, stage]
            )
            augmented = tf.where(_per_image(selected), operated, augmented)
        images = augmented
    return images
