"""The streaming trainers: ImageNet and finetuning, tf.data from tfds."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests import backends
from tests.distribute_test import mirrored
from tests.trainers_run_test import make_flags as make_common_flags
from tests.trainers_run_test import run_killed_after_step
from trainers import finetune
from trainers import imagenet
from trainers import loop
from trainers import models
from trainers.data import augment
from trainers.data import autoaugment
from trainers.data import config
from trainers.data import datasets
from trainers.data import stream
from trainers.models import applications

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_flags(output_dir, **overrides):
    """The common test flags plus the streaming trainers' own, small."""
    values = vars(make_common_flags(output_dir))
    values.update(
        batch_size=8,
        image_size=32,
        shuffle_buffer=64,
        model="small_cnn",
        augmentation="basic",
        dataset="oxford_flowers102",
        pretrained_weights=None,
        freeze_batchnorm=True,
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_random_resized_crop_is_seeded_sized_and_in_range():
    image = tf.cast(
        tf.random.stateless_uniform(
            [50, 70, 3], [1, 2], maxval=256, dtype=tf.int32
        ),
        tf.uint8,
    )
    seed = tf.constant([0, 5], tf.int64)
    a = stream.random_resized_crop(image, 32, seed)
    b = stream.random_resized_crop(image, 32, seed)
    c = stream.random_resized_crop(image, 32, tf.constant([0, 6], tf.int64))
    assert a.shape == (32, 32, 3) and a.dtype == tf.float32
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())
    assert 0.0 <= float(tf.reduce_min(a)) and float(tf.reduce_max(a)) <= 1.0


def test_center_crop_keeps_the_central_224_of_256():
    # Column index as the value: the crop of a 256x320 image keeps columns
    # 48 .. 271 (the central 224 of the 256-pixel shorter side).
    columns = tf.range(320, dtype=tf.float32)[None, :, None]
    image = tf.cast(tf.broadcast_to(columns, [256, 320, 3]) / 2, tf.uint8)
    crop = stream.center_crop(image, 224).numpy() * 255
    np.testing.assert_allclose(crop[0, :, 0], np.arange(48, 272) // 2, atol=1)


def test_random_resized_crops_span_the_inception_areas_aspects_and_flips():
    # Each pixel holds its row (channel 0) and column (channel 1), so the
    # crop's extent and direction can be read from the resized image.
    rows, columns = np.meshgrid(np.arange(200), np.arange(240), indexing="ij")
    image = tf.constant(
        np.stack([rows, columns, np.zeros_like(rows)], -1), tf.uint8
    )
    areas, aspects, flips = [], [], []
    for i in range(200):
        crop = stream.random_resized_crop(
            image, 16, tf.constant([7, i], tf.int64)
        ).numpy()
        crop *= 255
        height = crop[-1, 0, 0] - crop[0, 0, 0] + 1
        width = abs(crop[0, -1, 1] - crop[0, 0, 1]) + 1
        areas.append(height * width / (200 * 240))
        aspects.append(width / height)
        flips.append(crop[0, -1, 1] < crop[0, 0, 1])
    # Read back from 16 resized pixels: ± a pixel of the crop each way.
    assert 0.07 < min(areas) < 0.2 and max(areas) > 0.8
    assert 0.7 < min(aspects) < 0.85 and 1.2 < max(aspects) < 1.45
    assert 0.4 < np.mean(flips) < 0.6


def _indexed_source(examples=32, classes=32):
    # Example i has label i and a random image of its own.
    info = datasets.DatasetInfo("indexed", None, classes, "indexed")
    images = tf.random.stateless_uniform(
        [examples, 40, 48, 3], [4, 2], maxval=256, dtype=tf.int32
    )
    images = tf.cast(images, tf.uint8)

    def read(split, shuffle_seed=None):
        return tf.data.Dataset.from_tensor_slices(
            (images, tf.range(examples, dtype=tf.int64))
        )

    return stream.Source(info, read, {"train": examples}), images


def test_each_data_epoch_visits_every_example_once_in_its_own_order(
    tmp_path,
):
    source, images = _indexed_source()
    data_config = config.DataConfig.from_flags(make_flags(tmp_path, seed=3))

    def batches(epoch, start, steps, augmentation="none"):
        return list(
            stream.training_dataset(
                source, data_config, epoch, start, steps, 4, augmentation
            )
        )

    def order(parts):
        return np.concatenate([np.argmax(y, -1) for _, y in parts])

    epochs = [order(batches(epoch, 0, 4)) for epoch in (0, 1)]
    for visited in epochs:
        np.testing.assert_array_equal(np.sort(visited), np.arange(32))
    assert (epochs[0] != epochs[1]).mean() > 0.5
    # A resumed epoch skips its first batch and continues as it would.
    resumed = batches(1, 1, 2, augmentation="basic")
    np.testing.assert_array_equal(order(resumed), epochs[1][8:24])
    # Each crop is drawn from (seed, i), i counting examples across epochs.
    for position, example in enumerate(epochs[1][8:24]):
        got = resumed[position // 8][0][position % 8]
        want = stream.random_resized_crop(
            images[example], 32, tf.constant([3, 32 + 8 + position], tf.int64)
        )
        np.testing.assert_allclose(got, want, atol=1e-6)

    few = dataclasses.replace(data_config, train_examples=16)
    for epoch in (0, 1):
        visited = order(
            stream.training_dataset(source, few, epoch, 0, 2, 2, "none")
        )
        np.testing.assert_array_equal(np.sort(visited), np.arange(16))


@pytest.mark.parametrize(
    "augmentation, policy",
    [("autoaugment_cifar", "cifar10"), ("autoaugment_svhn", "svhn")],
)
def test_autoaugment_applies_its_policy_after_the_crop_then_cutout(
    tmp_path, augmentation, policy
):
    data_config = config.DataConfig.from_flags(make_flags(tmp_path, seed=3))
    source = stream.synthetic_source(
        datasets.DatasetInfo("synthetic", None, 10, "synthetic"), 32, 8
    )

    def batches(name):
        return list(
            stream.training_dataset(source, data_config, 1, 1, 2, 4, name)
        )

    basic, augmented = batches("basic"), batches(augmentation)
    # Data epoch 1 from its second batch: steps 5 and 6 of the run.
    for step, ((x, y), (got, labels)) in enumerate(zip(basic, augmented), 5):
        key = tf.constant([3, step], tf.int64)
        # `trainers.augment.Augmentation`'s draws: flip, crop, cutout and
        # policy (the crop and the flip were done per example).
        _, _, cutout_key, policy_key = tf.unstack(
            tf.random.experimental.stateless_split(key, 4)
        )
        want = augment.cutout(
            autoaugment.autoaugment(x, policy, policy_key), 16, cutout_key
        )
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_array_equal(labels, y)
        assert not np.allclose(got, x)
    with pytest.raises(ValueError, match="--augmentation=autoaugment_x"):
        batches("autoaugment_x")


def test_imagenet_resnet50_trains_two_synthetic_steps(tmp_path):
    results = imagenet.run(make_flags(tmp_path, model="resnet50"))
    assert results["dataset"] == "imagenet2012"
    assert results["train_steps"] == 2
    assert np.isfinite(results["test_loss"])
    with open(tmp_path / loop.RESULTS) as f:
        saved = json.load(f)
    for key in ("test_accuracy", "test_loss", "wall_time_seconds", "flags"):
        assert key in saved
    assert saved["flags"]["image_size"] == 32
    base = keras.saving.load_model(tmp_path / loop.MODEL)
    assert base.output_shape == (None, 1000)


@pytest.mark.parametrize(
    "use_mirrored", [False, True], ids=["default", "mirrored"]
)
@pytest.mark.parametrize(
    "trainer, dataset",
    [(imagenet, "imagenet2012"), (finetune, "oxford_flowers102")],
    ids=["imagenet", "finetune"],
)
def test_trainers_run_two_steps_on_mock_tfds(
    tmp_path, trainer, dataset, use_mirrored
):
    options = make_flags(
        tmp_path / "out",
        synthetic_data=False,
        # A URL (as `gs://` on a TPU VM) in one case, a path in the other.
        data_dir=str(tmp_path) if use_mirrored else f"file://{tmp_path}",
        augmentation="randaugment",
        dataset=dataset,
        jit_compile="false" if use_mirrored else "auto",
    )
    with tfds.testing.mock_data(num_examples=24):
        results = trainer.run(
            options, strategy_override=mirrored() if use_mirrored else None
        )
    assert results["dataset"] == dataset
    assert results["train_steps"] == 2
    assert results["replicas"] == (2 if use_mirrored else 1)
    assert np.isfinite(results["test_loss"])


def _layer_weights(layers):
    return [w.numpy() for layer in layers for w in layer.weights]


def test_pretrained_weights_load_with_a_new_head_and_frozen_batchnorm(
    tmp_path,
):
    source = keras.applications.EfficientNetB0(
        weights=None, input_shape=(32, 32, 3), classes=1000
    )
    path = str(tmp_path / "efficientnetb0.weights.h5")
    source.save_weights(path)
    expected = _layer_weights(
        layer for layer in source.layers if layer.name != "predictions"
    )

    model = models.build(
        "efficientnetb0",
        (32, 32, 3),
        102,
        pretrained_weights=path,
        freeze_batchnorm=True,
    )
    (backbone,) = [
        layer for layer in model.layers if isinstance(layer, keras.Model)
    ]
    loaded = _layer_weights(backbone.layers)
    assert len(loaded) == len(expected)
    for got, want in zip(loaded, expected):
        np.testing.assert_array_equal(got, want)
    assert model.get_layer(applications.HEAD).kernel.shape == (1280, 102)
    # As keras.applications builds it with weights="imagenet".
    kinds = [type(layer).__name__ for layer in backbone.layers[1:4]]
    assert kinds == ["Rescaling", "Normalization", "Rescaling"]
    normalizations = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert normalizations and not any(
        layer.trainable for layer in normalizations
    )

    results = finetune.run(
        make_flags(
            tmp_path / "run",
            model="efficientnetb0",
            pretrained_weights=path,
            learning_rate=0.1,
        )
    )
    assert results["train_steps"] == 2 and np.isfinite(results["test_loss"])
    trained = keras.saving.load_model(tmp_path / "run" / loop.MODEL)
    frozen = [
        (layer.name, [w.numpy() for w in layer.weights])
        for layer in trained._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for name, weights in frozen:
        for got, want in zip(weights, source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)


def test_legacy_notop_h5_loads_and_another_architecture_is_refused(tmp_path):
    source = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    path = str(tmp_path / "resnet50_notop.h5")
    source.save(path)
    model = models.build("resnet50", (32, 32, 3), 10, pretrained_weights=path)
    (backbone,) = [
        layer for layer in model.layers if isinstance(layer, keras.Model)
    ]
    for got, want in zip(
        _layer_weights(backbone.layers), _layer_weights(source.layers)
    ):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="another architecture"):
        models.build("efficientnetb0", (32, 32, 3), 10, pretrained_weights=path)


@pytest.mark.parametrize("name", ["weights.h5", "w.keras"])
def test_a_file_that_is_no_weights_file_is_refused_naming_it(tmp_path, name):
    # h5py's or zipfile's own error had ended the program in a traceback.
    path = tmp_path / name
    path.write_text("not a weights file")
    with pytest.raises(OSError, match=f"--pretrained_weights='{path}'"):
        models.build("resnet50", (32, 32, 3), 10, pretrained_weights=str(path))


def test_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    # Synthetic epochs have 4 steps: the cut at step 3 resumes mid-epoch,
    # skipping 3 batches of the epoch's stream.
    settings = dict(
        train_steps=6,
        checkpoint_every_steps=1,
        deterministic=True,
        augmentation="cutout",
    )
    whole = imagenet.run(make_flags(tmp_path / "whole", **settings))
    run_killed_after_step(
        monkeypatch, 3, imagenet.run, make_flags(tmp_path / "cut", **settings)
    )

    resumed = imagenet.run(make_flags(tmp_path / "cut", **settings))
    assert resumed["resumed_from_step"] == 3
    assert resumed["train_steps"] == 6
    np.testing.assert_allclose(
        resumed["test_loss"], whole["test_loss"], rtol=1e-6
    )
    again = imagenet.run(make_flags(tmp_path / "cut", **settings))
    assert again["resumed_from_step"] == 6 and again["train_steps"] == 6


@pytest.mark.parametrize("empty_version", [False, True])
def test_missing_tfds_copy_names_data_dir(tmp_path, empty_version):
    if empty_version:  # tfds' KeyError had come as a traceback
        (tmp_path / "imagenet2012" / "5.1.0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No prepared.*imagenet2012"):
        imagenet.run(
            make_flags(
                tmp_path / "out", synthetic_data=False, data_dir=str(tmp_path)
            )
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainers.finetune",
            "--dataset=cars196",
            f"--data_dir={tmp_path / 'missing'}",
            f"--output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr
    assert f"--data_dir='{tmp_path / 'missing'}' is not a directory" in (
        result.stderr
    )
    assert "cars196" in result.stderr
