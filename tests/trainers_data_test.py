"""Trainer data: IDX parsing, real Fashion-MNIST, tfds, noise, augmentation."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests import backends
from trainers.data import datasets

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only


def write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trips_gzip_and_plain(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / "a.gz"), array)
    write_idx(str(tmp_path / "a"), array, compress=False)
    np.testing.assert_array_equal(
        datasets.read_idx(str(tmp_path / "a.gz")), array
    )
    np.testing.assert_array_equal(datasets.read_idx(str(tmp_path / "a")), array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01x")
    with pytest.raises(ValueError, match="bad magic"):
        datasets.read_idx(str(tmp_path / "bad"))
    write_idx(str(tmp_path / "t"), np.zeros((4, 2)), compress=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(4, 2\) \(8 bytes\).*7"):
        datasets.read_idx(str(tmp_path / "t"))


def test_missing_fashion_mnist_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        datasets.load("fashion_mnist", data_dir=str(tmp_path))
    assert str(tmp_path) in str(e.value)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)


@pytest.mark.skipif(
    not os.path.isdir(datasets.DEBIAN_FASHION_MNIST),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_has_the_published_sizes_and_balance():
    train, test, info = datasets.load("fashion_mnist")
    assert train.images.shape == (60000, 28, 28, 1)
    assert test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.images.dtype == np.uint8 and train.images.max() == 255
    assert info.num_classes == 10


def test_tfds_copy_is_read_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        train, test, info = datasets.load("cifar100", data_dir=str(tmp_path))
    assert train.images.shape == (12, 32, 32, 3)
    assert test.images.shape == (12, 32, 32, 3)
    assert train.labels.max() < 100 and info.num_classes == 100


def test_a_url_data_dir_is_read_through_tensorflows_file_systems(tmp_path):
    # As `gs://` on a TPU VM; `file://` is the URL this machine reads.
    url = "file://" + str(tmp_path)
    with tfds.testing.mock_data(num_examples=12):
        train, _, _ = datasets.load("cifar10", data_dir=url)
    assert train.images.shape == (12, 32, 32, 3)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        datasets.load("cifar10", data_dir=url + "/nope")


def test_missing_tfds_copy_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="No prepared.*cifar10"):
        datasets.load("cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        datasets.load("cifar10", data_dir=str(tmp_path / "nope"))
    # A version folder that was never filled (tfds' KeyError had come as a
    # traceback).
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No prepared.*cifar10"):
        datasets.load("cifar10", data_dir=str(tmp_path))


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 10\); found label 12"):
        datasets.check_labels(np.array([0, 3, 12]), 10, "training")


@pytest.mark.parametrize("fraction", [0.2, 0.8])
def test_label_noise_resamples_exactly_the_requested_fraction(fraction):
    labels = np.repeat(np.arange(10), 500)
    noisy, chosen = datasets.add_label_noise(labels, fraction, 10, seed=3)
    assert len(chosen) == int(round(fraction * len(labels)))
    assert len(np.unique(chosen)) == len(chosen)
    untouched = np.setdiff1d(np.arange(len(labels)), chosen)
    np.testing.assert_array_equal(noisy[untouched], labels[untouched])
    # Uniform resampling keeps the true label with probability 1/10.
    changed = np.mean(noisy[chosen] != labels[chosen])
    assert abs(changed - 0.9) < 0.03
    # Every class is drawn alike: drawing all but the last would change
    # 90 % of them too.
    drawn = np.bincount(noisy[chosen], minlength=10) / len(chosen)
    np.testing.assert_allclose(drawn, 0.1, atol=0.03)
    again, _ = datasets.add_label_noise(labels, fraction, 10, seed=3)
    np.testing.assert_array_equal(again, noisy)


def test_label_noise_rejects_a_fraction_outside_zero_one():
    with pytest.raises(ValueError, match="label_noise=1.5"):
        datasets.add_label_noise(np.zeros(4, int), 1.5, 10, seed=0)
