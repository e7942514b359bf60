"""A KerasHub causal LM sharded with its own layout, fine-tuned with SAM.

A tiny Gemma (built from its constructor, no preset) is split over two JAX
CPU devices by `GemmaBackbone.get_layout_map` on a (batch=1, model=2) mesh
under `keras.distribution.ModelParallel`: the token embedding, the
attention and the feed-forward kernels each in halves. With LoRA the
trainable weights are the LoRA factors (replicated), the frozen kernels
they adapt are split; without it the split kernels are trained, and SAM's
‖g‖ must be taken over both halves of each. Either way two SAM steps
match the same model on one device, with no distribution.
"""

import keras
import numpy as np
import pytest

import keras_sam
from tests.backends import BACKEND

keras_hub = pytest.importorskip(
    "keras_hub",
    reason="keras-hub is not installed (`make venv` installs it with "
    "`pip install --no-deps`, see the Makefile; it needs Python 3.11+)",
)

pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution.ModelParallel is JAX's"
)

SEQ, VOCAB, N, BATCH = 8, 32, 8, 4
RHO, LR = 0.5, 0.1


def gemma(lora):
    """A 1-block Gemma causal LM (hidden size 8, two query and two
    key/value heads), optionally with LoRA of rank 2."""
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        dropout=0.0,
    )
    model = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    if lora:
        backbone.enable_lora(rank=2)
    return model


def token_data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, SEQ + 2, N)
    mask = np.arange(SEQ + 1)[None, :] < lengths[:, None]
    tokens = rng.integers(1, VOCAB, (N, SEQ + 1)) * mask
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": mask[:, :-1].astype("int32"),
    }
    return x, tokens[:, 1:].astype("int32"), mask[:, 1:].astype("float32")


def fine_tune(model, initial):
    for v in model.variables:
        v.assign(initial[v.path])
    sam = keras_sam.SAMModel(model, rho=RHO)
    sam.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    x, y, weights = token_data()
    history = sam.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    values = {
        v.path: keras.ops.convert_to_numpy(v.value) for v in model.variables
    }
    return values, history.history["loss"][0]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gemma_split_by_its_layout_fine_tunes_as_on_one_device(lora):
    keras.utils.set_random_seed(0)
    whole_model = gemma(lora)
    initial = {
        v.path: keras.ops.convert_to_numpy(v.value)
        for v in whole_model.variables
    }
    whole, whole_loss = fine_tune(whole_model, initial)

    mesh = keras.distribution.DeviceMesh(
        (1, 2), ["batch", "model"], keras.distribution.list_devices()[:2]
    )
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    try:
        with distribution.scope():
            split_model = gemma(lora)
            split, split_loss = fine_tune(split_model, initial)
            specs = {
                v.path: v.value.sharding.spec for v in split_model.variables
            }
    finally:
        keras.distribution.set_distribution(None)

    split_paths = sorted(p for p, spec in specs.items() if "model" in spec)
    assert split_paths == sorted(
        p
        for p in whole
        if p.endswith(
            (
                "token_embedding/embeddings",
                "query/kernel",
                "key/kernel",
                "value/kernel",
                "attention_output/kernel",
                "ffw_gating/kernel",
                "ffw_gating_2/kernel",
                "ffw_linear/kernel",
            )
        )
    )
    trainable = {v.path for v in split_model.trainable_variables}
    assert bool(trainable & set(split_paths)) is not lora
    assert sorted(split) == sorted(whole)
    for path in whole:
        np.testing.assert_allclose(
            split[path], whole[path], rtol=1e-5, atol=1e-6, err_msg=path
        )
    np.testing.assert_allclose(split_loss, whole_loss, rtol=1e-5)
    moved = max(np.abs(whole[p] - initial[p]).max() for p in trainable)
    assert moved > 1e-3
