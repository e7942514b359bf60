"""Which backend trains the CNN study fastest here: one epoch of each.

    python -m benchmarks.cnn_epoch_time --output=docs/cnn_epoch_time.json

Trains `benchmarks.generalization.CNN_REGIME` with SAM for two epochs in a
fresh process per backend and mode (TensorFlow graph, TensorFlow XLA, JAX
jit) and records the second epoch's training CPU and wall seconds (the
first compiles). Run it on an otherwise idle machine: CPU time moves with
the load of other processes.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from benchmarks import generalization
from trainers import checkpoint

FLAGS = flags.FLAGS
# (backend, --jit_compile) of each contender.
MODES = {
    "tensorflow_graph": ("tensorflow", "false"),
    "tensorflow_xla": ("tensorflow", "true"),
    "jax_jit": ("jax", "true"),
}


def define_flags():
    flags.DEFINE_list("modes", list(MODES), f"Of {list(MODES)}.")
    flags.DEFINE_float("rho", 0.1, "SAM's ρ (its cost does not depend on it).")
    flags.DEFINE_string("output", None, "JSON file for the results.")


def command(mode, output_dir, rho):
    backend, jit = MODES[mode]
    regime = dict(generalization.CNN_REGIME, epochs=2, eval_every_epochs=2)
    args = [f"--{k}={v}" for k, v in regime.items()]
    args += [f"--jit_compile={jit}", f"--rho={rho}", "--verbose=0"]
    args += [f"--output_dir={output_dir}"]
    env = dict(os.environ, KERAS_BACKEND=backend)
    return [sys.executable, "-m", "trainers.fashion_mnist", *args], env


def measure(mode, rho):
    with tempfile.TemporaryDirectory() as output_dir:
        cmd, env = command(mode, output_dir, rho)
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        with open(os.path.join(output_dir, "results.json")) as f:
            history = json.load(f)["history"]
    return dict(
        cpu_seconds=history["epoch_train_cpu_seconds"][-1],
        wall_seconds=history["epoch_train_wall_seconds"][-1],
    )


def run(flags_obj):
    results = {mode: measure(mode, flags_obj.rho) for mode in flags_obj.modes}
    summary = dict(regime=generalization.CNN_REGIME, epochs=results)
    if flags_obj.output:
        checkpoint.write_json(flags_obj.output, summary)
    print(json.dumps(summary, indent=1))
    return summary


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
