"""SAMModel across processes and on a 2-D mesh, against a NumPy oracle.

Two jobs (tests/jax_sharded_job.py), each in fresh processes with their
own device count: two processes on free 127.0.0.1 ports with two CPU
devices each under `DataParallel` (four shards of every global batch), and
one process with four CPU devices under `ModelParallel` on a (batch=2,
model=2) mesh with the MLP's kernels split over "model". Both run the
MLP of tests/mlp_oracle.py through SAM, ASAM, `sync_perturbations`,
`micro_batches`, BatchNorm, F-SAM and LookSAM (each entry of whose state
is split as its variable); a SAM step gives each batch shard its own ε
(one for the global batch with `sync_perturbations`), normalizes
BatchNorm over the examples that share an ε, and takes ‖g‖ over the whole
model however its kernels are split. Across processes SAM also trains
from one `tf.data` dataset, which Keras shards between them.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import mlp_oracle
from tests.backends import BACKEND
from tests.jax_sharded_job import ALPHA
from tests.jax_sharded_job import BATCH
from tests.jax_sharded_job import COMPILED
from tests.jax_sharded_job import CONFIGS
from tests.jax_sharded_job import DECAY
from tests.jax_sharded_job import EVERY
from tests.jax_sharded_job import LAYOUTS
from tests.jax_sharded_job import LR
from tests.jax_sharded_job import MOMENTUM
from tests.jax_sharded_job import SIGMA
from tests.jax_sharded_job import N
from tests.multi_worker_test import _free_ports
from tests.multi_worker_test import _wait

pytestmark = [
    pytest.mark.skipif(
        BACKEND != "jax", reason="keras.distribution runs on the JAX backend"
    ),
    pytest.mark.skipif(sys.platform != "linux", reason="localhost ports"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 400
DATA_SHARDS = {"data_parallel": 4, "model_parallel": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both jobs' outputs: {"data_parallel": [process 0, process 1],
    "model_parallel": [the process]}, started together."""
    out = tmp_path_factory.mktemp("sharded")
    (port,) = _free_ports(1)
    commands = {
        ("data_parallel", i): ["data_parallel", out / f"dp{i}.npz", port, i]
        for i in range(2)
    }
    commands["model_parallel", 0] = ["model_parallel", out / "mp0.npz"]
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("XLA_FLAGS", None)
    logs, processes = {}, []
    for key, args in commands.items():
        logs[key] = out / f"{key[0]}{key[1]}.log"
        with open(logs[key], "wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.jax_sharded_job"]
                    + [str(a) for a in args],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    codes = _wait(processes, timeout=TIMEOUT)
    tails = "".join(
        p.read_text(errors="replace")[-2000:] for p in logs.values()
    )
    assert codes == [0, 0, 0], tails
    results = {}
    for (mode, _), args in commands.items():
        with np.load(args[1]) as saved:
            results.setdefault(mode, []).append(dict(saved))
    return results


def oracle(config, data_shards, **kwargs):
    """The oracle's variables after the epoch of `config`, and its mean
    loss: each of `data_shards` shards (times `micro_batches`) with its own
    ε, the whole batch with `sync_perturbations`."""
    batchnorm, sam_kwargs = CONFIGS[config]
    sam_kwargs = dict(sam_kwargs)
    rho = sam_kwargs.pop("rho")
    sync = sam_kwargs.pop("sync_perturbations", False)
    parts = sam_kwargs.pop("micro_batches", 1) * (1 if sync else data_shards)
    if sam_kwargs.pop("perturbation", None) == "friendly":
        del sam_kwargs["friendly_sigma"], sam_kwargs["friendly_decay"]
        kwargs["step"] = mlp_oracle.FriendlyStep(SIGMA, DECAY)
    if sam_kwargs.pop("looksam_alpha", None):
        kwargs["step"] = mlp_oracle.LookSAMStep(ALPHA, EVERY)
    x, y = mlp_oracle.data(N)
    params, losses = mlp_oracle.train(
        mlp_oracle.initial_parameters(batchnorm),
        x,
        y,
        BATCH,
        rho,
        parts,
        LR,
        MOMENTUM,
        **sam_kwargs,
        **kwargs,
    )
    return params, np.mean(losses)


def assert_matches(result, config, params, loss):
    for name, want in params.items():
        # `result` holds the whole value or, per process, each local
        # device's copy (broadcast against `want`).
        got = result[f"{config}:{name}"]
        np.testing.assert_allclose(
            got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=2e-6
        )
    np.testing.assert_allclose(result[f"{config}:loss"], loss, rtol=1e-6)


@pytest.mark.parametrize("mode", DATA_SHARDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_fit_matches_the_oracle(runs, mode, config):
    if config == "bn_sync" and mode == "data_parallel":
        pytest.skip("run on the mesh only")
    params, loss = oracle(config, DATA_SHARDS[mode])
    for result in runs[mode]:
        assert int(result["devices"]) == 4
        assert_matches(result, config, params, loss)


def test_keras_shards_a_tf_data_dataset_across_processes(runs):
    # Each process takes every other per-process batch of the rebatched
    # dataset: the rows that the NumPy configurations feed it by hand.
    params, loss = oracle("sam", DATA_SHARDS["data_parallel"])
    for result in runs["data_parallel"]:
        assert_matches(result, "tf_data", params, loss)


def test_the_oracles_tell_the_configurations_apart():
    # Per shard or per batch ε, with or without SAM: the tolerance above
    # separates them.
    per_shard, _ = oracle("bn", 4)
    for other in (oracle("bn", 2)[0], oracle("bn_sync", 4)[0]):
        differences = [np.abs(per_shard[k] - other[k]).max() for k in other]
        assert max(differences) > 1e-3
    moving = "norm/moving_mean"
    assert np.abs(per_shard[moving] - oracle("bn_rho0", 4)[0][moving]).max() > 0
    sam = oracle("sync", 4)[0]
    for variant in ("friendly", "looksam"):
        differences = [
            np.abs(sam[k] - v).max() for k, v in oracle(variant, 4)[0].items()
        ]
        assert max(differences) > 1e-3


def test_every_process_holds_the_same_variables(runs):
    first, second = runs["data_parallel"]
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        if first[key].ndim and key.split(":")[1] in mlp_oracle.TRAINABLE:
            # Two local devices, one replica each.
            assert first[key].shape[0] == 2
            np.testing.assert_array_equal(first[key][0], first[key][1])


def test_epsilon_norm_is_taken_over_the_whole_model(runs):
    # A step that normalized ε on each model shard alone would end
    # measurably elsewhere; SAMModel ends where the global norm leads.
    (result,) = runs["model_parallel"]
    for config in ("sam", "asam"):
        per_shard, _ = oracle(
            config,
            2,
            norms=mlp_oracle.per_model_shard_norms(LAYOUTS, 2),
        )
        whole, loss = oracle(config, 2)
        assert_matches(result, config, whole, loss)
        error = max(
            np.abs(result[f"{config}:{k}"] - v).max()
            for k, v in per_shard.items()
        )
        assert error > 1e-3


def test_no_device_holds_a_whole_sharded_kernel(runs):
    (result,) = runs["model_parallel"]
    from jax.sharding import PartitionSpec

    for name, axes in LAYOUTS.items():
        spec = str(result[f"sam:{name}:spec"])
        assert spec == str(PartitionSpec(*axes))
        # A variant's state is split as its variable, as Keras splits an
        # optimizer's slots.
        for variant in ("friendly", "looksam"):
            assert str(result[f"{variant}:{name}:state_spec"]) == spec
    # The compiled SAM step (clean gradients, ε, w + ε, perturbed
    # gradients) only ever holds each kernel's per-device half.
    d, h, c = mlp_oracle.D, mlp_oracle.H, mlp_oracle.C
    for config in COMPILED:
        shapes = {tuple(s) for s in result[f"{config}:shapes"]}
        assert {(d, h // 2), (h // 2, c)} <= shapes
        for whole in ((d, h), (h, d), (h, c), (c, h)):
            assert whole not in shapes


def test_sync_perturbations_all_reduce_as_two_plain_steps(runs):
    # One clean and one perturbed pass, each with a plain step's
    # collectives (gradients over "batch", activations over "model"),
    # plus the scalars of ‖g‖ and the metrics.
    (result,) = runs["model_parallel"]
    _, plain = result["plain:all_reduce"]
    _, sync = result["sync:all_reduce"]
    assert sync <= 2 * plain + 256


def test_an_epsilon_per_batch_shard_all_reduces_no_more_than_one(runs):
    # Each shard's ε needs only its own clean gradient: no more traffic
    # than one ε for the global batch, whose clean gradient is all-reduced.
    # Over a plain step only the perturbed pass's activations over "model"
    # (the product with the row-split kernel, on a shard's rows) and
    # scalars (ε's norms, the loss, the sharpness).
    (result,) = runs["model_parallel"]
    _, plain = result["plain:all_reduce"]
    _, per_shard = result["sam:all_reduce"]
    _, sync = result["sync:all_reduce"]
    assert per_shard <= sync
    activations = 4 * (BATCH // DATA_SHARDS["model_parallel"]) * mlp_oracle.C
    assert per_shard <= plain + activations + 256
