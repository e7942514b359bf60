"""Augmentation: per-image draws, the paper's crop, step-keyed seeds."""

import numpy as np
import pytest
import tensorflow as tf

from tests import backends
from trainers.data import augment

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only

PAD = 4


def ramp_images(batch=256, size=28):
    """Every pixel holds a distinct value, so a crop's offset is readable."""
    image = np.arange(size * size, dtype=np.float32).reshape(size, size)
    image /= image.max()
    return np.repeat(image[None, :, :, None], batch, axis=0)


def reference_crop(image, top, left):
    padded = np.pad(image, [(PAD, PAD), (PAD, PAD), (0, 0)], mode="reflect")
    return padded[top : top + image.shape[0], left : left + image.shape[1]]


def test_random_crop_gives_each_image_its_own_reflect_padded_window():
    # Keras' RandomCrop draws one offset per batch; the paper crops each
    # example on its own.
    images = ramp_images()
    out = augment.random_crop(images, PAD, seed=(1, 2)).numpy()
    offsets = set()
    for got in out:
        for top in range(2 * PAD + 1):
            for left in range(2 * PAD + 1):
                if np.array_equal(got, reference_crop(images[0], top, left)):
                    offsets.add((top, left))
                    break
            else:
                continue
            break
        else:
            pytest.fail("a crop is no window of the reflect-padded image")
    assert len(offsets) > 60  # of 81 possible, over 256 images
    # Every shift, 0 … 2·PAD, in each direction.
    for axis in (0, 1):
        assert {offset[axis] for offset in offsets} == set(range(2 * PAD + 1))


def test_random_flip_mirrors_about_half_of_the_images():
    images = ramp_images()
    out = augment.random_flip(images, seed=(3, 4)).numpy()
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    unchanged = np.all(out == images, axis=(1, 2, 3))
    assert np.all(mirrored | unchanged)
    assert 0.4 < mirrored.mean() < 0.6


def test_cutout_squares_are_independent_in_rows_and_columns_in_tf_data():
    # Two stateful draws with one op seed inside a tf.data function yield
    # the same numbers: every square then sat on the diagonal.
    images = np.ones((256, 28, 28, 1), np.float32)
    dataset = tf.data.Dataset.from_tensors(images).map(
        lambda x: augment.cutout(x, 6)
    )
    out = next(iter(dataset)).numpy()[..., 0]
    centres = np.array([np.argwhere(image == 0).mean(axis=0) for image in out])
    assert abs(np.corrcoef(centres.T)[0, 1]) < 0.2
    assert len({tuple(c) for c in centres}) > 100


def test_cutout_zeroes_a_size_by_size_square_when_it_fits():
    images = np.ones((512, 28, 28, 1), np.float32)
    out = augment.cutout(images, 6, seed=(5, 6)).numpy()[..., 0]
    for image in out:
        rows, cols = np.nonzero(image == 0)
        assert rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6
        assert len(rows) == (rows.max() - rows.min() + 1) * (
            cols.max() - cols.min() + 1
        )
    zeros = (out == 0).sum(axis=(1, 2))
    assert zeros.max() == 36
    assert np.mean(zeros == 36) > 0.5
    # The centre c is uniform over the 28 rows (and columns); the square's
    # c − 3 … c + 2 reach the first for c ≤ 3, the last for c ≥ 25.
    for axis in (1, 2):
        cut = np.any(out == 0, axis=axis)
        assert np.mean(cut[:, 0]) == pytest.approx(4 / 28, abs=0.04)
        assert np.mean(cut[:, -1]) == pytest.approx(3 / 28, abs=0.04)


@pytest.mark.parametrize("name", ["basic", "cutout"])
def test_augmentation_is_a_function_of_its_step_seed(name):
    augmentation = augment.Augmentation(name, (28, 28, 1))
    images = ramp_images(batch=32)

    def at(step):
        seed = tf.constant([7, step], tf.int64)
        return augmentation(images, seed=seed).numpy()

    np.testing.assert_array_equal(at(3), at(3))
    assert not np.array_equal(at(3), at(4))


@pytest.mark.parametrize("name", ["basic", "cutout", "randaugment"])
def test_augmentation_keeps_shape_dtype_and_range(name):
    images = tf.random.uniform((8, 32, 32, 3), seed=1)
    out = augment.Augmentation(name, (32, 32, 3), seed=0)(images)
    assert out.shape == images.shape and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0
    assert float(tf.reduce_max(out)) <= 1.0
    assert not np.allclose(out.numpy(), images.numpy())


def test_cutout_zeroes_at_most_one_square_per_image():
    images = tf.ones((64, 28, 28, 1))
    out = augment.cutout(images, 8, seed=0).numpy()
    zeros = (out == 0).reshape(64, -1).sum(axis=1)
    assert zeros.max() == 64 and zeros.min() > 0
    assert np.mean(zeros == 64) > 0.3  # most squares fall fully inside


def test_unknown_augmentation_is_rejected():
    with pytest.raises(ValueError, match="Unknown augmentation 'mixup'"):
        augment.Augmentation("mixup", (32, 32, 3))


def test_no_augmentation_and_evaluation_return_the_images():
    images = ramp_images(batch=4)
    assert augment.Augmentation("none", (28, 28, 1))(images) is images
    basic = augment.Augmentation("basic", (28, 28, 1))
    assert basic(images, training=False) is images


def test_without_flip_no_image_is_mirrored():
    images = ramp_images(batch=64, size=8)
    out = augment.Augmentation("basic", (8, 8, 1), flip=False, pad=0)(images)
    np.testing.assert_array_equal(out, images)
