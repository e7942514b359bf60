"""What a SAM step costs each device on a sharded JAX mesh.

    python -m benchmarks.sharded_step

In a fresh process with four CPU devices, a (batch=2, model=2) mesh under
`keras.distribution.ModelParallel` splits an MLP's two large kernels over
"model" (the first by columns, the second by rows). For each contender
this compiles Keras' JAX training step (`jax.jit(model.train_step)`) on
one global batch and reads, per device, XLA's memory analysis of the
partitioned program and the collectives in its HLO (count and bytes of
their results). The target for SAM: no more memory per device than the
plain step plus one copy of that device's shard of the trainable weights,
and no array the size of a whole sharded kernel. Writes
docs/sharded_step.json and docs/sharded_step.md.
"""

import collections
import json
import math
import re

from absl import app
from absl import flags

from benchmarks import process

FLAGS = flags.FLAGS

COMMAND = "python -m benchmarks.sharded_step"
D, H, C, BATCH = 256, 1024, 16, 64
LAYOUTS = {"hidden/kernel": (None, "model"), "wide/kernel": ("model", None)}
CONTENDERS = {
    "plain": None,
    "sam": dict(rho=0.05),
    "sam_sync": dict(rho=0.05, sync_perturbations=True),
    "sam_micro2": dict(rho=0.05, micro_batches=2),
}
LABELS = {
    "plain": "plain step",
    "sam": "SAM (ε per batch shard)",
    "sam_sync": "SAM, `sync_perturbations=True`",
    "sam_micro2": "SAM, `micro_batches=2`",
}
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4}
BYTES.update({"pred": 1, "s8": 1, "u8": 1, "s64": 8, "u64": 8})


def define_flags():
    flags.DEFINE_list("contenders", list(CONTENDERS), "Steps to compile.")
    flags.DEFINE_string("output", "docs/sharded_step", "Report, no suffix.")


def array_bytes(types):
    """Bytes of the arrays in an HLO type (`f32[4,6]{1,0}`, a tuple...)."""
    return sum(
        BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", types)
    )


def collectives(hlo_text):
    """{kind: [count, bytes]} of the collectives in HLO text; an async
    pair (`-start`/`-done`) counts once, at its `-done` (its result)."""
    found = collections.defaultdict(lambda: [0, 0])
    pattern = r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-done)?\("
    for line in hlo_text.splitlines():
        match = re.search(pattern, line)
        if match:
            found[match.group(2)][0] += 1
            found[match.group(2)][1] += array_bytes(match.group(1))
    return {k: found[k] for k in COLLECTIVES if k in found}


def _measure(contender):
    """In a process with four CPU devices: one contender's figures."""
    import jax
    import keras

    import keras_sam

    mesh = keras.distribution.DeviceMesh(
        (2, 2), ["batch", "model"], jax.devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in LAYOUTS.items():
        layout_map[".*" + key] = axes
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(H, "relu", name="hidden"),
            keras.layers.Dense(D, "relu", name="wide"),
            keras.layers.Dense(C, name="out"),
        ]
    )
    sam_kwargs = CONTENDERS[contender]
    model = (
        base if sam_kwargs is None else keras_sam.SAMModel(base, **sam_kwargs)
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.randn(BATCH, D).astype("float32")
    y = rng.randint(0, C, BATCH)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    state = process.stateless_state(model)
    batch_sharding = jax.sharding.NamedSharding(
        mesh.backend_mesh, jax.sharding.PartitionSpec("batch")
    )
    data = jax.device_put((x, y), batch_sharding)
    compiled = (
        jax.jit(model.train_step, donate_argnums=0).lower(state, data).compile()
    )
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    kernels = {}
    for v in base.trainable_variables:
        path = v.path.split("/", 1)[1]
        local = v.value.addressable_shards[0].data
        kernels[path] = dict(
            shape=list(v.shape), device_shape=list(local.shape)
        )
    whole = {
        tuple(k["shape"])
        for p, k in kernels.items()
        if p in LAYOUTS and k["shape"] != k["device_shape"]
    }
    shapes = {
        tuple(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"f32\[([\d,]*)\]", text)
    }
    return dict(
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        weight_shard_bytes=sum(
            4 * math.prod(k["device_shape"]) for k in kernels.values()
        ),
        whole_kernel_arrays=sorted(
            list(s) for s in shapes if s in whole or s[::-1] in whole
        ),
        variables=kernels,
        collectives=collectives(text),
    )


def _print_measure(contender):
    print(json.dumps(_measure(contender)))


def measure(contender):
    code = (
        "import sys; sys.argv=['x']; from benchmarks import sharded_step; "
        f"sharded_step._print_measure({contender!r})"
    )
    return json.loads(
        process.last_line_of_python(
            code,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            KERAS_BACKEND="jax",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
    )


def total(m):
    """Per-device bytes the step needs at once: its inputs, its outputs
    not written over its inputs, and its temporaries."""
    return (
        m["argument_bytes"]
        + m["output_bytes"]
        - m["alias_bytes"]
        + m["temp_bytes"]
    )


def report(measured):
    measured = {c: measured[c] for c in CONTENDERS if c in measured}
    mb = 2**20
    plain = measured.get("plain")
    lines = [
        "# A SAM step on a sharded JAX mesh: memory and collectives",
        "",
        "Made by",
        "",
        f"```sh\n{COMMAND}\n```",
        "",
        "which writes `docs/sharded_step.json`, the source of every number "
        f"here. Four CPU devices as a (batch=2, model=2) mesh under "
        "`keras.distribution.ModelParallel`; an MLP "
        f"`{D} -> Dense({H}, relu) -> Dense({D}, relu) -> Dense({C})` "
        "whose two large kernels are split over `model` (by columns, then "
        f"by rows); global batch {BATCH}; SGD with momentum. Per device, "
        "from XLA's memory analysis of the compiled, partitioned training "
        "step (`jax.jit(model.train_step).lower(...).compile()`).",
        "",
        "| step | arguments MB | temporaries MB | total MB | over plain MB "
        "| weight shard MB | within target | whole-kernel arrays |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in measured.items():
        over = total(m) - total(plain) if plain else float("nan")
        within = (
            ""
            if name == "plain" or not plain
            else ("yes" if over <= m["weight_shard_bytes"] else "no")
        )
        lines.append(
            f"| {LABELS.get(name, name)} | {m['argument_bytes'] / mb:.2f} | "
            f"{m['temp_bytes'] / mb:.2f} | {total(m) / mb:.2f} | "
            f"{'' if name == 'plain' else f'{over / mb:+.2f}'} | "
            f"{m['weight_shard_bytes'] / mb:.2f} | {within} | "
            f"{len(m['whole_kernel_arrays'])} |"
        )
    lines += [
        "",
        "*Total* is arguments + outputs − outputs aliased to arguments + "
        "temporaries. The target for a SAM step is *over plain* ≤ the "
        "device's shard of the trainable weights (ε and `w + ε` held as "
        "shards like the weights). *Whole-kernel arrays* counts f32 "
        "arrays in the partitioned program of a sharded kernel's full "
        "shape (or its transpose): 0 means no device ever gathers one.",
        "",
        "## Collectives per step (count, MB of their results per device)",
        "",
        "| step | " + " | ".join(COLLECTIVES) + " |",
        "|---|" + "---|" * len(COLLECTIVES),
    ]
    for name, m in measured.items():
        cells = [
            "{} ({:.3f})".format(*_scaled(m["collectives"].get(k, [0, 0])))
            for k in COLLECTIVES
        ]
        lines.append(
            f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Counted in the HLO text of the compiled step: an instruction of "
        "each kind, with the bytes of the arrays it returns on one device.",
    ]
    if plain:
        lines += ["", "## What SAM adds over the plain step", ""]
        for name, m in measured.items():
            if name == "plain":
                continue
            count, size = _added(m, plain)
            shard = m["weight_shard_bytes"]
            extra = total(m) - total(plain)
            lines.append(
                f"- {LABELS.get(name, name)}: {count:+d} collectives, "
                f"{size / 2**20:+.2f} MB moved per device "
                f"({size / shard:.1f} × the device's weight shard), "
                f"{extra / 2**20:+.2f} MB of memory ({extra / shard:.1f} × "
                "the shard)."
            )
        lines += [
            "",
            "A step with one ε per batch shard runs the shards' passes as "
            "one computation vmapped over a leading shard axis placed on the "
            "`batch` mesh axis (`keras_sam.batch_parts.map_shards`), so each "
            "shard's clean gradient, ε, `w + ε` and perturbed gradient stay "
            "on the devices that hold its rows, split over `model` like the "
            "weights. Over a plain step it all-reduces the scalars of each "
            "shard's ‖∇L(w)‖ over `model` (per variable), the perturbed "
            "pass's activations over `model` as the clean pass does, and "
            "the loss and sharpness; the gradients are all-reduced once, "
            "for their mean over the shards, as in a plain step. With "
            "`micro_batches=2` each shard's two micro-batches run in turn "
            "inside that computation: about the same bytes moved, more "
            "memory. With "
            "`sync_perturbations=True` there is one part: its clean gradient "
            "is all-reduced once more than a plain step's, for ε.",
        ]
    return "\n".join(lines) + "\n"


def _added(m, plain):
    """(collectives, bytes) of `m` over `plain`."""
    ours, theirs = m["collectives"], plain["collectives"]
    count = sum(v[0] for v in ours.values()) - sum(
        v[0] for v in theirs.values()
    )
    size = sum(v[1] for v in ours.values()) - sum(v[1] for v in theirs.values())
    return count, size


def _scaled(entry):
    return entry[0], entry[1] / 2**20


def run(flags_obj):
    # Imports Keras, which this parent process otherwise leaves to the
    # measuring children.
    from trainers import checkpoint

    measured = {c: measure(c) for c in flags_obj.contenders}
    checkpoint.write_json(flags_obj.output + ".json", measured, sort_keys=True)
    checkpoint.write_text(flags_obj.output + ".md", report(measured))
    return measured


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
