"""The Fashion-MNIST trainer on the backends other than TensorFlow.

The trainers read data with `tf.data` on every backend; what changes is the
training step and `--strategy`, which maps onto `keras.distribution` on JAX.
The TensorFlow pass runs the full trainer suite (trainers_*_test.py).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.backends import BACKEND
from tests.trainers_run_test import make_flags
from tests.trainers_run_test import whole_and_resumed
from trainers import fashion_mnist
from trainers import strategy as strategy_lib

pytestmark = pytest.mark.skipif(
    BACKEND == "tensorflow", reason="trainers_*_test.py cover TensorFlow"
)


@pytest.mark.parametrize(
    "augmentation", [None, "autoaugment_cifar", "randaugment"]
)
def test_two_synthetic_steps_write_results(tmp_path, augmentation):
    # AutoAugment's geometric operations had run `keras.ops.image` in the
    # `tf.data` graph, which JAX and PyTorch cannot take.
    extra = {} if augmentation is None else dict(augmentation=augmentation)
    results = fashion_mnist.run(make_flags(tmp_path, **extra))
    assert results["train_steps"] == 2
    assert np.isfinite(results["test_loss"])


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(switching="periodic", sam_every=3, looksam_alpha=0.7),
        # 512 synthetic examples: 4 steps an epoch, so the kill after the
        # epoch's checkpoint falls between two `fit` calls, after a
        # validation pass (new data iterators).
        dict(batch_size=128, hook="on_epoch_end", eval_every_epochs=1),
    ],
    ids=["sam", "looksam", "epoch_boundary"],
)
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, variant
):
    settings = dict(train_steps=6, checkpoint_every_steps=2, rho=0.1)
    whole, resumed = whole_and_resumed(
        monkeypatch, tmp_path, 4, **settings, **variant
    )
    assert resumed["train_steps"] == 6
    np.testing.assert_allclose(
        resumed["test_loss"], whole["test_loss"], rtol=1e-6
    )
    # The epoch the interruption cut in two is logged as a whole one.
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(
            resumed["history"][key], whole["history"][key], rtol=1e-6
        )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
def test_mirrored_maps_onto_data_parallel_over_the_devices(tmp_path):
    try:
        results = fashion_mnist.run(make_flags(tmp_path, strategy="mirrored"))
        distribution = keras.distribution.distribution()
    finally:
        keras.distribution.set_distribution(None)
    assert isinstance(distribution, keras.distribution.DataParallel)
    assert results["replicas"] == 2 == len(keras.distribution.list_devices())
    assert np.isfinite(results["test_loss"])


@pytest.mark.parametrize(
    "name",
    [
        "tpu",
        pytest.param(
            "multi_worker",
            marks=pytest.mark.skipif(
                BACKEND == "jax", reason="keras.distribution.initialize"
            ),
        ),
        pytest.param(
            "mirrored",
            marks=pytest.mark.skipif(
                BACKEND != "torch", reason="runs on keras.distribution"
            ),
        ),
    ],
)
def test_strategies_without_a_route_are_refused_naming_the_backend(name):
    with pytest.raises(ValueError, match=f"--strategy={name} .* {BACKEND}"):
        strategy_lib.get_strategy(name, tpu="local")


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
def test_multi_worker_without_a_cluster_says_what_it_reads():
    # Keras' "coordinator_address should be defined." had come as a
    # traceback. A new process: JAX joins a cluster before its first
    # computation only.
    code = (
        "from trainers import flags, strategy\n"
        "try:\n"
        "    strategy.get_strategy('multi_worker')\n"
        "except ValueError as error:\n"
        "    print(flags.error_line(error))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KERAS_DISTRIBUTION_")
    }
    printed = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, KERAS_BACKEND="jax"),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.strip()
    assert printed.splitlines()[-1] == (
        "ValueError: --strategy=multi_worker on JAX joins the processes "
        "with keras.distribution.initialize(), which refused: "
        "coordinator_address should be defined. Set "
        "KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES "
        "and KERAS_DISTRIBUTION_PROCESS_ID, or run where jax.distributed "
        "finds the cluster (Cloud TPU, SLURM, Open MPI)."
    )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
def test_kernels_split_over_the_model_axis_train_as_on_one_device(tmp_path):
    # Two devices along "model", one along "batch": one ε for the batch,
    # as on one device, with every dense kernel split in two.
    settings = dict(model="mlp", train_steps=3)
    try:
        split = fashion_mnist.run(
            make_flags(
                tmp_path / "split",
                strategy="mirrored",
                model_parallel=2,
                layout_map=".*dense.*/kernel=,model",
                **settings,
            )
        )
        distribution = keras.distribution.distribution()
    finally:
        keras.distribution.set_distribution(None)
    whole = fashion_mnist.run(make_flags(tmp_path / "whole", **settings))
    assert isinstance(distribution, keras.distribution.ModelParallel)
    assert split["replicas"] == 1
    np.testing.assert_allclose(
        split["history"]["loss"], whole["history"]["loss"], rtol=1e-5
    )
    np.testing.assert_allclose(
        split["test_loss"], whole["test_loss"], rtol=1e-5
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            dict(model_parallel=0),
            "--model_parallel must be >= 1. Received: 0",
        ),
        (
            dict(model_parallel=2),
            "--model_parallel=2 needs a --layout_map",
        ),
        (
            dict(model_parallel=3, layout_map="a=model"),
            "--model_parallel=3 must divide the 2 devices",
        ),
        (
            dict(layout_map=".*kernel"),
            "entry '.*kernel' is not PATTERN=AXES",
        ),
        (
            dict(layout_map=".*kernel=,data"),
            "names an axis other than batch and model",
        ),
        (
            dict(layout_map="(=model"),
            "has an invalid pattern",
        ),
    ],
)
def test_layouts_that_cannot_work_are_refused_naming_the_flag(
    arguments, message
):
    name = "default" if BACKEND == "torch" else "mirrored"
    if BACKEND == "torch":
        message = "--model_parallel and --layout_map .* torch"
        if arguments.get("model_parallel") == 0:
            message = "--model_parallel must be >= 1"
    try:
        with pytest.raises(ValueError, match=message):
            strategy_lib.get_strategy(name, **arguments)
    finally:
        keras.distribution.set_distribution(None)


def test_a_layout_pattern_matching_no_variable_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    strategy_lib.check_layout_map(".*dense.*/kernel=,model", model)
    with pytest.raises(
        ValueError, match="pattern '.*dense/kernal' matches none of the"
    ):
        strategy_lib.check_layout_map(
            ".*dense.*/kernel=,model;.*dense/kernal=,model", model
        )
