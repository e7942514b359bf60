"""Batch augmentation for the tf.data pipeline: basic, cutout, RandAugment.

Images arrive as float32 in [0, 1], NHWC; every function keeps the shape,
the dtype and the range.
"""

import keras
import tensorflow as tf

AUGMENTATIONS = ("none", "basic", "cutout", "randaugment")


def cutout(images, size, seed=None):
    """Zeroes one `size`×`size` square per image (DeVries & Taylor, 2017).

    The square's centre is uniform over the image, so it may be clipped at
    the border, as in the original.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    cy = tf.random.uniform([batch, 1, 1], 0, height, tf.int32, seed=seed)
    cx = tf.random.uniform([batch, 1, 1], 0, width, tf.int32, seed=seed)
    top, left = cy - size // 2, cx - size // 2
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    inside = (
        (rows >= top)
        & (rows < top + size)
        & (cols >= left)
        & (cols < left + size)
    )
    return images * tf.cast(~inside, images.dtype)[..., None]


class Augmentation:
    """`augment(images, training=True)` for one of `AUGMENTATIONS`."""

    def __init__(self, name, image_shape, seed=0, flip=True, cutout_size=None):
        if name not in AUGMENTATIONS:
            raise ValueError(
                f"Unknown augmentation {name!r}; expected one of "
                f"{list(AUGMENTATIONS)}."
            )
        self.name = name
        height, width = image_shape[:2]
        self.cutout_size = cutout_size or max(1, height // 2)
        self.seed = seed
        layers = []
        if name in ("basic", "cutout", "randaugment"):
            if flip:
                layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
            layers.append(keras.layers.ZeroPadding2D(4))
            layers.append(keras.layers.RandomCrop(height, width, seed=seed))
        if name == "randaugment":
            layers.append(
                keras.layers.RandAugment(value_range=(0.0, 1.0), seed=seed)
            )
        self.layers = layers

    def __call__(self, images, training=True):
        if not training:
            return images
        for layer in self.layers:
            images = layer(images, training=True)
        if self.name == "cutout":
            images = cutout(images, self.cutout_size, seed=self.seed)
        return tf.clip_by_value(images, 0.0, 1.0)
