"""Memory of `SAMModel` against a plain `fit` on Keras' PyTorch backend.

    KERAS_BACKEND=torch python -m benchmarks.torch_memory \
        --output=docs/torch_memory.json

Each contender trains for `--steps` steps in a fresh process (small CNN or
ResNet-20 from `trainers.models`, SGD with momentum, NumPy batches). After
two warm-up steps the process's high-water mark is reset (Linux
`clear_refs`); a callback reads the resident set size after every step.
We report the peak growth over the steps (what the steps need beyond the
model and optimizer) and the growth from step 10 to the last step: an
autograd graph kept from one step to the next would show as a steady
climb there (and in the least-squares slope). Writes
`docs/torch_memory.{json,md}`.
"""

import argparse
import json
import os
import sys

from benchmarks import process
from trainers import checkpoint

CONTENDERS = {
    "sgd": "plain fit",
    "sam": "SAMModel(rho=0.05)",
    "sam_micro_batches": "SAMModel(rho=0.05, micro_batches=4)",
    "momentum_sam": 'SAMModel(rho=1, perturbation="momentum")',
}
INPUT_SHAPES = {"small_cnn": (28, 28, 1), "resnet20": (32, 32, 3)}


def measure(contender, model_name, steps, batch_size):
    """Runs in the child process: trains and returns the RSS figures."""
    import keras
    import numpy as np

    import keras_sam
    from trainers import models

    keras.utils.set_random_seed(0)
    shape = INPUT_SHAPES[model_name]
    base = models.build(model_name, shape, 10)
    if contender == "sgd":
        model = base
    elif contender == "sam":
        model = keras_sam.SAMModel(base, rho=0.05)
    elif contender == "sam_micro_batches":
        model = keras_sam.SAMModel(base, rho=0.05, micro_batches=4)
    else:
        model = keras_sam.SAMModel(base, rho=1.0, perturbation="momentum")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.random((batch_size * steps, *shape), dtype=np.float32)
    y = rng.integers(0, 10, batch_size * steps)
    warm = 2 * batch_size
    model.fit(x[:warm], y[:warm], batch_size=batch_size, verbose=0)
    process.reset_peak()
    before = process.status_kb("VmRSS")
    after_step = []
    model.fit(
        x,
        y,
        batch_size=batch_size,
        shuffle=False,
        verbose=0,
        callbacks=[
            keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: after_step.append(
                    process.status_kb("VmRSS")
                )
            )
        ],
    )
    return {
        "peak_growth_mb": (process.status_kb("VmHWM") - before) / 1024,
        "growth_step_10_to_last_mb": (after_step[-1] - after_step[9]) / 1024,
        # Least-squares slope of the RSS over steps 10.., in KB a step.
        "slope_kb_per_step": float(
            np.polyfit(np.arange(len(after_step) - 9), after_step[9:], 1)[0]
        ),
        "steps": len(after_step),
    }


def run_child(contender, model_name, steps, batch_size):
    code = (
        "import json; from benchmarks import torch_memory as m; "
        f"print(json.dumps(m.measure({contender!r}, {model_name!r}, "
        f"{steps}, {batch_size})))"
    )
    return json.loads(process.last_line_of_python(code, KERAS_BACKEND="torch"))


def table(results):
    lines = [
        "| model | contender | peak growth over the steps (MB) | "
        "growth, step 10 → last (MB) | slope from step 10 (KB/step) |",
        "|---|---|---|---|---|",
    ]
    for model_name, rows in results["models"].items():
        for contender, r in rows.items():
            lines.append(
                f"| {model_name} | {CONTENDERS[contender]} | "
                f"{r['peak_growth_mb']:.1f} | "
                f"{r['growth_step_10_to_last_mb']:.1f} | "
                f"{r['slope_kb_per_step']:.0f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default="docs/torch_memory.json")
    args = parser.parse_args(argv)
    if args.steps < 11:
        raise ValueError(f"--steps must be at least 11. Received: {args.steps}")
    import torch

    results = {
        "command": "KERAS_BACKEND=torch python -m benchmarks.torch_memory "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "models": {},
    }
    for model_name in args.models.split(","):
        results["models"][model_name] = {
            c: run_child(c, model_name, args.steps, args.batch_size)
            for c in CONTENDERS
        }
        print(model_name, results["models"][model_name], flush=True)
    checkpoint.write_json(args.output, results, indent=2)
    write_markdown(results, os.path.splitext(args.output)[0] + ".md")


def write_markdown(results, path):
    steepest = max(
        r["slope_kb_per_step"]
        for rows in results["models"].values()
        for r in rows.values()
    )
    checkpoint.write_text(
        path,
        "# Memory on Keras' PyTorch backend\n\n"
        f"Made by `{results['command']}` (torch {results['torch']}, "
        f"{results['steps']} steps at batch {results['batch_size']}, one "
        "fresh process per row; see the script's docstring).\n\n"
        + table(results)
        + "\n\nHow to read it: the resident set moves with the "
        "allocator by tens of MB either way, so the peaks say only that "
        "a SAM step needs the same order of memory as a plain one. A "
        "step's autograd graph holds its activations (for the small CNN "
        "at batch 64, tens of MB); a graph kept from every step would "
        "climb by that much per step, thousands of MB over the run. "
        f"Here the largest slope is {steepest:.0f} KB a step.\n",
    )


if __name__ == "__main__":
    main()
