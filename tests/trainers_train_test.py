"""The training loop: batch order, exact resume with augmentation, SGD/SAM."""

import json
import types

import numpy as np
import tensorflow_datasets as tfds

from tests.trainer_run_test import make_flags
from trainers import compare_sgd_sam
from trainers import data
from trainers import fashion_mnist
from trainers import train


def test_each_epoch_visits_distinct_examples_and_drops_the_remainder():
    indices = train.step_indices(103, 10, 25, seed=4)
    assert indices.shape == (25, 10)
    for epoch in range(3):
        visited = indices[epoch * 10 : (epoch + 1) * 10].ravel()
        assert len(np.unique(visited)) == len(visited)
        assert visited.min() >= 0 and visited.max() < 103
    assert not np.array_equal(indices[:10], indices[10:20])
    np.testing.assert_array_equal(
        train.step_indices(103, 10, 25, seed=4), indices
    )
    assert not np.array_equal(train.step_indices(103, 10, 25, 5), indices)


def test_training_batches_are_augmented_by_step_not_by_call_order():
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1))
    split = types.SimpleNamespace(
        images=images.astype(np.uint8), labels=np.arange(64) % 10
    )
    indices = train.step_indices(64, 8, 6, seed=0)
    augmentation = train.augment_lib.Augmentation("cutout", (28, 28, 1))

    def batches(start):
        dataset = train.training_dataset(
            split, indices, start, augmentation, 10, seed=3
        )
        return [x.numpy() for x, _ in dataset]

    whole, resumed = batches(0), batches(4)
    assert len(whole) == 6 and len(resumed) == 2
    for want, got in zip(whole[4:], resumed):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(whole[0], whole[1])


class _Flags(types.SimpleNamespace):
    def flag_values_dict(self):
        return dict(vars(self))


def test_comparison_trains_sgd_and_sam_alike_but_for_rho(tmp_path, capsys):
    flags_obj = _Flags(**vars(make_flags(tmp_path, train_steps=3)))
    flags_obj.sam_rho = 0.05
    results = compare_sgd_sam.run(flags_obj)
    assert list(results) == ["SGD", "SAM"]
    sgd, sam = results["SGD"], results["SAM"]
    assert sgd["flags"]["rho"] == 0.0 and sam["flags"]["rho"] == 0.05
    assert sgd["train_steps"] == sam["train_steps"] == 3
    differing = {k for k in sgd["flags"] if sgd["flags"][k] != sam["flags"][k]}
    assert differing == {"rho", "output_dir"}
    for name in ("sgd", "sam"):
        with open(tmp_path / name / "results.json") as f:
            assert json.load(f)["train_steps"] == 3
    # Different ρ, same data, seed and initial weights: different models.
    assert sgd["test_loss"] != sam["test_loss"]
    assert flags_obj.rho == 0.05 and flags_obj.output_dir == str(tmp_path)


def test_label_noise_reaches_the_training_labels_only(tmp_path, monkeypatch):
    calls = []
    add_label_noise = data.add_label_noise

    def spy(labels, fraction, num_classes, seed):
        calls.append(np.array(labels))
        return add_label_noise(labels, fraction, num_classes, seed)

    monkeypatch.setattr(train.data_lib, "add_label_noise", spy)
    synthetic = data.load("fashion_mnist", synthetic_data=True)
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
