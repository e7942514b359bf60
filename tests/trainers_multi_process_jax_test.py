"""The trainers across several JAX processes, against one process.

`--strategy=multi_worker` on JAX joins the processes with
`keras.distribution.initialize` (here from its KERAS_DISTRIBUTION_*
variables, two processes on a free 127.0.0.1 port) and trains over the
devices of both, each process feeding its rows of every global batch.
A global batch split in two shards, each with its own ε, is the same
computation whether the shards sit on two processes or on two devices of
one process (`--strategy=mirrored`); so are two batch shards whose kernels
are each split over two devices (`--model_parallel=2`). The runs are
compared on the checkpoints they write, which process 0 alone writes.
Before `multi_worker` ran on JAX, the trainers refused it there.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.backends import BACKEND
from tests.multi_worker_test import _free_ports
from tests.multi_worker_test import _wait
from trainers import checkpoint
from trainers import loop

pytestmark = [
    pytest.mark.skipif(
        BACKEND != "jax", reason="keras.distribution runs on the JAX backend"
    ),
    pytest.mark.skipif(
        sys.platform != "linux", reason="uses localhost ports and POSIX signals"
    ),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
LAYOUT_MAP = ".*dense.*/kernel=,model"


def _trainer_args(output_dir, steps, strategy, *extra):
    return [
        "-m",
        "trainers.fashion_mnist",
        # The MLP: no BatchNorm to amplify the rounding of reductions
        # ordered otherwise, and quick to compile.
        "--model=mlp",
        f"--strategy={strategy}",
        "--synthetic_data",
        "--batch_size=16",
        f"--train_steps={steps}",
        "--checkpoint_every_steps=2",
        "--verbose=0",
        f"--output_dir={output_dir}",
        *extra,
    ]


def _start(args, log_dir, tag, processes=1, devices=2):
    """Starts `processes` trainers (one `keras.distribution` job when
    more than one), each with `devices` CPU devices; `args` may be a
    function of the process index."""
    (port,) = _free_ports(1)
    started = []
    for index in range(processes):
        command = args(index) if callable(args) else args
        env = dict(
            os.environ,
            KERAS_BACKEND="jax",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            TF_CPP_MIN_LOG_LEVEL="2",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        if processes > 1:
            env.update(
                KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                KERAS_DISTRIBUTION_NUM_PROCESSES=str(processes),
                KERAS_DISTRIBUTION_PROCESS_ID=str(index),
            )
        with open(log_dir / f"{tag}{index}.log", "wb") as log:
            started.append(
                subprocess.Popen(
                    [sys.executable, *command],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return started


def _logs(log_dir, tag):
    return "".join(
        path.read_text(errors="replace")[-3000:]
        for path in sorted(log_dir.glob(f"{tag}*.log"))
    )


def _train(log_dir, tag, args, processes=1, devices=2):
    codes = _wait(_start(args, log_dir, tag, processes, devices), TIMEOUT)
    assert codes == [0] * processes, _logs(log_dir, tag)


def _variables(output_dir):
    with np.load(output_dir / checkpoint.CHECKPOINT) as saved:
        return {
            k: saved[k] for k in saved.files if k.startswith("variables/")
        }, int(saved["step"])


def _results(output_dir):
    with open(output_dir / loop.RESULTS) as f:
        return json.load(f)


def _assert_same_run(got_dir, want_dir):
    got, got_step = _variables(got_dir)
    want, want_step = _variables(want_dir)
    assert got_step == want_step
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(
            got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
    got, want = _results(got_dir), _results(want_dir)
    assert got["replicas"] == want["replicas"] == 2
    np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        got["history"]["loss"], want["history"]["loss"], rtol=1e-5
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A 4-step run of one process over two devices (two batch shards)."""
    out = tmp_path_factory.mktemp("one_process")
    _train(out, "mirrored", _trainer_args(out / "run", 4, "mirrored"))
    return out / "run"


def test_two_processes_train_like_two_devices_of_one(tmp_path, one_process):
    out = tmp_path / "run"
    args = _trainer_args(out, 4, "multi_worker")
    _train(tmp_path, "worker", args, processes=2, devices=1)
    _assert_same_run(out, one_process)
    # Process 0 alone writes the checkpoint, the model and the results.
    assert not (out / (checkpoint.CHECKPOINT + ".worker")).exists()
    assert (out / loop.MODEL).exists()


def test_kernels_split_over_each_process_devices_train_alike(
    tmp_path, one_process
):
    out = tmp_path / "run"
    args = _trainer_args(
        out,
        4,
        "multi_worker",
        "--model_parallel=2",
        f"--layout_map={LAYOUT_MAP}",
    )
    _train(tmp_path, "model", args, processes=2, devices=2)
    # Each process holds one batch shard's kernels, split over its two
    # devices; the checkpoint gathers them whole.
    _assert_same_run(out, one_process)
    assert f"{loop.MODEL} is not written" in _logs(tmp_path, "model")


def test_a_lost_process_stops_the_other_and_a_restart_resumes(tmp_path):
    steps = 200
    want = tmp_path / "uninterrupted"
    _train(tmp_path, "mirrored", _trainer_args(want, steps, "mirrored"))

    out = tmp_path / "run"
    args = _trainer_args(out, steps, "multi_worker")
    processes = _start(args, tmp_path, "lost", processes=2, devices=1)
    try:
        deadline = time.time() + TIMEOUT
        while not (out / checkpoint.CHECKPOINT).exists():
            assert time.time() < deadline, _logs(tmp_path, "lost")
            assert all(p.poll() is None for p in processes), _logs(
                tmp_path, "lost"
            )
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)
        lost = time.time()
        # Process 0's collectives fail, and it stops at once instead of
        # waiting at exit for the lost process.
        codes = _wait(processes, timeout=60)
        assert time.time() - lost < 30
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert codes == [1, -signal.SIGKILL], _logs(tmp_path, "lost")
    assert "Process 0 of 2 stops" in _logs(tmp_path, "lost")
    _, lost_at = _variables(out)
    assert 2 <= lost_at < steps

    # Process 1 in a directory of its own would start afresh: both stop.
    elsewhere = _trainer_args(tmp_path / "elsewhere", steps, "multi_worker")
    processes = _start(
        lambda i: elsewhere if i else args, tmp_path, "unshared", 2, 1
    )
    codes = _wait(processes, timeout=TIMEOUT)
    # Process 1 may be aborted by jax.distributed when process 0, its
    # coordinator, has gone first.
    assert codes[0] == 1 and codes[1] != 0, _logs(tmp_path, "unshared")
    assert "must be a directory all processes share" in _logs(
        tmp_path, "unshared"
    )

    _train(tmp_path, "restart", args, processes=2, devices=1)
    assert _results(out)["resumed_from_step"] >= lost_at
    _assert_same_run(out, want)
