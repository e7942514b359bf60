"""A KerasHub causal LM sharded with its own layout, fine-tuned with SAM.

A tiny Gemma (built from its constructor, no preset) is split over four
JAX CPU devices by `GemmaBackbone.get_layout_map` on a (batch=2, model=2)
mesh under `keras.distribution.ModelParallel` (tests/keras_hub_sharded_job.py,
in a process of its own): the token embedding, the attention and the
feed-forward kernels each in halves, the batch in two shards. With LoRA
the trainable weights are the LoRA factors (replicated) and the frozen
kernels they adapt are split; without it the split kernels are trained,
and SAM's ‖g‖ must be taken over both halves of each. Every way, an epoch
of SAM steps matches the same model on one device with no distribution:
one ε per batch shard there is `micro_batches=2` here, and
`sync_perturbations=True` there is plain SAM here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.backends import BACKEND
from tests.keras_hub_sharded_job import CONFIGS

pytest.importorskip(
    "keras_hub",
    reason="keras-hub is not installed (`make venv` installs it with "
    "`pip install --no-deps`, see the Makefile; it needs Python 3.11+)",
)

pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution.ModelParallel is JAX's"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_KERNELS = (
    "token_embedding/embeddings",
    "query/kernel",
    "key/kernel",
    "value/kernel",
    "attention_output/kernel",
    "ffw_gating/kernel",
    "ffw_gating_2/kernel",
    "ffw_linear/kernel",
)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("keras_hub") / "out.npz"
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.keras_hub_sharded_job", str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    with np.load(path) as saved:
        return dict(saved)


def variables(result, config, run):
    prefix = f"{config}:{run}:"
    return {
        k[len(prefix) :]: v for k, v in result.items() if k.startswith(prefix)
    }


@pytest.mark.parametrize("config", CONFIGS)
def test_gemma_split_by_its_layout_fine_tunes_as_on_one_device(result, config):
    assert int(result["devices"]) == 4
    lora = CONFIGS[config][0]
    initial = variables(result, config, "initial")
    whole = variables(result, config, "whole")
    split = variables(result, config, "split")
    split_paths = list(result[f"{config}:split_paths"])
    assert split_paths == sorted(p for p in whole if p.endswith(SPLIT_KERNELS))
    trainable = set(result[f"{config}:trainable"])
    assert bool(trainable & set(split_paths)) is not lora
    assert sorted(split) == sorted(whole)
    for path in whole:
        np.testing.assert_allclose(
            split[path], whole[path], rtol=1e-5, atol=1e-6, err_msg=path
        )
    whole_loss, split_loss = result[f"{config}:loss"]
    np.testing.assert_allclose(split_loss, whole_loss, rtol=1e-5)
    moved = max(np.abs(whole[p] - initial[p]).max() for p in trainable)
    assert moved > 1e-3


def test_each_batch_shard_gets_its_own_epsilon(result):
    # The two LoRA runs on the mesh differ only in one ε per batch shard
    # against one for the whole batch: the mesh really splits the batch.
    per_shard = variables(result, "lora", "split")
    synced = variables(result, "lora_sync", "split")
    trainable = result["lora:trainable"]
    assert max(np.abs(per_shard[p] - synced[p]).max() for p in trainable) > 1e-3
