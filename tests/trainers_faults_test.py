"""Faults and mistakes an operator meets, each injected for real.

A kill (SIGKILL, at a checkpoint or between two), a second process on the
same --output_dir, a resume with other flags, a corrupt checkpoint and
files left by an interrupted write, a full disk and a read-only directory
(a tmpfs when this process may mount one, else an error injected at the
write), flag values that cannot work, a diverging loss, and the file
modes. They run on every backend, but for the TPU settings (TensorFlow's)
and the killed processes (not in the PyTorch pass, for time).
"""

import contextlib
import dataclasses
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import tensorflow as tf

from tests import backends
from tests.trainers_run_test import ROOT
from tests.trainers_run_test import make_flags
from tests.trainers_run_test import run_killed_after_step
from trainers import checkpoint
from trainers import config as trainer_config
from trainers import fashion_mnist
from trainers import loop
from trainers import strategy as strategy_lib
from trainers.flags import error_line

not_on_torch = pytest.mark.skipif(
    backends.BACKEND == "torch",
    reason="the same processes as on JAX; kept out of the PyTorch pass "
    "for time",
)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    tmp_path,
):
    # At this learning rate the loss of the small CNN overflows at the
    # fourth or fifth step, after checkpoints of finite states.
    with pytest.raises(FloatingPointError) as error:
        fashion_mnist.run(
            make_flags(
                tmp_path,
                train_steps=12,
                checkpoint_every_steps=1,
                learning_rate=30.0,
            )
        )
    saved = _saved_arrays(tmp_path / checkpoint.CHECKPOINT)
    step = int(saved["step"])
    assert 1 <= step < 12
    line = error_line(error.value)
    stopped = int(line.split("stopped at step ")[1].split(":")[0])
    assert step < stopped < 12
    assert line == (
        f"FloatingPointError: Training stopped at step {stopped}: the loss "
        "became NaN or infinite. The last good checkpoint is "
        f"{tmp_path / checkpoint.CHECKPOINT} (step {step}); try a lower "
        "--learning_rate or --rho."
    )
    for name, value in saved.items():
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name


def test_a_loss_that_is_never_finite_says_no_checkpoint_was_written(
    tmp_path,
):
    with pytest.raises(FloatingPointError) as error:
        fashion_mnist.run(
            make_flags(tmp_path, train_steps=6, learning_rate=1e30)
        )
    assert "No checkpoint was written" in str(error.value)
    assert not os.path.exists(tmp_path / checkpoint.CHECKPOINT)


# 512 synthetic examples of 16: 32 steps an epoch, and every checkpoint of
# a 40-step run but the last (3, 6, ..., 39) cuts an epoch in two.
def _command(output_dir, steps, *more):
    return [
        sys.executable,
        "-m",
        "trainers.fashion_mnist",
        "--synthetic_data",
        "--model=mlp",
        "--batch_size=16",
        f"--train_steps={steps}",
        "--checkpoint_every_steps=3",
        "--deterministic",
        "--verbose=0",
        f"--output_dir={output_dir}",
        *more,
    ]


def _environment():
    # The backend of this pytest process (KERAS_BACKEND) is inherited.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(output_dir, steps):
    """The trainer run to its end in a fresh process."""
    return subprocess.run(
        _command(output_dir, steps),
        env=_environment(),
        timeout=600,
        capture_output=True,
        text=True,
    )


def _one_line(result):
    """The error line of a refused program, checked to be alone."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


def _saved_arrays(path):
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


@not_on_torch
def test_a_sigkilled_run_resumes_bit_for_bit_and_locks_out_a_second_one(
    tmp_path,
):
    steps = 40
    whole = _run(tmp_path / "whole", steps)
    assert whole.returncode == 0, whole.stderr[-2000:]

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
            time.sleep(0.02)
        # Stopped, the run holds its directory while a second one starts.
        process.send_signal(signal.SIGSTOP)
        second = _run(cut, steps)
        assert _one_line(second) == (
            f"DirectoryInUseError: Another process (pid {process.pid}) is "
            f"training in {cut} (it holds {cut / loop.LOCK}). Wait for it to "
            "end, or use another --output_dir."
        )
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (cut / loop.RESULTS).exists()
    killed_at = int(_saved_arrays(cut / checkpoint.CHECKPOINT)["step"])
    assert 3 <= killed_at < steps and killed_at % 32

    # The lock file the killed run left does not block the restart.
    assert (cut / loop.LOCK).exists()
    resumed = _run(cut, steps)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with open(tmp_path / "whole" / loop.RESULTS) as f:
        want = json.load(f)
    with open(cut / loop.RESULTS) as f:
        got = json.load(f)
    assert got["resumed_from_step"] == killed_at
    assert got["train_steps"] == want["train_steps"] == steps
    assert got["test_loss"] == want["test_loss"]
    # The epoch the kill cut in two is logged as if it had not been.
    for key in ("loss", "accuracy", "sharpness", "grad_norm", "val_loss"):
        assert got["history"][key] == want["history"][key], key
    whole_state = _saved_arrays(tmp_path / "whole" / checkpoint.CHECKPOINT)
    cut_state = _saved_arrays(cut / checkpoint.CHECKPOINT)
    variables = [k for k in whole_state if k.startswith("variables/")]
    assert variables and set(variables) <= set(cut_state)
    for key in variables:
        np.testing.assert_array_equal(cut_state[key], whole_state[key], key)


@backends.needs_steps_per_execution
@pytest.mark.parametrize("train_steps", [6, 5])
def test_steps_per_execution_keeps_the_checkpoint_schedule(
    tmp_path, train_steps
):
    # 5: Keras numbers the short last call of 2 as one of 3, and the step
    # had been counted as 6.
    settings = dict(
        train_steps=train_steps, steps_per_execution=3, checkpoint_every_steps=2
    )
    results = fashion_mnist.run(make_flags(tmp_path, **settings))
    assert results["train_steps"] == train_steps
    with np.load(tmp_path / checkpoint.CHECKPOINT) as saved:
        assert int(saved["step"]) == train_steps
        assert int(saved["variables/sgd/iteration"]) == train_steps


@backends.tensorflow_only
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


@backends.tensorflow_only
def test_tpu_strategy_goes_through_the_cluster_resolver(monkeypatch):
    resolved = []

    class Resolver:
        def __init__(self, tpu):
            resolved.append(tpu)
            raise urllib.error.URLError(f"no TPU named {tpu}")

    monkeypatch.setattr(
        tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver
    )
    # Off Google Cloud a TPU's name had ended in the resolver's URLError.
    message = "--tpu='node-1' names no TPU.*no TPU named node-1"
    with pytest.raises(ValueError, match=message):
        strategy_lib.get_strategy("tpu", "node-1")
    assert resolved == ["node-1"]
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


# Two steps an epoch, a checkpoint every step, the quickest model.
SHORT = dict(
    model="mlp",
    train_examples=32,
    batch_size=16,
    train_steps=6,
    checkpoint_every_steps=1,
    deterministic=True,
)


def _interrupted(monkeypatch, output_dir, step, **settings):
    """A run of `SHORT` in `output_dir`, interrupted after `step`."""
    run_killed_after_step(
        monkeypatch,
        step,
        fashion_mnist.run,
        make_flags(output_dir, **SHORT, **settings),
    )


def test_a_resume_with_other_settings_is_refused_naming_each(
    tmp_path, monkeypatch
):
    _interrupted(monkeypatch, tmp_path, 3)
    before = _saved_arrays(tmp_path / checkpoint.CHECKPOINT)
    changed = dict(seed=1, rho=0.1, learning_rate=0.5, train_steps=8)
    with pytest.raises(checkpoint.CheckpointError) as error:
        fashion_mnist.run(make_flags(tmp_path, **{**SHORT, **changed}))
    assert error_line(error.value) == (
        f"CheckpointError: {tmp_path} holds the checkpoint of another run "
        "(step 3), whose settings differ: --seed=0 there, --seed=1 now; "
        "--learning_rate=0.02 there, --learning_rate=0.5 now; --rho=0.05 "
        "there, --rho=0.1 now; --train_steps=6 there, --train_steps=8 now. "
        "Run it with its own settings to resume it, or train afresh "
        "in another --output_dir (or after removing "
        f"{tmp_path})."
    )
    after = _saved_arrays(tmp_path / checkpoint.CHECKPOINT)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert not (tmp_path / loop.RESULTS).exists()

    # What only reports, saves or places things may change.
    results = fashion_mnist.run(
        make_flags(
            tmp_path,
            **{**SHORT, "checkpoint_every_steps": 2},
            eval_every_epochs=2,
            verbose=2,
        )
    )
    assert results["resumed_from_step"] == 3
    assert results["train_steps"] == 6


def test_a_second_process_stops_before_it_loads_its_data(tmp_path):
    # The lock had been taken after the data and the model, which may take
    # minutes (a streamed data set, a large model).
    loaded = []
    config = trainer_config.TrainingConfig.from_flags(make_flags(tmp_path))
    with checkpoint.DirectoryLock(str(tmp_path / loop.lock_name())):
        with pytest.raises(checkpoint.DirectoryInUseError):
            loop.run(config, loaded.append)
    assert loaded == []


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(
    tmp_path, monkeypatch, capsys
):
    whole = fashion_mnist.run(make_flags(tmp_path / "whole", **SHORT))
    cut = tmp_path / "cut"
    _interrupted(monkeypatch, cut, 3)
    newest = cut / checkpoint.CHECKPOINT
    previous = cut / (checkpoint.CHECKPOINT + checkpoint.PREVIOUS)
    assert int(_saved_arrays(previous)["step"]) == 2
    # A byte flipped in the middle, as a failing disk would.
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    # And what a write killed midway leaves.
    stale = cut / f"{checkpoint.TMP_PREFIX}{checkpoint.CHECKPOINT}-dead"
    stale.write_bytes(b"PK\x03\x04 half a zip file")
    capsys.readouterr()

    resumed = fashion_mnist.run(make_flags(cut, **SHORT))
    printed = capsys.readouterr()
    assert f"Warning: Checkpoint {newest} is corrupt" in printed.err
    assert f"resuming from {previous} (step 2) instead." in printed.err
    assert f"Removed 1 file(s) an interrupted write left in {cut}" in (
        printed.out
    )
    assert not stale.exists()
    # Set aside: the next save had made it the previous one, in place of
    # the only good one, until the save after.
    corrupt = cut / (checkpoint.CHECKPOINT + checkpoint.CORRUPT)
    assert corrupt.read_bytes() == bytes(data)
    assert f"Moved the corrupt {newest} to {corrupt}." in printed.err
    assert resumed["resumed_from_step"] == 2
    assert resumed["test_loss"] == whole["test_loss"]
    assert resumed["history"]["loss"] == whole["history"]["loss"]

    # With no good checkpoint left, one line names each and the way out.
    for path in (newest, previous):
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError) as error:
        fashion_mnist.run(make_flags(cut, **SHORT))
    line = error_line(error.value)
    assert line.startswith(f"CheckpointError: No usable checkpoint in {cut}: ")
    assert f"Checkpoint {newest} is corrupt and cannot be read" in line
    assert f"Checkpoint {previous} is corrupt and cannot be read" in line
    assert line.endswith(
        "Move them away to train afresh in this --output_dir, or use "
        "another --output_dir."
    )


@contextlib.contextmanager
def _small_filesystem(path, size):
    """A tmpfs of `size` mounted at `path`, or None where this process may
    not mount one (then the caller injects the error)."""
    os.makedirs(path)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", path], check=True)


def _fill(path, leave):
    """Fills the file system of `path` with a file, but for `leave` bytes."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    os.truncate(path, max(0, os.path.getsize(path) - leave))


def test_a_full_disk_and_a_read_only_directory_stop_with_one_line(
    tmp_path, monkeypatch
):
    disk = str(tmp_path / "disk")
    run = os.path.join(disk, "run")
    with contextlib.ExitStack() as stack:
        mounted = stack.enter_context(_small_filesystem(disk, "24m"))
        _interrupted(monkeypatch, run, 3)
        kept = _saved_arrays(os.path.join(run, checkpoint.CHECKPOINT))
        if mounted:
            # Room for TensorBoard's logs, not for a checkpoint.
            _fill(os.path.join(disk, "filler"), leave=1 << 20)
        else:

            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(checkpoint.np, "savez", no_space)
        with pytest.raises(OSError) as error:
            fashion_mnist.run(make_flags(run, **SHORT))
        monkeypatch.undo()
        path = os.path.join(run, checkpoint.CHECKPOINT)
        assert error_line(error.value) == (
            f"OSError: Cannot write the checkpoint {path} at step 4: No "
            "space left on device; the checkpoint of step 3 is intact."
        )
        now = _saved_arrays(path)
        for key in kept:
            np.testing.assert_array_equal(now[key], kept[key])
        assert not glob.glob(os.path.join(run, checkpoint.TMP_PREFIX + "*"))

        if mounted:
            # A read-only view of the same files (files this process still
            # has open keep the tmpfs itself from turning read-only).
            os.remove(os.path.join(disk, "filler"))
            view = str(tmp_path / "read_only")
            os.makedirs(view)
            subprocess.run(["mount", "--bind", disk, view], check=True)
            stack.callback(subprocess.run, ["umount", "-l", view])
            subprocess.run(["mount", "-o", "remount,ro,bind", view], check=True)
            run = os.path.join(view, "run")
            path = os.path.join(run, checkpoint.CHECKPOINT)
        else:
            original_open = os.open

            def read_only(file, flags, *args, **kwargs):
                if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), file)
                return original_open(file, flags, *args, **kwargs)

            monkeypatch.setattr(checkpoint.os, "open", read_only)
        with pytest.raises(OSError) as error:
            fashion_mnist.run(make_flags(run, **SHORT))
        monkeypatch.undo()
        assert error_line(error.value) == (
            f"OSError: Cannot write {os.path.join(run, loop.LOCK)}: Read-only "
            "file system. Nothing written before was damaged; run the same "
            "command again once it can be written, or use another "
            "--output_dir."
        )
        now = _saved_arrays(path)
        for key in kept:
            np.testing.assert_array_equal(now[key], kept[key])


A_FILE = "a file"  # --output_dir names a file
A_URL = "gs://bucket/run"  # --output_dir names a bucket


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            dict(perturbed_variables="kernel,["),
            "ValueError: --perturbed_variables must hold regular "
            "expressions; '[' is not one",
        ),
        (  # it had been refused at the first step, naming the option
            dict(perturbed_variables="no_such_variable"),
            "ValueError: --perturbed_variables selects none of the trainable "
            "variables. Received: --perturbed_variables=['no_such_variable']",
        ),
        (
            dict(micro_batches=64),
            "ValueError: --micro_batches=64 is more than the 16 examples of "
            "each replica's batch (--batch_size=16 over 1 replicas)",
        ),
        (A_FILE, "ValueError: --output_dir={} is a file, not a directory."),
        (  # it had made a local folder "gs:", then failed on TensorBoard's
            A_URL,
            "ValueError: --output_dir must be a local path, or a bucket "
            "mounted as one (GCS FUSE): checkpoints are written atomically "
            "with POSIX renames and locks, which a URL's file system lacks. "
            "Received: --output_dir='gs://bucket/run'",
        ),
        pytest.param(
            dict(steps_per_execution=2),
            "ValueError: Keras' PyTorch trainer runs one step per call. "
            "Received: --steps_per_execution=2",
            marks=pytest.mark.skipif(
                backends.BACKEND != "torch", reason="PyTorch's limit"
            ),
        ),
    ],
    ids=[
        "regex",
        "selects_none",
        "micro_batches",
        "output_dir_a_file",
        "output_dir_a_url",
        "torch_spe",
    ],
)
def test_a_refused_command_says_why_in_one_line_and_writes_nothing(
    tmp_path, monkeypatch, settings, message
):
    output_dir = tmp_path / "run"
    if settings == A_FILE:
        output_dir.write_text("not a directory")
        settings, message = {}, message.format(output_dir)
    if settings == A_URL:
        monkeypatch.chdir(tmp_path)  # where a relative folder would go
        flags_obj = make_flags(A_URL)
    else:
        flags_obj = make_flags(output_dir, **settings)
    with pytest.raises(ValueError) as error:
        fashion_mnist.run(flags_obj)
    assert error_line(error.value).startswith(message)
    assert os.listdir(tmp_path) == (["run"] if output_dir.exists() else [])
    if output_dir.is_file():
        assert output_dir.read_text() == "not a directory"
    elif output_dir.exists():  # refused with the model, in the lock
        assert os.listdir(output_dir) == [loop.LOCK]


def test_files_are_written_with_the_umask(tmp_path, monkeypatch):
    previous = os.umask(0o027)
    try:
        _interrupted(monkeypatch, tmp_path, 3)
        fashion_mnist.run(make_flags(tmp_path, **SHORT))
    finally:
        os.umask(previous)
    for name in (
        checkpoint.CHECKPOINT,
        checkpoint.CHECKPOINT + checkpoint.PREVIOUS,
        loop.RESULTS,
        loop.MODEL,
        loop.LOCK,
    ):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
