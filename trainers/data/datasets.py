"""Data for the trainers: IDX Fashion-MNIST, tensorflow-datasets, synthetic.

Every loader returns `Split` arrays (uint8 images HWC, int32 labels) for
the training and the test set (`trainers.data.arrays` builds the input
pipelines). Data sets small enough for memory (all the paper's except
ImageNet) are loaded as arrays, which makes label noise and exact resumption
simple.
"""

import collections
import gzip
import os

import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

Split = collections.namedtuple("Split", ["images", "labels"])
# A data set, in memory or streamed: `shape` is None for streamed sets
# (their images are resized to --image_size), `tfds_name` None for those
# read from elsewhere, and the splits are tensorflow-datasets'.
DatasetInfo = collections.namedtuple(
    "DatasetInfo",
    ["name", "shape", "num_classes", "tfds_name", "train_split", "test_split"],
    defaults=("train", "test"),
)

DATASETS = {
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), 10, None),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, "cifar10"),
    "cifar100": DatasetInfo("cifar100", (32, 32, 3), 100, "cifar100"),
    "svhn": DatasetInfo("svhn", (32, 32, 3), 10, "svhn_cropped"),
}
# Streamed sets: ImageNet, and the finetuning targets of the paper's Table 3.
IMAGENET = DatasetInfo(
    "imagenet2012", None, 1000, "imagenet2012", "train", "validation"
)
FINETUNING = {
    name: DatasetInfo(name, None, classes, name, train_split, test_split)
    for name, classes, train_split, test_split in (
        ("oxford_flowers102", 102, "train+validation", "test"),
        ("cars196", 196, "train", "test"),
        ("oxford_iiit_pet", 37, "train", "test"),
        ("cifar10", 10, "train", "test"),
        ("cifar100", 100, "train", "test"),
        ("food101", 101, "train", "validation"),
        ("stanford_dogs", 120, "train", "test"),
        ("caltech_birds2011", 200, "train", "test"),
    )
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path):
    """Reads an IDX file (gzip or plain) into a NumPy array.

    The format: two zero bytes, a dtype code, the number of dimensions,
    then one big-endian uint32 per dimension and the data.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"Cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype = _IDX_DTYPES.get(data[2])
    if dtype is None:
        raise ValueError(f"{path}: unsupported IDX data type 0x{data[2]:02x}.")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but the "
            f"file holds {len(data) - header} bytes of data."
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def load_fashion_mnist_idx(data_dir):
    """Fashion-MNIST from the four IDX files in `data_dir`."""
    where = f"--data_dir={data_dir!r}"
    if not data_dir:
        data_dir = DEBIAN_FASHION_MNIST
        where = f"{data_dir!r} (no --data_dir given)"
    missing = [
        name
        for pair in _IDX_FILES.values()
        for name in pair
        if not os.path.exists(os.path.join(data_dir, name))
    ]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {where} lacks "
            f"{', '.join(missing)}. Install Debian's package "
            "(apt-get update && apt-get install dataset-fashion-mnist, which "
            f"puts them in {DEBIAN_FASHION_MNIST}) or pass --data_dir=<dir "
            "holding the four IDX .gz files>."
        )
    splits = {}
    for split, (images, labels) in _IDX_FILES.items():
        x = read_idx(os.path.join(data_dir, images))
        y = read_idx(os.path.join(data_dir, labels)).astype(np.int32)
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(
                f"{data_dir}: {images} has shape {x.shape} but {labels} has "
                f"{len(y)} labels."
            )
        splits[split] = Split(x[..., None], y)
    return splits["train"], splits["test"]


def load_tfds(tfds_name, data_dir, train_split="train", test_split="test"):
    """A prepared tensorflow-datasets copy, as arrays. Never downloads."""
    # Imported here: the rest of the module serves JAX-only machines.
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown tensorflow-datasets name {tfds_name!r}."
        ) from e

    def as_arrays(split):
        try:
            dataset = builder.as_dataset(split=split, as_supervised=True)
            batches = list(tfds.as_numpy(dataset.batch(16384)))
        except (
            AssertionError,
            FileNotFoundError,
            KeyError,  # an empty version folder: no splits
            tf.errors.NotFoundError,
        ):
            raise FileNotFoundError(
                f"No prepared tensorflow-datasets copy of {tfds_name!r} in "
                f"--data_dir={data_dir!r} (looked in {builder.data_dir}). "
                "Prepare it on a machine with internet access (tfds build "
                f"{tfds_name} --data_dir=<dir>) and copy the directory here, "
                "or use --synthetic_data."
            ) from None
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return Split(x.astype(np.uint8), y.astype(np.int32))

    return as_arrays(train_split), as_arrays(test_split)


def synthetic(info, train_size, test_size, seed=0):
    """Random images and labels with the data set's shapes and classes."""
    rng = np.random.default_rng(seed)

    def split(n):
        return Split(
            rng.integers(0, 256, (n, *info.shape), dtype=np.uint8),
            rng.integers(0, info.num_classes, n).astype(np.int32),
        )

    return split(train_size), split(test_size)


def load(
    name,
    data_dir=None,
    synthetic_data=False,
    synthetic_size=512,
    train_split="train",
):
    """(train, test, info) for a data set named in `DATASETS`.

    `train_split` is the tensorflow-datasets split to train on, e.g.
    "train+extra" for SVHN.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}."
        )
    info = DATASETS[name]
    if synthetic_data:
        train, test = synthetic(info, synthetic_size, synthetic_size // 4)
    elif name == "fashion_mnist" and not _is_tfds_dir(
        data_dir, "fashion_mnist"
    ):
        train, test = load_fashion_mnist_idx(data_dir)
    else:
        if not is_directory(data_dir):
            raise FileNotFoundError(
                f"--data_dir={data_dir!r} is not a directory; it must hold a "
                "prepared tensorflow-datasets copy of "
                f"{info.tfds_name or name}."
            )
        train, test = load_tfds(info.tfds_name or name, data_dir, train_split)
    check_labels(train.labels, info.num_classes, "training")
    check_labels(test.labels, info.num_classes, "test")
    return train, test, info


def _is_tfds_dir(data_dir, tfds_name):
    return bool(data_dir) and is_directory(os.path.join(data_dir, tfds_name))


def is_directory(path):
    """Whether `path` names a directory: a local path, or a URL that
    TensorFlow's file systems read (`gs://` on a TPU VM), as
    tensorflow-datasets reads its `data_dir`."""
    if not path:
        return False
    if "://" not in path:
        return os.path.isdir(path)
    import tensorflow as tf

    return tf.io.gfile.isdir(path)


def check_labels(labels, num_classes, what):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(
            f"{what} labels must lie in [0, {num_classes}); found label {bad}."
        )


def add_label_noise(labels, fraction, num_classes, seed):
    """Replaces `fraction` of the labels by uniformly random classes.

    Exactly `round(fraction · n)` examples, chosen at random, get a label
    drawn uniformly from all classes (so about 1/num_classes of them keep
    their label, as in the paper's protocol). Returns the new labels and
    the indices that were resampled.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"label_noise must lie in [0, 1]. Received: label_noise={fraction}"
        )
    rng = np.random.default_rng(seed)
    noisy = np.array(labels, copy=True)
    count = int(round(fraction * len(labels)))
    chosen = rng.choice(len(labels), count, replace=False)
    noisy[chosen] = rng.integers(0, num_classes, count)
    return noisy, chosen
