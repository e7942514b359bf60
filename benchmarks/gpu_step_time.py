"""SAM and SGD step times on an accelerator, on Keras' JAX backend.

    KERAS_BACKEND=jax python -m benchmarks.gpu_step_time \
        --output=docs/gpu_step_time.json

Needs only JAX (with CUDA on a GPU), Keras and keras_sam: no TensorFlow, no
absl, so it runs where the JAX GPU machines have nothing else. For each
model and precision, a plain Keras model (SGD with momentum) and
`SAMModel(base)` (default ρ) on the same model are compiled once; each step is
Keras' own stateless `train_step` under `jax.jit` with donated state, on
one batch already on the device, so the times are those of the step
itself (no input pipeline). The two are timed in interleaved rounds and we
report the median milliseconds per step of each and their ratio.

Anchor (issue #12): a minimal stateless JAX SAM step on an H100 at batch
128, ms per step SGD → SAM: WRN-16-4 float32 2.99 → 5.83, bfloat16
3.39 → 4.89; WRN-28-10 float32 21.46 → 42.63, bfloat16 10.02 → 19.47.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks import process  # noqa: E402
from trainers import checkpoint  # noqa: E402
from trainers import models  # noqa: E402

SHAPES = {
    "wrn_16_4": ((32, 32, 3), 10),
    "wrn_28_10": ((32, 32, 3), 10),
    "resnet50": ((224, 224, 3), 1000),
}

ANCHOR_MS = {
    ("wrn_16_4", "float32"): (2.99, 5.83),
    ("wrn_16_4", "bfloat16"): (3.39, 4.89),
    ("wrn_28_10", "float32"): (21.46, 42.63),
    ("wrn_28_10", "bfloat16"): (10.02, 19.47),
}


def build(name):
    shape, classes = SHAPES[name]
    if name == "resnet50":
        return keras.applications.ResNet50(
            weights=None, input_shape=shape, classes=classes
        )
    return models.build(name, shape, classes, weight_decay=5e-4)


def compiled_step(name, sam, batch_size, seed=0):
    """A jitted `train_step`, its initial state and one device batch."""
    keras.utils.set_random_seed(seed)
    base = build(name)
    model = keras_sam.SAMModel(base) if sam else base
    # The trainers' models end in logits; keras.applications' in a softmax.
    from_logits = name != "resnet50"
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=from_logits
        ),
    )
    shape, classes = SHAPES[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *shape)).astype("float32")
    y = rng.integers(0, classes, batch_size).astype("int32")
    # One eager-built step creates the optimizer's and metrics' variables.
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    state = process.stateless_state(model)
    step = jax.jit(model.train_step, donate_argnums=0)
    data = (jax.device_put(x), jax.device_put(y))
    return step, state, data


def time_steps(step, state, data, steps):
    start = time.perf_counter()
    for _ in range(steps):
        _, state = step(state, data)
    jax.block_until_ready(state)
    return state, (time.perf_counter() - start) / steps * 1e3


def measure(name, precision, batch_size, steps, rounds, warmup):
    keras.config.set_dtype_policy(
        "mixed_bfloat16" if precision == "bfloat16" else "float32"
    )
    try:
        contenders = {
            "sgd": compiled_step(name, False, batch_size),
            "sam": compiled_step(name, True, batch_size),
        }
    finally:
        keras.config.set_dtype_policy("float32")
    states = {}
    for key, (step, state, data) in contenders.items():
        states[key], _ = time_steps(step, state, data, warmup)
    times = {key: [] for key in contenders}
    ratios = []
    for _ in range(rounds):
        for key, (step, _, data) in contenders.items():
            states[key], ms = time_steps(step, states[key], data, steps)
            times[key].append(ms)
        ratios.append(times["sam"][-1] / times["sgd"][-1])
    sgd = statistics.median(times["sgd"])
    sam = statistics.median(times["sam"])
    return {
        "model": name,
        "precision": precision,
        "batch_size": batch_size,
        "sgd_ms": sgd,
        "sam_ms": sam,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "anchor_ms": ANCHOR_MS.get((name, precision)),
    }


def markdown(rows, device):
    lines = [
        f"Device: {device}. Median ms per step over interleaved rounds;",
        "anchor: a minimal stateless JAX SAM step on an H100 (issue #12).",
        "",
        "| model | precision | batch | SGD ms | SAM ms | SAM / SGD "
        "(min–max) | anchor SGD → SAM ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anchor = r["anchor_ms"]
        anchor = f"{anchor[0]} → {anchor[1]}" if anchor else "—"
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch_size']} | "
            f"{r['sgd_ms']:.2f} | {r['sam_ms']:.2f} | "
            f"{r['ratio_median']:.2f}× ({r['ratio_min']:.2f}–"
            f"{r['ratio_max']:.2f}) | {anchor} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="wrn_16_4,wrn_28_10,resnet50", help="Comma list."
    )
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="Per round.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", default=None, help="JSON; .md beside.")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit("Run with KERAS_BACKEND=jax.")
    for name in args.models.split(","):
        if name not in SHAPES:
            raise SystemExit(
                f"--models: unknown model {name!r}; expected some of "
                f"{sorted(SHAPES)}."
            )
    device = str(jax.devices()[0].device_kind)
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            row = measure(
                name,
                precision,
                args.batch_size,
                args.steps,
                args.rounds,
                args.warmup,
            )
            row["device"] = device
            rows.append(row)
            print(json.dumps(row), flush=True)
            # After every row, so that a run a time limit stops keeps
            # the rows it finished.
            if args.output:
                checkpoint.write_json(args.output, rows)
                checkpoint.write_text(
                    os.path.splitext(args.output)[0] + ".md",
                    markdown(rows, device),
                )
    print(markdown(rows, device))


if __name__ == "__main__":
    main()
