"""In-memory data and the loop: batch order, augmentation by step, SGD/SAM."""

import json
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests import backends
from tests.trainers_run_test import make_flags
from trainers import compare_sgd_sam
from trainers import fashion_mnist
from trainers.data import arrays
from trainers.data import config
from trainers.data import datasets

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only


def test_each_epoch_visits_distinct_examples_and_drops_the_remainder():
    indices = arrays.step_indices(103, 10, 25, seed=4)
    assert indices.shape == (25, 10)
    for epoch in range(3):
        visited = indices[epoch * 10 : (epoch + 1) * 10].ravel()
        assert len(np.unique(visited)) == len(visited)
        assert visited.min() >= 0 and visited.max() < 103
    assert not np.array_equal(indices[:10], indices[10:20])
    np.testing.assert_array_equal(
        arrays.step_indices(103, 10, 25, seed=4), indices
    )
    assert not np.array_equal(arrays.step_indices(103, 10, 25, 5), indices)


def test_training_batches_are_augmented_by_step_not_by_call_order():
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1))
    split = types.SimpleNamespace(
        images=images.astype(np.uint8), labels=np.arange(64) % 10
    )
    indices = arrays.step_indices(64, 8, 6, seed=0)
    augmentation = arrays.augment_lib.Augmentation("cutout", (28, 28, 1))

    def batches(start, rows=indices):
        dataset = arrays.training_dataset(
            split, rows, start, augmentation, 10, seed=3
        )
        return [x.numpy() for x, _ in dataset]

    whole, resumed = batches(0), batches(4)
    assert len(whole) == 6 and len(resumed) == 2
    for want, got in zip(whole[4:], resumed):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(whole[0], whole[1])
    # Two steps of the same rows draw different augmentations.
    first, second = batches(0, rows=np.repeat(indices[:1], 2, axis=0))
    assert not np.array_equal(first, second)


class _Flags(types.SimpleNamespace):
    def flag_values_dict(self):
        return dict(vars(self))


def test_comparison_trains_a_plain_fit_and_sam_alike(tmp_path):
    flags_obj = _Flags(
        **vars(
            make_flags(
                tmp_path,
                train_steps=3,
                rho=0.05,
                label_noise=0.5,
                track_memorization=True,
            )
        ),
        sharpness_examples=64,
    )
    with pytest.raises(ValueError, match="--sam must stay on"):  # ignored
        compare_sgd_sam.run(_Flags(**dict(vars(flags_obj), sam=False)))
    with pytest.raises(ValueError, match="--track_memorization must stay"):
        compare_sgd_sam.run(
            _Flags(**dict(vars(flags_obj), track_memorization=False))
        )
    with pytest.raises(ValueError, match="--label_noise must be > 0. .*=0.0"):
        compare_sgd_sam.run(_Flags(**dict(vars(flags_obj), label_noise=0.0)))
    results = compare_sgd_sam.run(flags_obj)
    assert list(results) == ["SGD", "SAM"]
    sgd, sam = results["SGD"], results["SAM"]
    assert sgd["flags"]["sam"] is False and sam["flags"]["sam"] is True
    assert sgd["train_steps"] == sam["train_steps"] == 3
    differing = {k for k in sgd["flags"] if sgd["flags"][k] != sam["flags"][k]}
    assert differing == {"sam", "output_dir"}
    for name in ("sgd", "sam"):
        with open(tmp_path / name / "results.json") as f:
            assert json.load(f)["train_steps"] == 3
    # Same data, seed and initial weights: SAM alone makes them differ.
    assert sgd["test_loss"] != sam["test_loss"]
    assert all(r["sharpness"] > 0 for r in results.values())
    with open(tmp_path / compare_sgd_sam.COMPARISON) as f:
        compared = json.load(f)
    assert compared["SAM"]["test_accuracy"] == sam["test_accuracy"]
    assert compared["SGD"]["sharpness"] == sgd["sharpness"]
    assert compared["SAM"]["epochs"] == len(sam["history"]["loss"])
    assert 0 < compared["SGD"]["train_accuracy_flipped"] < 1
    assert flags_obj.output_dir == str(tmp_path)


def test_plain_fit_matches_sam_model_with_rho_zero(tmp_path):
    plain = fashion_mnist.run(make_flags(tmp_path / "plain", sam=False))
    sam0 = fashion_mnist.run(make_flags(tmp_path / "sam0", rho=0.0))
    assert plain["test_loss"] == pytest.approx(sam0["test_loss"], rel=1e-6)


def test_validation_split_is_held_out_and_noised_like_training(tmp_path):
    synthetic = datasets.load("fashion_mnist", synthetic_data=True)
    flags_obj = make_flags(
        tmp_path, validation_examples=100, train_examples=300, label_noise=0.5
    )
    splits = arrays.in_memory_splits(
        config.DataConfig.from_flags(flags_obj),
        "fashion_mnist",
        datasets_override=synthetic,
    )
    images = synthetic[0].images
    np.testing.assert_array_equal(splits.validation.images, images[-100:])
    np.testing.assert_array_equal(splits.train.images, images[:300])
    changed = splits.validation.labels != synthetic[0].labels[-100:]
    # Half resampled uniformly over 10 classes: 45 % changed, in expectation.
    assert 0.3 < changed.mean() < 0.6
    np.testing.assert_array_equal(
        splits.flipped, splits.train.labels != synthetic[0].labels[:300]
    )
    assert 0.3 < splits.flipped.mean() < 0.6
    # Without --train_examples, every row but the held-out ones trains:
    # above, the first 300 rows train whether or not those are removed.
    every_row = arrays.in_memory_splits(
        config.DataConfig.from_flags(
            make_flags(tmp_path, validation_examples=100)
        ),
        "fashion_mnist",
        datasets_override=synthetic,
    )
    np.testing.assert_array_equal(every_row.train.images, images[:-100])
    np.testing.assert_array_equal(every_row.validation.images, images[-100:])


def test_memorization_and_validation_accuracy_are_recorded(tmp_path):
    synthetic = datasets.load("fashion_mnist", synthetic_data=True)
    results = fashion_mnist.run(
        make_flags(
            tmp_path,
            validation_examples=64,
            label_noise=0.5,
            track_memorization=True,
            train_steps=0,
            epochs=2,
        ),
        datasets_override=synthetic,
    )
    history = results["history"]
    for key in (
        "validation_accuracy",
        "train_accuracy_flipped",
        "train_accuracy_unflipped",
    ):
        assert len(history[key]) == 2
        assert 0.0 <= history[key][-1] <= 1.0
        assert results[key] == history[key][-1]
    # Training time, evaluation left out, per epoch and summed.
    for key in ("train_cpu_seconds", "train_wall_seconds"):
        per_epoch = history["epoch_" + key]
        assert len(per_epoch) == 2 and min(per_epoch) > 0
        assert results[key] == pytest.approx(sum(per_epoch))


def test_without_flipped_labels_their_accuracy_is_written_as_null(tmp_path):
    # No label noise: no flipped example, an accuracy over none (NaN),
    # which strict JSON readers refuse as Python writes it.
    results = fashion_mnist.run(
        make_flags(
            tmp_path, label_noise=0.0, track_memorization=True, epochs=1
        ),
        datasets_override=datasets.load("fashion_mnist", synthetic_data=True),
    )
    assert np.isnan(results["train_accuracy_flipped"])

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(tmp_path / "results.json") as f:
        written = json.load(f, parse_constant=refuse)
    assert written["train_accuracy_flipped"] is None
    assert written["history"]["train_accuracy_flipped"] == [None]
    assert 0.0 <= written["train_accuracy_unflipped"] <= 1.0


def test_validation_examples_must_leave_training_examples(tmp_path):
    with pytest.raises(ValueError, match="--validation_examples=512"):
        fashion_mnist.run(make_flags(tmp_path, validation_examples=512))


def test_label_noise_reaches_the_training_labels_only(tmp_path, monkeypatch):
    calls = []
    add_label_noise = datasets.add_label_noise

    def spy(labels, fraction, num_classes, seed):
        calls.append(np.array(labels))
        return add_label_noise(labels, fraction, num_classes, seed)

    monkeypatch.setattr(arrays.data_lib, "add_label_noise", spy)
    synthetic = datasets.load("fashion_mnist", synthetic_data=True)
    train_split, test_split, _ = synthetic
    test_labels = test_split.labels.copy()
    fashion_mnist.run(
        make_flags(tmp_path, label_noise=0.5), datasets_override=synthetic
    )
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], train_split.labels)
    np.testing.assert_array_equal(test_split.labels, test_labels)


def test_fashion_mnist_reads_a_tfds_copy_in_data_dir(tmp_path):
    (tmp_path / "tfds" / "fashion_mnist").mkdir(parents=True)
    with tfds.testing.mock_data(num_examples=40):
        results = fashion_mnist.run(
            make_flags(
                tmp_path / "run",
                synthetic_data=False,
                data_dir=str(tmp_path / "tfds"),
            )
        )
    assert results["train_steps"] == 2
    assert np.isfinite(results["test_loss"])
