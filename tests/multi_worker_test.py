"""Two worker processes on localhost under MultiWorkerMirroredStrategy.

Keras 3.15's `fit` fails under this strategy (keras-team/keras#20585);
`SAMModel` carries a contained workaround, tested here end to end. Each
test starts two processes with TF_CONFIG on free 127.0.0.1 ports, bounds
their time and kills what is left.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import backends
from tests import oracle
from tests.sam_model_test import LR
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import batches
from tests.sam_model_test import softmax_data
from tests.trainers_run_test import ROOT
from trainers import checkpoint
from trainers import loop

TIMEOUT = 240


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(args_of, log_dir, tag=""):
    """Starts one process per worker; returns the Popen objects."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index in range(2):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            TF_CPP_MIN_LOG_LEVEL="2",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        log = open(os.path.join(log_dir, f"{tag}worker{index}.log"), "wb")
        processes.append(
            subprocess.Popen(
                [sys.executable, *args_of(index)],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return processes


def _wait(processes, timeout=TIMEOUT):
    deadline = time.time() + timeout
    try:
        for p in processes:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in processes]


def _log(log_dir, index, tag=""):
    with open(os.path.join(log_dir, f"{tag}worker{index}.log"), "rb") as f:
        return f.read().decode(errors="replace")[-3000:]


def test_sam_model_fit_across_two_workers_matches_the_oracles(tmp_path):
    processes = _start_workers(
        lambda i: ["-m", "tests.multi_worker_job", str(tmp_path / f"{i}.npz")],
        tmp_path,
    )
    codes = _wait(processes)
    assert codes == [0, 0], _log(tmp_path, 0) + _log(tmp_path, 1)
    first, second = (np.load(tmp_path / f"{i}.npz") for i in range(2))
    assert int(first["replicas"]) == 2
    for key in ("w", "b", "sync_w", "sync_b", "loss", "sync_loss"):
        np.testing.assert_array_equal(first[key], second[key])

    x, y, w0, b0 = softmax_data()
    # Per-replica ε: each worker perturbs with its own half-batch gradient.
    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0,
        b0,
        batches(x, y),
        RHO,
        LR,
        MOMENTUM,
        gradient_fn=oracle.split_sam_gradient,
        parts=2,
    )
    np.testing.assert_allclose(first["w"], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first["b"], want_b, rtol=1e-5, atol=1e-6)
    # The logged loss is the global-batch loss, not divided by the workers.
    np.testing.assert_allclose(first["loss"], np.mean(want_losses), rtol=1e-5)
    # sync_perturbations: one ε from the all-reduced gradient, the
    # single-process full-batch result.
    sync_w, sync_b, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), RHO, LR, MOMENTUM
    )
    np.testing.assert_allclose(first["sync_w"], sync_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first["sync_b"], sync_b, rtol=1e-5, atol=1e-6)
    assert np.abs(want_w - sync_w).max() > 1e-4


def _trainer_args(output_dir, steps):
    return [
        "-m",
        "trainers.fashion_mnist",
        "--strategy=multi_worker",
        "--synthetic_data",
        "--batch_size=16",
        f"--train_steps={steps}",
        "--checkpoint_every_steps=2",
        "--jit_compile=false",
        "--verbose=0",
        f"--output_dir={output_dir}",
    ]


def test_trainer_runs_on_two_workers_and_both_end_alike(tmp_path):
    out = tmp_path / "run"
    processes = _start_workers(lambda i: _trainer_args(out, 4), tmp_path)
    assert _wait(processes) == [0, 0], _log(tmp_path, 0) + _log(tmp_path, 1)
    with open(out / loop.RESULTS) as f:
        results = json.load(f)
    assert results["train_steps"] == 4 and results["replicas"] == 2
    chief = np.load(out / checkpoint.CHECKPOINT)
    worker = np.load(out / (checkpoint.CHECKPOINT + ".worker"))
    assert int(chief["step"]) == int(worker["step"]) == 4
    # The history holds each process's own timings, and the checksum
    # follows what differs: not compared.
    differing = [
        k
        for k in chief.files
        if k not in ("history", "checksum")
        and not np.array_equal(chief[k], worker[k])
    ]
    # Only BatchNorm moving statistics may differ: Keras 3 creates them with
    # aggregation "none", so under tf.distribute each replica keeps its own,
    # as in a plain Keras `fit`; the chief's are the ones saved. The small
    # CNN has two BatchNorm layers, a moving mean and variance each.
    assert len(differing) <= 4
    for k in differing:
        assert chief[k].ndim == 1


def test_a_lost_worker_fails_the_job_and_a_restart_resumes(tmp_path):
    out = tmp_path / "run"
    steps = 200
    processes = _start_workers(
        lambda i: _trainer_args(out, steps), tmp_path, tag="lost-"
    )
    try:
        deadline = time.time() + TIMEOUT
        while not (out / checkpoint.CHECKPOINT).exists():
            assert time.time() < deadline, _log(tmp_path, 0, "lost-")
            assert all(p.poll() is None for p in processes), _log(
                tmp_path, 0, "lost-"
            )
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGKILL)
        codes = _wait(processes, timeout=TIMEOUT)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    # The chief notices the lost peer and exits with an error, not a hang.
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0
    assert "Error" in _log(tmp_path, 0, "lost-")
    with np.load(out / checkpoint.CHECKPOINT) as saved:
        lost_at = int(saved["step"])
    assert 2 <= lost_at < steps

    processes = _start_workers(lambda i: _trainer_args(out, steps), tmp_path)
    assert _wait(processes) == [0, 0], _log(tmp_path, 0)
    with open(out / loop.RESULTS) as f:
        results = json.load(f)
    assert results["resumed_from_step"] >= lost_at
    assert results["train_steps"] == steps


pytestmark = [
    pytest.mark.skipif(
        sys.platform != "linux", reason="uses localhost ports and POSIX signals"
    ),
    backends.tensorflow_only,
]
