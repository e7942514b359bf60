"""The trainers as programs: `--help` and errors a user can act on."""

import os
import subprocess
import sys

import pytest

from tests import backends
from tests.trainers_run_test import ROOT

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only


def _program(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "module, own",
    [
        ("trainers.fashion_mnist", []),
        ("trainers.compare_sgd_sam", ["--sharpness_examples"]),
        ("trainers.cifar", ["--dataset"]),
        ("trainers.imagenet", ["--image_size", "--shuffle_buffer"]),
    ],
)
def test_help_lists_the_trainer_flags_with_their_units(module, own):
    result = _program(module, "--help")  # absl then exits with status 1.
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for flag in ["--rho", "--batch_size", "--checkpoint_every_steps", *own]:
        assert f"  {flag}" in result.stdout, flag
    assert "Global batch size, in examples" in result.stdout
    assert "every this many steps" in result.stdout
    # Not absl's and TensorFlow's own (those are under --helpfull).
    assert "--logtostderr" not in result.stdout
    assert "--tt_check_filter" not in result.stdout


def _error_line(result):
    """The one line that a refused run ends with, without a traceback."""
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_missing_data_is_one_line_naming_the_flag_and_the_files(tmp_path):
    result = _program(
        "trainers.fashion_mnist",
        "--data_dir=/nonexistent",
        f"--output_dir={tmp_path}",
    )
    line = _error_line(result)
    assert line.startswith("FileNotFoundError: Fashion-MNIST not found: ")
    assert "--data_dir='/nonexistent' lacks train-images-idx3-ubyte.gz" in line


def test_flags_that_cannot_work_together_are_one_line(tmp_path):
    result = _program(
        "trainers.fashion_mnist",
        "--synthetic_data",
        "--validation_examples=100000",
        f"--output_dir={tmp_path}",
    )
    assert _error_line(result).startswith(
        "ValueError: --validation_examples=100000 leaves no training examples"
    )


def test_analyze_refuses_a_measure_it_cannot_make_before_measuring(tmp_path):
    # --rho=0 passed the flag check, and --top_k above --max_iterations
    # and --m above the examples measured failed only after the
    # eigenvalues (or loading), each naming no flag.
    import keras

    path = str(tmp_path / "model.keras")
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten()]).save(
        path
    )
    common = [f"--checkpoint={path}", "--synthetic_data", "--num_examples=16"]
    result = _program("trainers.analyze", *common, "--rho=0")
    assert result.returncode == 1
    assert "flag --rho=0.0: --rho must be > 0" in result.stderr
    result = _program(
        "trainers.analyze", *common, "--top_k=5", "--max_iterations=4"
    )
    assert _error_line(result) == (
        "ValueError: --top_k=5 needs as many Lanczos steps: "
        "--max_iterations=4 is fewer."
    )
    result = _program(
        "trainers.analyze",
        *common,
        "--m=64",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert _error_line(result) == (
        "ValueError: --m=64 exceeds the 16 examples measured "
        "(--num_examples=16): the m-sharpness needs one set of --m."
    )
    assert not os.path.exists(tmp_path / "out" / "analysis.json")
