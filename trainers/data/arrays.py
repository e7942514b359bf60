"""Data held in memory as arrays: the in-memory data sets' input pipeline.

Batches are indexed by their absolute step: data epoch k visits the training
set in the order of a permutation seeded by (seed, k), and the augmentation
of step k is drawn from the seed (seed, k). A resumed run therefore sees
exactly the batches an uninterrupted run would. Validation examples are
held out of the training split and label noise is applied here, where the
labels are arrays.
"""

import collections
import math

import numpy as np
import tensorflow as tf

from trainers.data import augment as augment_lib
from trainers.data import datasets as data_lib


def step_indices(num_examples, batch_size, steps, seed):
    """Example indices of every training step: shape (steps, batch_size)."""
    per_epoch = num_examples // batch_size
    epochs = math.ceil(steps / per_epoch)
    order = [
        np.random.default_rng([seed, epoch]).permutation(num_examples)[
            : per_epoch * batch_size
        ]
        for epoch in range(epochs)
    ]
    return np.concatenate(order).reshape(-1, batch_size)[:steps]


def training_dataset(split, indices, start_step, augment, num_classes, seed=0):
    """Batches for steps `start_step ..`, scaled, augmented and one-hot.

    The augmentation of step k is drawn from the seed (seed, k), so it too
    is the same in a resumed and in an uninterrupted run.
    """
    images = tf.constant(split.images)
    labels = tf.constant(split.labels)

    def batch(step, index):
        x = tf.cast(tf.gather(images, index), tf.float32) / 255.0
        if augment is not None:
            x = augment(x, seed=tf.stack([tf.constant(seed, tf.int64), step]))
        y = tf.one_hot(tf.gather(labels, index), num_classes)
        return x, y

    dataset = tf.data.Dataset.zip(
        tf.data.Dataset.range(start_step, len(indices)),
        tf.data.Dataset.from_tensor_slices(indices[start_step:]),
    )
    dataset = dataset.map(batch, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def test_dataset(split, batch_size, num_classes):
    def scale(x, y):
        return tf.cast(x, tf.float32) / 255.0, tf.one_hot(y, num_classes)

    return (
        tf.data.Dataset.from_tensor_slices((split.images, split.labels))
        .batch(batch_size)
        .map(scale, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def accuracy(model, split, batch_size=1024):
    """Accuracy of `model` (inference mode) on a `Split` of uint8 images."""
    if not len(split.labels):
        return float("nan")
    logits = model.predict(
        split.images.astype(np.float32) / 255.0,
        batch_size=batch_size,
        verbose=0,
    )
    return float(np.mean(np.argmax(logits, axis=-1) == split.labels))


Splits = collections.namedtuple(
    "Splits", ["train", "validation", "test", "info", "flipped"]
)


def in_memory_splits(
    config, dataset_name, datasets_override=None, train_split="train"
):
    """The training, validation and test `Split`s a run trains on.

    The last --validation_examples training examples are held out first,
    then the first --train_examples of the rest are kept, and --label_noise
    is applied to both the training and the validation labels. `flipped`
    marks the training examples whose label the noise changed.
    """
    train, test, info = datasets_override or data_lib.load(
        dataset_name,
        config.data_dir,
        config.synthetic_data,
        train_split=train_split,
    )
    validation = None
    if config.validation_examples:
        held_out = config.validation_examples
        if held_out >= len(train.labels):
            raise ValueError(
                f"--validation_examples={held_out} leaves no training "
                f"examples of the {len(train.labels)} in {dataset_name}."
            )
        validation = data_lib.Split(
            train.images[-held_out:], train.labels[-held_out:]
        )
        train = data_lib.Split(
            train.images[:-held_out], train.labels[:-held_out]
        )
    train_examples = config.train_examples
    if train_examples:
        if train_examples > len(train.labels):
            raise ValueError(
                f"--train_examples={train_examples} exceeds the "
                f"{len(train.labels)} training examples of {dataset_name}."
            )
        train = data_lib.Split(
            train.images[:train_examples], train.labels[:train_examples]
        )
    clean_labels = train.labels
    if config.label_noise > 0:
        noisy, _ = data_lib.add_label_noise(
            train.labels,
            config.label_noise,
            info.num_classes,
            config.seed,
        )
        train = data_lib.Split(train.images, noisy)
        if validation is not None:
            # A user has no clean labels to validate on. Under symmetric
            # noise the expected noisy-label accuracy is an increasing
            # affine function of the clean one, so it ranks models alike.
            noisy, _ = data_lib.add_label_noise(
                validation.labels,
                config.label_noise,
                info.num_classes,
                [config.seed, 1],
            )
            validation = data_lib.Split(validation.images, noisy)
    return Splits(train, validation, test, info, train.labels != clean_labels)


class ArrayData:
    """A run's data as arrays: what `trainers.loop` trains on and reports.

    Attributes:
        name: the data set's name, for the results.
        info: its `trainers.data.datasets.DatasetInfo`.
        shape: the images' shape.
        splits: the `Splits` trained, validated and tested on.
        steps_per_epoch: full batches in the training split.
        example_sets: history key to a measure of the model (validation
            accuracy, and with --track_memorization the accuracy on the
            training examples whose label the noise changed, and on the
            others).
    """

    def __init__(self, config, name, splits, augment):
        self.name = name
        self.info = splits.info
        self.shape = splits.info.shape
        self.splits = splits
        self._augment = augment
        self._batch_size = config.batch_size
        self._seed = config.seed
        train = splits.train
        self.steps_per_epoch = len(train.labels) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch_size={config.batch_size} exceeds the "
                f"{len(train.labels)} training examples."
            )
        sets = {}
        if splits.validation is not None:
            sets["validation_accuracy"] = splits.validation
        if config.track_memorization:
            flipped = splits.flipped
            sets["train_accuracy_flipped"] = data_lib.Split(
                train.images[flipped], train.labels[flipped]
            )
            sets["train_accuracy_unflipped"] = data_lib.Split(
                train.images[~flipped], train.labels[~flipped]
            )
        self.example_sets = {
            key: (lambda model, split=split: accuracy(model, split))
            for key, split in sets.items()
        }

    def training_batches(self, step, epoch, steps):
        """The batches of steps `step ..< step + steps`."""
        del epoch  # the indices of every step say which epoch it is in
        indices = step_indices(
            len(self.splits.train.labels),
            self._batch_size,
            step + steps,
            self._seed,
        )
        return training_dataset(
            self.splits.train,
            indices,
            step,
            self._augment,
            self.info.num_classes,
            seed=self._seed,
        )

    def test_batches(self):
        return test_dataset(
            self.splits.test, self._batch_size, self.info.num_classes
        )


def load(config, dataset_name, datasets_override=None, train_split="train"):
    """The `ArrayData` of `dataset_name` that `config` (a `DataConfig`)
    asks for.

    `datasets_override`, optional `(train, test, info)` arrays, is used
    instead of loading (tests); `train_split` is the tensorflow-datasets
    split to train on.
    """
    splits = in_memory_splits(
        config, dataset_name, datasets_override, train_split
    )
    augment = None
    if config.augmentation != "none":
        augment = augment_lib.Augmentation(
            config.augmentation,
            splits.info.shape,
            seed=config.seed,
            flip=dataset_name not in ("svhn",),
        )
    return ArrayData(config, dataset_name, splits, augment)
