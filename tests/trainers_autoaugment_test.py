"""AutoAugment: the published policies, PIL's operations, stateless draws."""

import numpy as np
import pytest
import tensorflow as tf

from tests import backends
from trainers.data import augment
from trainers.data import autoaugment

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only

Image = pytest.importorskip("PIL.Image")
ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
ImageOps = pytest.importorskip("PIL.ImageOps")

GREY = (128, 128, 128)


def uint8_images(batch=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8)
    # Low-contrast images, for AutoContrast and Equalize to act on.
    images[: batch // 2] = images[: batch // 2] // 4 + 60
    return images


def with_pil(images, function):
    return np.stack(
        [np.asarray(function(Image.fromarray(image))) for image in images]
    )


def pil_reference(name, magnitude, sign):
    """The operation as the AutoAugment code runs it on PIL images."""
    level = magnitude / autoaugment.MAX_MAGNITUDE
    factor = 1 + 0.9 * level * sign
    shear = 0.3 * level * sign
    pixels = int(150 / 331 * 32 * level * sign)

    def affine(*coefficients):
        return lambda i: i.transform(
            i.size, Image.AFFINE, coefficients, fillcolor=GREY
        )

    return {
        "ShearX": affine(1, shear, 0, 0, 1, 0),
        "ShearY": affine(1, 0, 0, shear, 1, 0),
        "TranslateX": affine(1, 0, pixels, 0, 1, 0),
        "TranslateY": affine(1, 0, 0, 0, 1, pixels),
        "Rotate": lambda i: i.rotate(30 * level * sign, fillcolor=GREY),
        "AutoContrast": ImageOps.autocontrast,
        "Equalize": ImageOps.equalize,
        "Invert": ImageOps.invert,
        "Posterize": lambda i: ImageOps.posterize(i, 8 - round(4 * level)),
        "Solarize": lambda i: ImageOps.solarize(i, 256 * (1 - level)),
        "Color": lambda i: ImageEnhance.Color(i).enhance(factor),
        "Contrast": lambda i: ImageEnhance.Contrast(i).enhance(factor),
        "Brightness": lambda i: ImageEnhance.Brightness(i).enhance(factor),
        "Sharpness": lambda i: ImageEnhance.Sharpness(i).enhance(factor),
    }[name]


# Levels of 255 by which an operation may differ from PIL's: the blends
# and AutoContrast are not rounded to 8 bits.
TOLERANCE = {"AutoContrast": 1.0}
TOLERANCE.update(dict.fromkeys(["Color", "Contrast", "Brightness"], 1.5))
TOLERANCE["Sharpness"] = 1.5


@pytest.mark.parametrize("name", autoaugment.OPERATIONS)
def test_every_operation_gives_pil_result_at_low_and_high_magnitudes(name):
    images = uint8_images()
    for magnitude in (3, 9):
        for sign in (1, -1):
            got = autoaugment.apply_operation(
                images.astype(np.float32) / 255,
                name,
                tf.fill([len(images)], float(magnitude)),
                tf.fill([len(images)], float(sign)),
            )
            expected = with_pil(images, pil_reference(name, magnitude, sign))
            np.testing.assert_allclose(
                got.numpy() * 255,
                expected,
                atol=TOLERANCE.get(name, 1e-3),
                err_msg=f"{name} at magnitude {magnitude}, sign {sign}",
            )


@pytest.mark.parametrize("name", autoaugment.OPERATIONS)
def test_every_operation_at_its_maximum_magnitude_keeps_shape_and_range(name):
    images = tf.random.stateless_uniform((8, 32, 32, 3), (1, 2))
    signs = tf.constant([1.0, -1.0] * 4)
    out = autoaugment.apply_operation(images, name, tf.fill([8], 9.0), signs)
    assert out.shape == images.shape and out.dtype == tf.float32
    assert not np.any(np.isnan(out))
    assert 0.0 <= float(tf.reduce_min(out)) <= float(tf.reduce_max(out)) <= 1


@pytest.mark.parametrize("policy", ["cifar10", "svhn"])
def test_policy_tables_have_25_sub_policies_of_two_operations(policy):
    table = autoaugment.POLICIES[policy]
    assert len(table) == 25
    for sub_policy in table:
        assert len(sub_policy) == 2
        for name, probability, magnitude in sub_policy:
            assert name in autoaugment.OPERATIONS
            assert 0.0 <= probability <= 1.0
            assert magnitude is None or 0 <= magnitude <= 9
    # Spot checks against the paper's appendix.
    first = {"cifar10": ("Invert", 0.1, None), "svhn": ("ShearX", 0.9, 4)}
    assert table[0][0] == first[policy]


@pytest.mark.parametrize("policy", ["cifar10", "svhn"])
def test_autoaugment_keeps_shape_dtype_and_range(policy):
    images = tf.random.stateless_uniform((64, 32, 32, 3), (3, 4))
    out = autoaugment.autoaugment(images, policy, seed=(5, 6))
    assert out.shape == images.shape and out.dtype == tf.float32
    assert not np.any(np.isnan(out))
    assert float(tf.reduce_min(out)) >= 0.0
    assert float(tf.reduce_max(out)) <= 1.0


def test_autoaugment_is_a_function_of_its_seed_with_a_draw_per_image():
    images = np.repeat(uint8_images(1)[:1] / 255, 64, axis=0)
    images = images.astype(np.float32)

    def at(step):
        seed = tf.constant([7, step], tf.int64)
        return autoaugment.autoaugment(images, "cifar10", seed).numpy()

    np.testing.assert_array_equal(at(3), at(3))
    assert not np.array_equal(at(3), at(4))
    # One image, 64 copies: each copy draws its own sub-policy.
    assert len({out.tobytes() for out in at(3)}) > 16


def _outcomes(policy, value, images=4000):
    # Constant 8-bit images, one value per image after the policy.
    batch = np.full((images, 4, 4, 3), value / 255, np.float32)
    out = autoaugment.autoaugment(batch, policy, seed=(2, 9)).numpy()
    levels = np.round(out[:, 0, 0, 0] * 255).astype(int)
    values, counts = np.unique(levels, return_counts=True)
    return dict(zip(values.tolist(), (counts / images).tolist()))


def test_each_sub_policy_is_drawn_alike_with_its_magnitudes():
    # Level 51 = 0b110011: Posterize keeps 4 bits at magnitude 9 (48),
    # 7 at magnitude 2 (50), 8 at magnitude 0 (51); Invert gives 204.
    policy = (
        (("Invert", 1.0, None),),
        (("Posterize", 1.0, 9),),
        (("Posterize", 1.0, 2),),
        (("Posterize", 1.0, 0),),
    )
    drawn = _outcomes(policy, 51)
    assert sorted(drawn) == [48, 50, 51, 204]
    for share in drawn.values():
        assert share == pytest.approx(0.25, abs=0.03)


def test_operations_apply_with_their_probabilities_signs_and_in_order():
    # Level 51: Invert (p = 0.3) first gives 204, then Brightness at
    # magnitude 9 scales by 1 ± 0.9, the sign drawn per image: 255 (clipped)
    # or 20.4; not inverted, 96.9 or 5.1. In the other order 158 or 250.
    policy = ((("Invert", 0.3, None), ("Brightness", 1.0, 9)),)
    drawn = _outcomes(policy, 51)
    assert sorted(drawn) == [5, 20, 97, 255]
    expected = {255: 0.15, 20: 0.15, 97: 0.35, 5: 0.35}
    for level, share in expected.items():
        assert drawn[level] == pytest.approx(share, abs=0.03)


def test_autoaugment_in_tf_data_without_a_seed_draws_afresh():
    images = np.full((32, 8, 8, 3), 0.25, np.float32)
    dataset = tf.data.Dataset.from_tensors(images).repeat(2)
    first, second = dataset.map(
        lambda x: autoaugment.autoaugment(x, "svhn")
    ).take(2)
    assert not np.array_equal(first, second)


def test_unknown_policy_is_rejected():
    with pytest.raises(
        ValueError, match="Unknown AutoAugment policy 'imagenet'"
    ):
        autoaugment.autoaugment(np.zeros((1, 8, 8, 3), np.float32), "imagenet")


@pytest.mark.parametrize("name", ["autoaugment_cifar", "autoaugment_svhn"])
def test_autoaugment_names_are_step_seeded_and_keep_the_range(name):
    assert name in augment.AUGMENTATIONS
    augmentation = augment.Augmentation(name, (32, 32, 3))
    images = tf.random.stateless_uniform((32, 32, 32, 3), (8, 9))

    def at(step):
        seed = tf.constant([7, step], tf.int64)
        return augmentation(images, seed=seed).numpy()

    np.testing.assert_array_equal(at(3), at(3))
    assert not np.array_equal(at(3), at(4))
    out = at(3)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # The cutout: a 16x16 square of zeros (clipped at the border) per image.
    assert np.all(np.sum(np.all(out == 0, axis=-1), axis=(1, 2)) >= 64)
    assert augmentation(images, training=False) is images
