"""Faults and scale: NaN losses, SIGKILL and resume, TPU settings."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import backends
from tests.trainers_run_test import ROOT
from tests.trainers_run_test import make_flags
from trainers import checkpoint
from trainers import config as trainer_config
from trainers import fashion_mnist
from trainers import loop
from trainers import strategy as strategy_lib

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    tmp_path,
):
    fashion_mnist.run(
        make_flags(tmp_path, train_steps=4, checkpoint_every_steps=2)
    )
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        fashion_mnist.run(
            make_flags(
                tmp_path,
                train_steps=12,
                checkpoint_every_steps=1,
                learning_rate=1e30,
            )
        )
    with np.load(tmp_path / checkpoint.CHECKPOINT) as saved:
        assert int(saved["step"]) >= 4
        for name in saved.files:
            if name != "history":
                assert np.all(np.isfinite(saved[name])), name


def _command(output_dir, steps):
    return [
        sys.executable,
        "-m",
        "trainers.fashion_mnist",
        "--synthetic_data",
        "--batch_size=16",
        f"--train_steps={steps}",
        "--checkpoint_every_steps=3",
        "--deterministic",
        "--verbose=0",
        f"--output_dir={output_dir}",
    ]


def _environment():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
    steps = 40
    whole = subprocess.run(
        _command(tmp_path / "whole", steps),
        env=_environment(),
        timeout=600,
        capture_output=True,
    )
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    cut = tmp_path / "cut"
    process = subprocess.Popen(
        _command(cut, steps),
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (cut / checkpoint.CHECKPOINT).exists():
            assert process.poll() is None, "the run ended before a checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        time.sleep(0.3)  # Kill somewhere after the first checkpoint.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (cut / loop.RESULTS).exists()
    with np.load(cut / checkpoint.CHECKPOINT) as saved:
        killed_at = int(saved["step"])
    assert 3 <= killed_at < steps

    resumed = subprocess.run(
        _command(cut, steps),
        env=_environment(),
        timeout=600,
        capture_output=True,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    with open(tmp_path / "whole" / loop.RESULTS) as f:
        want = json.load(f)
    with open(cut / loop.RESULTS) as f:
        got = json.load(f)
    assert got["resumed_from_step"] == killed_at
    assert got["train_steps"] == want["train_steps"] == steps
    np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-6)


def test_steps_per_execution_keeps_the_checkpoint_schedule(tmp_path):
    results = fashion_mnist.run(
        make_flags(
            tmp_path,
            train_steps=6,
            steps_per_execution=3,
            checkpoint_every_steps=2,
        )
    )
    assert results["train_steps"] == 6
    with np.load(tmp_path / checkpoint.CHECKPOINT) as saved:
        assert int(saved["step"]) == 6


def test_tpu_settings_compile_with_xla_in_bfloat16_several_steps_a_call(
    tmp_path,
):
    accelerator = trainer_config.AcceleratorConfig.from_flags(
        make_flags(tmp_path, jit_compile="false")
    )
    tpu = loop.accelerator_settings(accelerator, on_tpu=True)
    assert tpu == dict(
        jit_compile=True, steps_per_execution=32, policy="mixed_bfloat16"
    )
    cpu = loop.accelerator_settings(accelerator, on_tpu=False)
    assert cpu == dict(jit_compile=False, steps_per_execution=1, policy=None)
    float16 = dataclasses.replace(accelerator, mixed_precision="float16")
    with pytest.raises(ValueError, match="float16 is for GPUs"):
        loop.accelerator_settings(float16, on_tpu=True)


def test_tpu_strategy_goes_through_the_cluster_resolver(monkeypatch):
    resolved = []

    class Resolver:
        def __init__(self, tpu):
            resolved.append(tpu)
            raise ConnectionError(f"no TPU at {tpu}")

    monkeypatch.setattr(
        tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver
    )
    with pytest.raises(ConnectionError, match="grpc://10.0.0.2:8470"):
        strategy_lib.get_strategy("tpu", "grpc://10.0.0.2:8470")
    assert resolved == ["grpc://10.0.0.2:8470"]
    with pytest.raises(ValueError, match="--tpu"):
        strategy_lib.get_strategy("tpu", None)


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.write_atomically(
        str(path), lambda f: np.savez(f, step=np.int64(2), v0=np.ones(3))
    )

    def dies_midway(f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt("killed during the write")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomically(str(path), dies_midway)
    with np.load(path) as saved:
        assert int(saved["step"]) == 2
        np.testing.assert_array_equal(saved["v0"], np.ones(3))
    assert os.listdir(tmp_path) == [checkpoint.CHECKPOINT]
