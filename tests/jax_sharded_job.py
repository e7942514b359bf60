"""SAMModel on a sharded JAX mesh, run in its own process (for tests).

    python -m tests.jax_sharded_job data_parallel OUT.npz PORT PROCESS_ID
    python -m tests.jax_sharded_job model_parallel OUT.npz

`data_parallel`: one of two processes on 127.0.0.1:PORT, each with two
CPU devices, under `DataParallel` over all four; each process feeds its
own consecutive rows of every global batch; it then trains SAM again on
a `tf.data` dataset of the global batches, which Keras shards across the
processes (`DataParallel`'s `auto_shard_dataset`). `model_parallel`: one process
with four CPU devices, `ModelParallel` on a 2 x 2 (batch, model) mesh with
the kernels sharded over "model" (`LAYOUTS`). Each trains the MLP of
tests/mlp_oracle.py for one epoch per configuration in `CONFIGS` and
writes, per configuration, every trained variable as this process's
devices hold it, and the logged loss. `model_parallel` also writes each
variable's partition spec, the 2-D f32 shapes of the compiled, partitioned
SAM steps (what one device holds) and their all-reduces (count, bytes),
and those of the plain step.
"""

import os
import re
import sys

MODE = sys.argv[1] if __name__ == "__main__" else None
if MODE:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + (
        "2" if MODE == "data_parallel" else "4"
    )
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tests import mlp_oracle  # noqa: E402

N, BATCH = 32, 16
RHO, LR, MOMENTUM = 0.5, 0.1, 0.9
SIGMA, DECAY = 0.8, 0.7  # F-SAM's
ALPHA, EVERY = 0.7, 2  # LookSAM's, a SAM step every EVERY steps
# Variable path -> axes (re.fullmatch), as a LayoutMap takes them.
LAYOUTS = {
    "hidden/kernel": (None, "model"),
    "hidden/bias": ("model",),
    "out/kernel": ("model", None),
}
# name -> (with BatchNorm, SAMModel arguments); "bn_sync" on the mesh only.
CONFIGS = {
    "sam": (False, dict(rho=RHO)),
    "asam": (False, dict(rho=RHO, adaptive=True, eta=0.05)),
    "sync": (False, dict(rho=RHO, sync_perturbations=True)),
    "micro": (False, dict(rho=RHO, micro_batches=2)),
    "bn": (True, dict(rho=RHO)),
    "bn_sync": (True, dict(rho=RHO, sync_perturbations=True)),
    "bn_rho0": (True, dict(rho=0.0)),
    # One state per step: one ε for the global batch.
    "friendly": (
        False,
        dict(
            rho=RHO,
            sync_perturbations=True,
            perturbation="friendly",
            friendly_sigma=SIGMA,
            friendly_decay=DECAY,
        ),
    ),
    "looksam": (
        False,
        dict(rho=RHO, sync_perturbations=True, looksam_alpha=ALPHA),
    ),
}
# The configurations whose compiled step `model_parallel` writes.
COMPILED = ("sam", "sync", "friendly", "looksam")


def build(batchnorm):
    import keras

    layers = [keras.Input((mlp_oracle.D,))]
    layers.append(keras.layers.Dense(mlp_oracle.H, "tanh", name="hidden"))
    if batchnorm:
        layers.append(
            keras.layers.BatchNormalization(
                momentum=mlp_oracle.BN_MOMENTUM,
                epsilon=mlp_oracle.BN_EPSILON,
                name="norm",
            )
        )
    layers.append(keras.layers.Dense(mlp_oracle.C, name="out"))
    model = keras.Sequential(layers)
    initial = mlp_oracle.initial_parameters(batchnorm)
    for v in model.variables:
        v.assign(initial[v.path.split("/", 1)[1]])
    return model


def local_values(variable):
    """The whole value, or on several processes the value on each of this
    process's devices, stacked."""
    value = variable.value
    if value.is_fully_addressable:
        return np.asarray(value)
    return np.stack([np.asarray(s.data) for s in value.addressable_shards])


def train(model_fn, x, y, batch, sam_kwargs):
    import keras

    import keras_sam

    base = model_fn()
    if "looksam_alpha" in sam_kwargs:
        switching = keras_sam.switching.Periodic(EVERY)
        sam_kwargs = dict(sam_kwargs, switching=switching)
    model = keras_sam.SAMModel(base, **sam_kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    history = model.fit(
        x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0
    )
    return model, base, history.history["loss"][0]


def compiled_step(model, x, y):
    """The HLO text of `model`'s compiled, partitioned training step on
    the first global batch (what one device runs)."""
    import jax

    state = model._get_jax_state(True, True, True, True)
    mesh = model.trainable_variables[0].value.sharding.mesh
    batch = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("batch")
    )
    data = jax.device_put((x[:BATCH], y[:BATCH]), batch)
    jitted = jax.jit(model.train_step, donate_argnums=0)
    return jitted.lower(state, data).compile().as_text()


def partitioned_shapes(text):
    """The 2-D f32 shapes in HLO text."""
    shapes = {
        tuple(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"f32\[([\d,]*)\]", text)
    }
    return np.array(sorted(s for s in shapes if len(s) == 2))


def all_reduce_bytes(text):
    from benchmarks import sharded_step

    return np.array(sharded_step.collectives(text).get("all-reduce", [0, 0]))


def main(mode, path, port=None, process_id=None):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    x, y = mlp_oracle.data(N)
    every_row = x, y
    batch = BATCH
    if mode == "data_parallel":
        keras.distribution.initialize(
            f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id)
        )
        distribution = keras.distribution.DataParallel(
            devices=jax.devices(), auto_shard_dataset=False
        )
        half = BATCH // 2
        rows = np.concatenate(
            [
                np.arange(
                    start + process_id * half, start + (process_id + 1) * half
                )
                for start in range(0, N, BATCH)
            ]
        )
        x, y, batch = x[rows], y[rows], half
    else:
        mesh = keras.distribution.DeviceMesh(
            (2, 2), ["batch", "model"], jax.devices()
        )
        layout_map = keras.distribution.LayoutMap(mesh)
        for key, axes in LAYOUTS.items():
            layout_map[".*" + key] = axes
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    keras.distribution.set_distribution(distribution)
    out = {"devices": np.array(len(jax.devices()))}
    for name, (batchnorm, sam_kwargs) in CONFIGS.items():
        if name == "bn_sync" and mode == "data_parallel":
            continue
        model, base, loss = train(
            lambda: build(batchnorm), x, y, batch, sam_kwargs
        )
        out[f"{name}:loss"] = np.array(loss)
        for v in base.variables:
            out[f"{name}:{v.path.split('/', 1)[1]}"] = local_values(v)
            if mode == "model_parallel":
                out[f"{name}:{v.path.split('/', 1)[1]}:spec"] = np.array(
                    str(v.value.sharding.spec)
                )
        if mode == "model_parallel":
            # A variant's state, each entry by the path of its variable.
            state = [
                v
                for v in model.variables
                if v.name.startswith(("friendly_average", "looksam_direction"))
            ]
            for v, owner in zip(state, base.trainable_variables):
                spec = str(v.value.sharding.spec)
                out[f"{name}:{owner.path.split('/', 1)[1]}:state_spec"] = (
                    np.array(spec)
                )
        if mode == "model_parallel" and name in COMPILED:
            text = compiled_step(model, x, y)
            out[f"{name}:shapes"] = partitioned_shapes(text)
            out[f"{name}:all_reduce"] = all_reduce_bytes(text)
    if mode == "data_parallel":
        # The user's way: every process passes the whole `tf.data` dataset
        # of global batches, which Keras shards across the processes.
        import tensorflow as tf

        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices())
        )
        dataset = tf.data.Dataset.from_tensor_slices(every_row).batch(BATCH)
        _, base, loss = train(
            lambda: build(False), dataset, None, None, CONFIGS["sam"][1]
        )
        out["tf_data:loss"] = np.array(loss)
        for v in base.variables:
            out[f"tf_data:{v.path.split('/', 1)[1]}"] = local_values(v)
    if mode == "model_parallel":
        plain = build(False)
        plain.compile(
            optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        plain.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        out["plain:all_reduce"] = all_reduce_bytes(compiled_step(plain, x, y))
    np.savez(path, **out)


if __name__ == "__main__":
    main(
        MODE,
        sys.argv[2],
        *(sys.argv[3:4] + [int(a) for a in sys.argv[4:5]]),
    )
