"""What the benchmarks share: a fresh Python process per contender, the
kernel's figures for the current one (Linux `/proc`), and a compiled
model's state for Keras' stateless JAX step. Standard library only, so
that the GPU scripts, which run without TensorFlow and absl, import it."""

import os
import subprocess
import sys


def last_line_of_python(code, **env):
    """Runs `code` in a fresh interpreter; returns its last printed line."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return out.stdout.strip().splitlines()[-1]


def status_kb(field):
    """A `/proc/self/status` figure in KB: `VmRSS` (resident now) or
    `VmHWM` (the high-water mark, reset by writing 5 to `clear_refs`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def stateless_state(model):
    """The `state` argument of a compiled model's `train_step` on Keras'
    JAX backend, from the public variable lists: (trainable,
    non-trainable, optimizer, metrics) values."""
    return tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
