"""A tiny KerasHub Gemma fine-tuned with SAM, sharded on four CPU devices
and whole on one, run in its own process (for tests).

    python -m tests.keras_hub_sharded_job OUT.npz

The process has four JAX CPU devices. Each configuration of `CONFIGS`
fine-tunes the same Gemma twice from the same weights: split by
`GemmaBackbone.get_layout_map` on a (batch=2, model=2) mesh under
`keras.distribution.ModelParallel`, and whole on one device with no
distribution, with the SAM arguments that give the same step there (one ε
per batch shard is one ε per micro-batch). It writes, per configuration,
both runs' variables, their losses, and the paths of the variables the
layout splits over "model".
"""

import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SEQ, VOCAB, N, BATCH = 8, 32, 8, 4
RHO, LR = 0.5, 0.1
MESH = (2, 2)
# name -> (LoRA, SAM arguments on the mesh, SAM arguments on one device).
CONFIGS = {
    "lora": (True, dict(rho=RHO), dict(rho=RHO, micro_batches=2)),
    "full": (False, dict(rho=RHO), dict(rho=RHO, micro_batches=2)),
    "lora_sync": (
        True,
        dict(rho=RHO, sync_perturbations=True),
        dict(rho=RHO),
    ),
}


def gemma(lora):
    """A 1-block Gemma causal LM (hidden size 8, two query and two
    key/value heads), optionally with LoRA of rank 2."""
    import keras_hub

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
    """Token ids with padding, their next tokens, and the padding mask as
    sample weights."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, SEQ + 2, N)
    mask = np.arange(SEQ + 1)[None, :] < lengths[:, None]
    tokens = rng.integers(1, VOCAB, (N, SEQ + 1)) * mask
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": mask[:, :-1].astype("int32"),
    }
    return x, tokens[:, 1:].astype("int32"), mask[:, 1:].astype("float32")


def fine_tune(model, initial, sam_kwargs):
    import keras

    import keras_sam

    for v in model.variables:
        v.assign(initial[v.path])
    sam = keras_sam.SAMModel(model, **sam_kwargs)
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


def main(path):
    import keras
    import keras_hub

    out = {}
    for name, (lora, on_mesh, on_one_device) in CONFIGS.items():
        keras.utils.set_random_seed(0)
        whole_model = gemma(lora)
        initial = {
            v.path: keras.ops.convert_to_numpy(v.value)
            for v in whole_model.variables
        }
        whole, whole_loss = fine_tune(whole_model, initial, on_one_device)
        mesh = keras.distribution.DeviceMesh(
            MESH, ["batch", "model"], keras.distribution.list_devices()
        )
        distribution = keras.distribution.ModelParallel(
            layout_map=keras_hub.models.GemmaBackbone.get_layout_map(mesh),
            batch_dim_name="batch",
        )
        try:
            with distribution.scope():
                split_model = gemma(lora)
                split, split_loss = fine_tune(split_model, initial, on_mesh)
                specs = {
                    v.path: v.value.sharding.spec for v in split_model.variables
                }
        finally:
            keras.distribution.set_distribution(None)
        trainable = [v.path for v in split_model.trainable_variables]
        out[f"{name}:split_paths"] = np.array(
            sorted(p for p, spec in specs.items() if "model" in spec)
        )
        out[f"{name}:trainable"] = np.array(sorted(trainable))
        out[f"{name}:loss"] = np.array([whole_loss, split_loss])
        for p in whole:
            out[f"{name}:initial:{p}"] = initial[p]
            out[f"{name}:whole:{p}"] = whole[p]
            out[f"{name}:split:{p}"] = split[p]
    out["devices"] = np.array(len(keras.distribution.list_devices()))
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
