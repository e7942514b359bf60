"""benchmarks.gpu_pair, the GPU study's script, run small on the CPU."""

import gzip
import json

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the GPU machines run JAX only"
)


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 64)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = rng.integers(0, 10, n)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def _run(data_dir, tmp_path, rho):
    from benchmarks import gpu_pair

    output = tmp_path / f"pair_{rho}.json"
    gpu_pair.main(
        [
            f"--data_dir={data_dir}",
            "--model=mlp",
            "--epochs=2",
            "--batch_size=64",
            f"--rho={rho}",
            f"--output={output}",
        ]
    )
    return json.loads(output.read_text())


def test_sam_at_rho_0_is_the_sgd_run_so_both_start_and_train_alike(
    fashion_mnist_dir, tmp_path
):
    record = _run(fashion_mnist_dir, tmp_path, 0.0)
    assert record["finished_epochs"] == 2
    sgd, sam = record["history"]["sgd"], record["history"]["sam"]
    # Same initial weights, batches and augmentation: ρ = 0 is a plain fit.
    for a, b in zip(sgd, sam):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["test_accuracy"] == b["test_accuracy"]


def test_sam_differs_from_sgd_at_a_positive_rho(fashion_mnist_dir, tmp_path):
    record = _run(fashion_mnist_dir, tmp_path, 0.5)
    sgd, sam = record["history"]["sgd"], record["history"]["sam"]
    assert abs(sgd[-1]["train_loss"] - sam[-1]["train_loss"]) > 1e-4
