"""Batch augmentation for tf.data: basic, cutout, RandAugment, AutoAugment.

Images arrive as float32 in [0, 1], NHWC; every function keeps the shape,
the dtype and the range. Each image gets its own random draw, as in the SAM
paper's code, which augments examples before batching (but for its
cutout: see `cutout`). The draws are
stateless: a `seed` of shape `[2]` (the trainer passes `(--seed, step)`)
fixes them, so a resumed run augments every batch exactly as an
uninterrupted one would, and parallel `map` calls share no random state.
With `seed=None` each call draws afresh.

Keras' `RandomCrop` does not fit here: it draws one offset per batch, so all
images of a batch would be shifted alike.
"""

import keras
import tensorflow as tf

from trainers.data import autoaugment

AUGMENTATIONS = (
    "none",
    "basic",
    "cutout",
    "randaugment",
    "autoaugment_cifar",
    "autoaugment_svhn",
)
# --augmentation: the `trainers.data.autoaugment` policy it applies.
AUTOAUGMENT_POLICIES = {
    "autoaugment_cifar": "cifar10",
    "autoaugment_svhn": "svhn",
}


def _uniform(shape, seed):
    """Floats in [0, 1); stateless when `seed` (an int or a pair) is given."""
    if seed is None:
        return tf.random.uniform(shape)
    if isinstance(seed, int):
        seed = (seed, 0)
    return tf.random.stateless_uniform(shape, seed)


def _split(seed, count):
    if seed is None:
        return [None] * count
    seed = tf.cast(tf.reshape(seed, [2]), tf.int64)
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def random_flip(images, seed=None):
    """Mirrors each image left-right with probability 1/2."""
    flip = _uniform([tf.shape(images)[0], 1, 1, 1], seed) < 0.5
    return tf.where(flip, tf.reverse(images, axis=[2]), images)


def random_crop(images, pad, seed=None):
    """Pads each image by `pad` pixels and crops a random window of its size.

    The padding reflects the image, as in the SAM paper's code; every image
    gets its own offset.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(
        images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT"
    )
    offsets = tf.cast(_uniform([batch, 2], seed) * (2 * pad + 1), tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


def cutout(images, size, seed=None):
    """Zeroes one `size`×`size` square per image (DeVries & Taylor, 2017).

    The square's centre is uniform over the image, so it may be clipped at
    the border, as in the original. Two differences from the SAM paper's
    code (google-research/sam), which cuts one square per batch out of
    normalized images: each image gets its own square, and the fill, 0 on
    images in [0, 1], is black there rather than the mean.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    extent = tf.cast(tf.stack([height, width]), tf.float32)
    centres = tf.cast(_uniform([batch, 2], seed) * extent, tf.int32)
    top = centres[:, 0, None, None] - size // 2
    left = centres[:, 1, None, None] - size // 2
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
    """`augment(images, training=True, seed=None)` for one of `AUGMENTATIONS`.

    `basic` is a random horizontal flip (unless `flip=False`, e.g. for
    digits) and a random crop after padding by `pad` pixels (unless
    `crop=False`: the streamed data sets crop and flip each example as they
    decode it, and use only what the other augmentations add); `cutout` adds
    one `cutout_size` square (half the image height by default, 16 pixels
    on CIFAR as in the paper) to `basic`; `randaugment` adds Keras'
    `RandAugment` to `basic`, whose own random state ignores `seed`.
    `autoaugment_cifar` and `autoaugment_svhn` apply AutoAugment's CIFAR-10
    or SVHN policy (`trainers.data.autoaugment`), then `basic` and the cutout,
    in the order of the SAM paper's code.
    """

    def __init__(
        self,
        name,
        image_shape,
        seed=0,
        flip=True,
        crop=True,
        cutout_size=None,
        pad=4,
    ):
        if name not in AUGMENTATIONS:
            raise ValueError(
                f"Unknown augmentation {name!r}; expected one of "
                f"{list(AUGMENTATIONS)}."
            )
        self.name = name
        self.flip = flip
        self.crop = crop
        self.pad = pad
        self.cutout_size = cutout_size or max(1, image_shape[0] // 2)
        self.policy = AUTOAUGMENT_POLICIES.get(name)
        self.randaugment = None
        if name == "randaugment":
            self.randaugment = keras.layers.RandAugment(
                value_range=(0.0, 1.0), seed=seed
            )

    def __call__(self, images, training=True, seed=None):
        if not training or self.name == "none":
            return images
        if self.policy is None:
            flip_seed, crop_seed, cutout_seed = _split(seed, 3)
        else:
            flip_seed, crop_seed, cutout_seed, policy_seed = _split(seed, 4)
            images = autoaugment.autoaugment(images, self.policy, policy_seed)
        if self.flip:
            images = random_flip(images, flip_seed)
        if self.crop:
            images = random_crop(images, self.pad, crop_seed)
        if self.name == "cutout" or self.policy is not None:
            images = cutout(images, self.cutout_size, cutout_seed)
        if self.randaugment is not None:
            images = self.randaugment(images, training=True)
            images = tf.clip_by_value(images, 0.0, 1.0)
        return images
