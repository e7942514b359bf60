"""Data streamed from tensorflow-datasets: ImageNet and the finetuning sets.

ImageNet and the finetuning data sets do not fit in memory as arrays, so
these trainers read a prepared tensorflow-datasets copy with tf.data:
decode, crop and resize, augment in a parallel `map`, batch (dropping the
remainder, so every step has the same batch size) and prefetch.
`trainers.loop` trains on it as on the in-memory data sets
(`trainers.data.arrays`).

Training images get an Inception-style random-resized crop (8 % to 100 % of
the area, aspect ratio 3/4 to 4/3) and a horizontal flip; evaluation images
the central 224/256 of their shorter side, resized to `--image_size` (at
224 pixels: resize to 256, crop 224). --augmentation=none crops training
images like evaluation ones; basic is the random crop and flip; the others add
to each batch of cropped and flipped images what `trainers.data.augment` adds
after its own crop and flip (a cutout square of half the image side,
Keras' RandAugment, or an AutoAugment policy and the cutout; on the
in-memory data sets the policy comes before the crop). Images reach the
model as float32 in [0, 1], like everywhere in `trainers`; each model
converts them to what its architecture expects.

Resumption: data epoch k visits the training split in an order fixed by
(--seed, k) (tensorflow-datasets' file shuffling and a `shuffle` buffer,
both seeded), and the crop and flip of example i are drawn from the seed
(--seed, i). A run restarted from the checkpoint of step s rebuilds the
stream of its epoch and skips the examples of the steps already trained
with `Dataset.skip`, before decoding, so it sees the batches an
uninterrupted run would. The skip still reads those records: up to one
epoch of files. Keras' `RandAugment` keeps its own random state, so with
--augmentation=randaugment only the order and the crops are reproduced.
"""

import tensorflow as tf

from trainers.data import augment as augment_lib
from trainers.data import datasets

SYNTHETIC_STEPS_PER_EPOCH = 4


def random_resized_crop(image, size, seed):
    """Inception-style crop of a uint8 HWC image, resized, randomly flipped.

    Returns float32 `size`×`size` in [0, 1]; `seed` (shape [2]) fixes the
    crop and the flip.
    """
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2)
    )
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.image.resize(tf.slice(image, begin, extent), [size, size])
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.where(flip, tf.reverse(image, axis=[1]), image)
    image = tf.ensure_shape(image, [size, size, 3])
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def center_crop(image, size):
    """The central 224/256 of the shorter side, resized to `size`, in [0, 1]."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.cast(
        tf.round(tf.cast(tf.minimum(height, width), tf.float32) * 224 / 256),
        tf.int32,
    )
    side = tf.maximum(side, 1)
    top, left = (height - side) // 2, (width - side) // 2
    image = tf.slice(image, [top, left, 0], [side, side, -1])
    image = tf.ensure_shape(
        tf.image.resize(image, [size, size]), [size, size, 3]
    )
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


class Source:
    """Decoded uint8 images and int labels of a data set's splits."""

    def __init__(self, info, read, num_examples):
        self.info = info
        self._read = read
        self.num_examples = num_examples

    def read(self, split, shuffle_seed=None):
        """The examples of `split`; `shuffle_seed` shuffles its files."""
        return self._read(split, shuffle_seed)


def tfds_source(info, data_dir):
    """A prepared tensorflow-datasets copy in `data_dir`. Never downloads."""
    import tensorflow_datasets as tfds

    name = info.tfds_name
    if not datasets.is_directory(data_dir):
        raise FileNotFoundError(
            f"--data_dir={data_dir!r} is not a directory; it must hold a "
            f"prepared tensorflow-datasets copy of {name} (or use "
            "--synthetic_data)."
        )
    builder = tfds.builder(name, data_dir=data_dir)

    def read(split, shuffle_seed=None):
        return builder.as_dataset(
            split=split,
            as_supervised=True,
            shuffle_files=shuffle_seed is not None,
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
        )

    num_examples = {}
    for split in (info.train_split, info.test_split):
        try:
            dataset = read(split)
        except (
            AssertionError,
            FileNotFoundError,
            KeyError,  # an empty version folder: no splits
            tf.errors.NotFoundError,
        ):
            raise FileNotFoundError(
                f"No prepared tensorflow-datasets copy of {name!r} in "
                f"--data_dir={data_dir!r} (looked in {builder.data_dir}). "
                "Prepare it on a machine with internet access (tfds build "
                f"{name} --data_dir=<dir>; ImageNet needs its manually "
                "downloaded archives) and copy the directory here, or use "
                "--synthetic_data."
            ) from None
        num_examples[split] = _count(builder, split, dataset)
    classes = builder.info.features["label"].num_classes
    if classes != info.num_classes:
        raise ValueError(
            f"{name} in {data_dir} has {classes} classes; expected "
            f"{info.num_classes}."
        )
    return Source(info, read, num_examples)


def _count(builder, split, dataset):
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError):
        cardinality = int(dataset.cardinality())
        if cardinality < 0:
            raise ValueError(
                f"Cannot tell how many examples {builder.name}:{split} holds."
            ) from None
        return cardinality


def synthetic_source(info, image_size, batch_size, seed=0):
    """Random images of `image_size` pixels, drawn per example from `seed`.

    The training split has `SYNTHETIC_STEPS_PER_EPOCH` batches, the test
    split one batch; nothing is held in memory.
    """
    num_examples = {
        info.train_split: SYNTHETIC_STEPS_PER_EPOCH * batch_size,
        info.test_split: batch_size,
    }

    def example(split_index, i):
        key = tf.stack([tf.constant(seed, tf.int64) * 2 + split_index, i])
        image = tf.random.stateless_uniform(
            [image_size, image_size, 3], key, maxval=256, dtype=tf.int32
        )
        label = tf.random.stateless_uniform(
            [], key[::-1], maxval=info.num_classes, dtype=tf.int32
        )
        return tf.cast(image, tf.uint8), tf.cast(label, tf.int64)

    def read(split, shuffle_seed=None):
        split_index = int(split == info.test_split)
        return tf.data.Dataset.range(num_examples[split]).map(
            lambda i: example(split_index, i)
        )

    return Source(info, read, num_examples)


def training_dataset(
    source,
    config,
    epoch,
    start,
    steps,
    steps_per_epoch,
    augmentation,
):
    """Batches `start ..< start + steps` of data epoch `epoch`.

    The epoch's order is fixed by (seed, epoch); `start` batches are
    skipped before decoding. Example i of the run (counting across epochs)
    is cropped with the seed (seed, i), batch k is augmented with
    (seed, k). `augmentation` is one of `trainers.augment.AUGMENTATIONS`.
    """
    if augmentation not in augment_lib.AUGMENTATIONS:
        raise ValueError(
            f"Unknown augmentation {augmentation!r}; expected one of "
            f"{list(augment_lib.AUGMENTATIONS)}. Received: "
            f"--augmentation={augmentation}"
        )
    info, seed = source.info, config.seed
    batch_size, size = config.batch_size, config.image_size
    if config.train_examples:
        # The first examples in file order, the same in every epoch.
        dataset = source.read(info.train_split)
        dataset = dataset.take(config.train_examples)
    else:
        dataset = source.read(info.train_split, seed * 100003 + epoch)
    dataset = dataset.shuffle(
        config.shuffle_buffer,
        seed=seed * 100003 + epoch,
        reshuffle_each_iteration=False,
    )
    first = (epoch * steps_per_epoch + start) * batch_size
    dataset = tf.data.Dataset.zip(
        tf.data.Dataset.range(first, first + steps * batch_size),
        dataset.skip(start * batch_size),
    )

    def crop(index, example):
        image, label = example
        if augmentation == "none":
            image = center_crop(image, size)
        else:
            key = tf.stack([tf.constant(seed, tf.int64), index])
            image = random_resized_crop(image, size, key)
        return image, tf.one_hot(label, info.num_classes)

    dataset = dataset.map(
        crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if augmentation not in ("none", "basic"):
        # The crop and the flip are done, per example, above.
        augment = augment_lib.Augmentation(
            augmentation, (size, size, 3), seed=seed, flip=False, crop=False
        )
        first_step = epoch * steps_per_epoch + start
        dataset = tf.data.Dataset.zip(
            tf.data.Dataset.range(first_step, first_step + steps), dataset
        ).map(
            lambda step, batch: (
                augment(
                    batch[0], seed=tf.stack([tf.constant(seed, tf.int64), step])
                ),
                batch[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return dataset.prefetch(tf.data.AUTOTUNE)


def test_dataset(source, batch_size, image_size):
    info = source.info
    return (
        source.read(info.test_split)
        .map(
            lambda x, y: (
                center_crop(x, image_size),
                tf.one_hot(y, info.num_classes),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


class StreamData:
    """A run's streamed data: what `trainers.loop` trains on and reports.

    Attributes:
        name: the tensorflow-datasets name, for the results.
        info: the data set's `trainers.data.datasets.DatasetInfo`.
        shape: the images' shape after cropping, from --image_size.
        source: its `Source`.
        steps_per_epoch: full batches in the training split (or in its
            first --train_examples).
        example_sets: none; the streamed sets hold out no validation split.
    """

    example_sets = {}

    def __init__(self, config, source):
        self.name = source.info.tfds_name
        self.info = source.info
        self.shape = (config.image_size, config.image_size, 3)
        self.source = source
        self._config = config
        examples = source.num_examples[source.info.train_split]
        if config.train_examples:
            examples = min(examples, config.train_examples)
        self.steps_per_epoch = examples // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch_size={config.batch_size} exceeds the "
                f"{examples} training examples."
            )

    def training_batches(self, step, epoch, steps):
        """The batches of steps `step ..< step + steps`, all in `epoch`."""
        return training_dataset(
            self.source,
            self._config,
            epoch,
            step - epoch * self.steps_per_epoch,
            steps,
            self.steps_per_epoch,
            self._config.augmentation,
        )

    def test_batches(self):
        return test_dataset(
            self.source, self._config.batch_size, self._config.image_size
        )


def load(config, info):
    """The `StreamData` of `info` (a `DatasetInfo`) that `config` (a
    `DataConfig`) asks for:
    a prepared tensorflow-datasets copy in --data_dir, or synthetic images."""
    if config.label_noise > 0:
        raise ValueError(
            "The streaming trainers do not add label noise. Received: "
            f"--label_noise={config.label_noise}"
        )
    for name in ("validation_examples", "track_memorization"):
        if getattr(config, name):
            raise ValueError(
                f"The streaming trainers do not support --{name}. Received: "
                f"--{name}={getattr(config, name)}"
            )
    if config.synthetic_data:
        source = synthetic_source(
            info, config.image_size, config.batch_size, config.seed
        )
    else:
        source = tfds_source(info, config.data_dir)
    return StreamData(config, source)
