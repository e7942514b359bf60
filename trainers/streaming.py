"""Training on data streamed from tensorflow-datasets: ImageNet, finetuning.

ImageNet and the finetuning data sets do not fit in memory as arrays, so
these trainers read a prepared tensorflow-datasets copy with tf.data:
decode, crop and resize, augment in a parallel `map`, batch (dropping the
remainder, so every step has the same batch size) and prefetch. The model
and `keras_sam.SAMModel` are built inside `strategy.scope()`; checkpoints,
results and the flags are those of `trainers.train`.

Training images get an Inception-style random-resized crop (8 % to 100 % of
the area, aspect ratio 3/4 to 4/3) and a horizontal flip; evaluation images
the central 224/256 of their shorter side, resized to `--image_size` (at
224 pixels: resize to 256, crop 224). --augmentation=none crops training
images like evaluation ones; basic is the random crop and flip; cutout and
randaugment add a square of half the image side or Keras' RandAugment to
each batch; autoaugment_cifar and autoaugment_svhn apply that AutoAugment
policy (`trainers.autoaugment`) to each cropped and flipped image, then the
cutout, as `trainers.augment` does for the in-memory data sets (where the
policy comes before the crop). Images reach the model as float32 in
[0, 1], like everywhere in `trainers`; each model converts them to what its
architecture expects.

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

import collections
import math
import os
import time

import keras
import tensorflow as tf
from absl import flags

from trainers import augment as augment_lib
from trainers import autoaugment
from trainers import flags as trainer_flags
from trainers import models
from trainers import regularization
from trainers import train as train_lib

StreamInfo = collections.namedtuple(
    "StreamInfo", ["tfds_name", "num_classes", "train_split", "test_split"]
)

# keras.applications models: constructor, preprocessing mode of their
# ImageNet weights, dropout of their own classification top.
APPLICATIONS = {
    "resnet50": (keras.applications.ResNet50, "caffe", 0.0),
    "resnet101": (keras.applications.ResNet101, "caffe", 0.0),
    "resnet152": (keras.applications.ResNet152, "caffe", 0.0),
    **{
        f"efficientnetb{i}": (
            getattr(keras.applications, f"EfficientNetB{i}"),
            "efficientnet",
            rate,
        )
        for i, rate in enumerate((0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5))
    },
}
MODELS = sorted(APPLICATIONS) + sorted(models.MODELS)
HEAD = "head"
SYNTHETIC_STEPS_PER_EPOCH = 4
# keras.applications' EfficientNets built with weights="imagenet" rescale
# after their Normalization layer (its weights hold the standard deviations
# as variances); models loading those weights must do the same.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def define_flags(**defaults):
    """Declares the common flags and the streaming ones, each only once.

    `defaults` override `trainers.flags.DEFAULTS`; `model` may name any of
    `MODELS`. Flags already declared in the process (by another trainer, in
    tests) are left as they are.
    """
    if "rho" not in flags.FLAGS:
        trainer_flags.define_common_flags(
            model_names=MODELS,
            model_help="Model: a keras.applications ResNet or EfficientNet, "
            "or a CIFAR-sized model of trainers.models for CPU runs.",
            **{"model": "resnet50", **defaults},
        )
    if "image_size" not in flags.FLAGS:
        flags.DEFINE_integer(
            "image_size",
            224,
            "Height and width, in pixels, of the images the model sees.",
        )
        flags.register_validator(
            "image_size",
            lambda v: v >= 32,
            message="--image_size must be >= 32",
        )
    if "shuffle_buffer" not in flags.FLAGS:
        flags.DEFINE_integer(
            "shuffle_buffer",
            10000,
            "Examples in the shuffle buffer (encoded images, about 110 kB "
            "each on ImageNet), after tensorflow-datasets' file shuffling.",
        )


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
    if not data_dir or not os.path.isdir(data_dir):
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
        except (AssertionError, FileNotFoundError, tf.errors.NotFoundError):
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


@keras.saving.register_keras_serializable("keras_sam_trainers")
class ImagenetPreprocessing(keras.layers.Layer):
    """[0, 1] RGB images to the input of a keras.applications model.

    `mode` is that of `keras.applications.imagenet_utils.preprocess_input`
    ("caffe" for ResNets: BGR, ImageNet means subtracted); "efficientnet"
    only scales to [0, 255], since EfficientNets normalize inside.
    """

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        images = images * 255.0
        if self.mode == "efficientnet":
            return images
        return keras.applications.imagenet_utils.preprocess_input(
            images, mode=self.mode
        )

    def get_config(self):
        return dict(super().get_config(), mode=self.mode)


def load_pretrained(backbone, path):
    """Loads weights of the keras.applications model into `backbone`.

    `backbone` is built without its top. Keras weight files
    (`.weights.h5`, `.keras`) may hold the model with or without its top;
    legacy `.h5` files are loaded in layer order if they hold the model
    without its top (`*_notop.h5`, as keras.applications downloads them)
    and else by layer name, where every weighted layer must be found.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--pretrained_weights={path!r} does not exist."
        )
    if not path.endswith((".h5", ".hdf5", ".keras")):
        raise ValueError(
            "--pretrained_weights must be a .weights.h5, .keras or legacy "
            f".h5 file. Received: --pretrained_weights={path!r}"
        )
    if path.endswith((".weights.h5", ".keras")):
        backbone.load_weights(path)
        return
    try:
        backbone.load_weights(path)
        return
    except ValueError as e:
        if "mismatch" not in str(e):
            raise
    import h5py

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        saved = {
            name.decode() if isinstance(name, bytes) else name
            for name in group.attrs["layer_names"]
        }
    missing = [
        layer.name
        for layer in backbone.layers
        if layer.weights and layer.name not in saved
    ]
    if missing:
        raise ValueError(
            f"--pretrained_weights={path!r} holds no weights for the "
            f"layers {missing[:5]} of {backbone.name}; is it another "
            "architecture?"
        )
    backbone.load_weights(path, by_name=True)


def _after_normalization_rescaled(backbone):
    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.Normalization):
            outputs = keras.layers.Rescaling(
                [1.0 / math.sqrt(s) for s in _IMAGENET_STDDEV_RGB]
            )(outputs)
        return outputs

    return keras.models.clone_model(
        backbone, clone_function=lambda layer: layer, call_function=call
    )


def build_model(
    name,
    image_size,
    num_classes,
    weight_decay=0.0,
    pretrained_weights=None,
    freeze_batchnorm=False,
):
    """A classifier of [0, 1] images: `name`'s features and a new head.

    keras.applications models are built with `weights=None` and without
    their top; `pretrained_weights` (a local file, never a download) is
    loaded into those features, as keras.applications would with
    `weights="imagenet"`, and the top is rebuilt for `num_classes` as the
    layer `HEAD` (with the architecture's dropout before it).
    `freeze_batchnorm` makes every BatchNormalization layer non-trainable,
    which in Keras 3 also runs it on its moving statistics. Weight decay
    is the L2 term of `trainers.models` on every kernel.
    """
    shape = (image_size, image_size, 3)
    if name in APPLICATIONS:
        application, mode, dropout = APPLICATIONS[name]
        backbone = application(
            include_top=False, weights=None, input_shape=shape, pooling="avg"
        )
        if pretrained_weights:
            load_pretrained(backbone, pretrained_weights)
            if mode == "efficientnet":
                backbone = _after_normalization_rescaled(backbone)
        inputs = keras.Input(shape)
        features = backbone(ImagenetPreprocessing(mode)(inputs))
        if dropout:
            features = keras.layers.Dropout(dropout)(features)
        outputs = keras.layers.Dense(num_classes, name=HEAD)(features)
        model = keras.Model(inputs, outputs, name=name)
    elif pretrained_weights:
        raise ValueError(
            "--pretrained_weights needs a keras.applications model "
            f"({', '.join(sorted(APPLICATIONS))}). Received: --model={name}"
        )
    else:
        model = models.build(name, shape, num_classes)
    if freeze_batchnorm:
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    if weight_decay:
        regularizer = regularization.weight_decay_regularizer(weight_decay)
        for variable in model.trainable_weights:
            if variable.name.endswith("kernel"):
                variable.regularizer = regularizer
    return model


def training_dataset(
    source,
    flags_obj,
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
    info, seed = source.info, flags_obj.seed
    batch_size, size = flags_obj.batch_size, flags_obj.image_size
    if flags_obj.train_examples:
        # The first examples in file order, the same in every epoch.
        dataset = source.read(info.train_split)
        dataset = dataset.take(flags_obj.train_examples)
    else:
        dataset = source.read(info.train_split, seed * 100003 + epoch)
    dataset = dataset.shuffle(
        flags_obj.shuffle_buffer,
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
    policy = augment_lib.AUTOAUGMENT_POLICIES.get(augmentation)
    if augmentation in ("cutout", "randaugment") or policy:
        randaugment = None
        if augmentation == "randaugment":
            randaugment = keras.layers.RandAugment(
                value_range=(0.0, 1.0), seed=seed
            )
        first_step = epoch * steps_per_epoch + start

        def augment(step, batch):
            images, labels = batch
            if randaugment is not None:
                images = randaugment(images, training=True)
                return tf.clip_by_value(images, 0.0, 1.0), labels
            key = tf.stack([tf.constant(seed, tf.int64), step])
            if policy:
                key, policy_key = tf.unstack(
                    tf.random.experimental.stateless_split(key, 2)
                )
                images = autoaugment.autoaugment(images, policy, policy_key)
            return augment_lib.cutout(images, size // 2, seed=key), labels

        dataset = tf.data.Dataset.zip(
            tf.data.Dataset.range(first_step, first_step + steps), dataset
        ).map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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


def run(
    flags_obj,
    info,
    strategy_override=None,
    pretrained_weights=None,
    freeze_batchnorm=False,
):
    """Trains `flags_obj.model` on the streamed data set `info`; as
    `trainers.train.run`, returns the results it writes to `results.json`.

    Args:
        flags_obj: the parsed flags (`absl.flags.FLAGS` or any object with
            the same attributes), including `image_size` and
            `shuffle_buffer`.
        info: the `StreamInfo` of the data set.
        strategy_override: optional tf.distribute strategy (tests).
        pretrained_weights: optional local weight file of the
            keras.applications model (see `load_pretrained`).
        freeze_batchnorm: whether BatchNorm layers are not trained.
    """
    start_time = time.time()
    strategy, settings = train_lib.prepare(flags_obj, strategy_override)
    if flags_obj.label_noise > 0:
        raise ValueError(
            "The streaming trainers do not add label noise. Received: "
            f"--label_noise={flags_obj.label_noise}"
        )
    for name in ("validation_examples", "track_memorization"):
        if getattr(flags_obj, name, None):
            raise ValueError(
                f"The streaming trainers do not support --{name}. Received: "
                f"--{name}={getattr(flags_obj, name)}"
            )
    if flags_obj.synthetic_data:
        source = synthetic_source(
            info, flags_obj.image_size, flags_obj.batch_size, flags_obj.seed
        )
    else:
        source = tfds_source(info, flags_obj.data_dir)
    with train_lib.precision_policy(settings["policy"]):
        return _train(
            flags_obj,
            source,
            strategy,
            settings,
            pretrained_weights,
            freeze_batchnorm,
            start_time,
        )


def _train(
    flags_obj,
    source,
    strategy,
    settings,
    pretrained_weights,
    freeze_batchnorm,
    start_time,
):
    info = source.info
    train_examples = source.num_examples[info.train_split]
    if flags_obj.train_examples:
        train_examples = min(train_examples, flags_obj.train_examples)
    steps_per_epoch = train_examples // flags_obj.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch_size={flags_obj.batch_size} exceeds the "
            f"{train_examples} training examples."
        )
    total_steps = flags_obj.train_steps or flags_obj.epochs * steps_per_epoch
    base, model = train_lib.build_sam_model(
        flags_obj,
        strategy,
        settings,
        lambda: build_model(
            flags_obj.model,
            flags_obj.image_size,
            info.num_classes,
            flags_obj.weight_decay,
            pretrained_weights,
            freeze_batchnorm,
        ),
        total_steps,
    )

    def train_data(step, epoch, steps):
        return training_dataset(
            source,
            flags_obj,
            epoch,
            step - epoch * steps_per_epoch,
            steps,
            steps_per_epoch,
            flags_obj.augmentation,
        )

    return train_lib.fit_and_report(
        flags_obj,
        strategy,
        base,
        model,
        info.tfds_name,
        steps_per_epoch,
        total_steps,
        train_data,
        test_dataset(source, flags_obj.batch_size, flags_obj.image_size),
        start_time,
    )
