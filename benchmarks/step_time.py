"""Step time and peak memory of SAM over plain SGD, measured in one process.

    python -m benchmarks.step_time --output=docs/performance.json

For each model, the contenders (plain `fit` with SGD, `SAMModel`, its
m-sharpness and sync options, and the naive port that assigns ε to the
variables, recomputes and subtracts it) are compiled once, then timed in
interleaved rounds, so that load on this shared machine hits all of them
alike. We report per-round ratios to SGD and their median and spread; a
ratio is meaningful, a single wall-clock time is not.
"""

import json
import os
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks import process  # noqa: E402
from keras_sam import perturbations  # noqa: E402
from trainers import models  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list(
        "models",
        ["small_cnn", "resnet20", "wrn_16_4"],
        "Models to time: small_cnn (28x28x1), resnet20 and wrn_16_4 (32x32x3).",
    )
    flags.DEFINE_list(
        "modes", ["graph", "xla"], "Compilation modes: graph and/or xla."
    )
    flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
    flags.DEFINE_integer("steps", 10, "Training steps per contender a round.")
    flags.DEFINE_integer("batch_size", 64, "Batch size of every step.")
    flags.DEFINE_list(
        "contenders",
        CORE,
        f"What to time against sgd; any of {sorted(CONTENDERS)}.",
    )
    flags.DEFINE_bool(
        "pipeline",
        True,
        "Also time the Fashion-MNIST trainer's input pipeline (needs the "
        "data; see --data_dir).",
    )
    flags.DEFINE_string(
        "data_dir",
        "/usr/share/datasets/fashion-mnist",
        "Fashion-MNIST for --pipeline.",
    )
    flags.DEFINE_string("output", None, "Write the results as JSON here.")


MODELS = {
    "small_cnn": (28, 28, 1),
    "resnet20": (32, 32, 3),
    "wrn_16_4": (32, 32, 3),
}


def _build(name):
    return models.build(name, MODELS[name], 10)


class NaiveSAM(keras.Model):
    """What earlier ports do: assign w + ε, recompute, subtract ε back."""

    def __init__(self, base, rho=0.05):
        super().__init__()
        self.base = base
        self.rho = rho

    def call(self, inputs, training=None):
        return self.base(inputs, training=training)

    def train_step(self, data):
        x, y = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        grads = tape.gradient(loss, variables)
        eps = perturbations.sam_perturbation(grads, self.rho)
        for v, e in zip(variables, eps):
            v.assign_add(e)
        with tf.GradientTape() as tape:
            loss2 = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss2, variables)
        for v, e in zip(variables, eps):
            v.assign_sub(e)
        self.optimizer.apply_gradients(zip(grads, variables))
        self._loss_tracker.update_state(loss)
        return self.compute_metrics(x, y, y_pred)


class TwoGradients(keras.Model):
    """The floor of exact SAM: two forward/backward passes, no ε."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def call(self, inputs, training=None):
        return self.base(inputs, training=training)

    def train_step(self, data):
        x, y = data
        variables = self.trainable_variables
        # The second pass sees the batch reversed, so that graph
        # optimizations cannot merge two identical computations into one,
        # and both gradients are used, so that neither pass is pruned.
        passes = []
        for batch_x, batch_y in ((x, y), (x[::-1], y[::-1])):
            with tf.GradientTape() as tape:
                y_pred = self(batch_x, training=True)
                loss = self.compute_loss(x=batch_x, y=batch_y, y_pred=y_pred)
            passes.append(tape.gradient(loss, variables))
        grads = [0.5 * (a + b) for a, b in zip(*passes)]
        self.optimizer.apply_gradients(zip(grads, variables))
        self._loss_tracker.update_state(loss)
        return self.compute_metrics(batch_x, batch_y, y_pred)


def _sam(**kwargs):
    return lambda base: keras_sam.SAMModel(base, rho=0.05, **kwargs)


switching = keras_sam.switching
CONTENDERS = {
    "sgd": lambda base: base,
    "sam": _sam(),
    "floor_two_passes": TwoGradients,
    "sam_micro_batches_2": _sam(micro_batches=2),
    "sam_sync": _sam(sync_perturbations=True),
    "naive_assign_subtract": lambda base: NaiveSAM(base, rho=0.05),
    "asam": lambda base: keras_sam.SAMModel(base, rho=0.5, adaptive=True),
    "gsam": _sam(gsam_alpha=0.1),
    "sam_on": _sam(perturbed_variables="normalization"),
    "periodic_2": _sam(switching=switching.Periodic(2)),
    "periodic_5": _sam(switching=switching.Periodic(5)),
    "randomized_0.5": _sam(switching=switching.Randomized(0.5)),
    "randomized_0.2": _sam(switching=switching.Randomized(0.2)),
    # c = 0 throughout: SAM on about half of the steps, AE-SAM's average.
    "ae_sam": _sam(switching=switching.GradientNormOutlier(c_start=0.0)),
    "looksam_5": _sam(switching=switching.Periodic(5), looksam_alpha=0.7),
}
CORE = [
    "sgd",
    "sam",
    "floor_two_passes",
    "sam_micro_batches_2",
    "sam_sync",
    "naive_assign_subtract",
]


def _dataset(shape, batch_size):
    rng = np.random.default_rng(0)
    x = rng.random((batch_size * 4, *shape), dtype=np.float32)
    y = rng.integers(0, 10, batch_size * 4)
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(batch_size, drop_remainder=True)
        .cache()
        .repeat()
    )


def time_model(name, mode, rounds, steps, batch_size, contenders=CORE):
    dataset = _dataset(MODELS[name], batch_size)
    compiled = {}
    for contender in ["sgd"] + [c for c in contenders if c != "sgd"]:
        wrap = CONTENDERS[contender]
        keras.utils.set_random_seed(0)
        model = wrap(_build(name))
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=(mode == "xla"),
        )
        model.fit(dataset, steps_per_epoch=2, verbose=0)  # trace, warm up
        compiled[contender] = model
    result = interleaved_ratios(compiled, dataset, rounds, steps)
    result["params"] = int(compiled["sgd"].count_params())
    return result


def interleaved_ratios(compiled, datasets, rounds, steps):
    """Seconds per step of each model, and its per-round ratio to "sgd".

    `datasets` is one dataset for all, or a dict with one per model.
    """
    seconds = {c: [] for c in compiled}
    for _ in range(rounds):
        for contender, model in compiled.items():
            data = datasets
            if isinstance(datasets, dict):
                data = datasets[contender]
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=steps, verbose=0)
            seconds[contender].append((time.perf_counter() - start) / steps)
    sgd = np.array(seconds["sgd"])
    result = {"contenders": {}}
    for contender, values in seconds.items():
        ratios = np.array(values) / sgd
        result["contenders"][contender] = {
            "median_step_ms": 1e3 * float(np.median(values)),
            "median_ratio_to_sgd": float(np.median(ratios)),
            "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()),
        }
    return result


def time_pipeline(data_dir, rounds, steps, batch_size):
    """The Fashion-MNIST trainer's tf.data pipeline against in-memory data.

    The same small CNN trains with SGD, fed either by the trainer's own
    pipeline over the real data (gather, scale, one-hot, prefetch) or by
    one cached batch, which costs nothing to produce. The ratio is what
    the input pipeline adds to a step; the pipeline's own throughput is
    measured alone, without training.
    """
    from trainers import data as data_lib
    from trainers import train

    train_split, _, info = data_lib.load("fashion_mnist", data_dir)
    total = (rounds + 1) * steps + 2
    indices = train.step_indices(len(train_split.labels), batch_size, total, 0)
    real = train.training_dataset(train_split, indices, 0, None, 10).repeat()
    cached = real.take(1).cache().repeat()
    compiled = {}
    for name in ("sgd", "real_pipeline"):
        keras.utils.set_random_seed(0)
        model = models.build("small_cnn", info.shape, 10)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        )
        model.fit(cached, steps_per_epoch=2, verbose=0)
        compiled[name] = model
    result = interleaved_ratios(
        compiled, {"sgd": cached, "real_pipeline": real}, rounds, steps
    )
    result["contenders"]["in_memory_batch"] = result["contenders"].pop("sgd")
    iterator = iter(real)
    next(iterator)
    start = time.perf_counter()
    for _ in range(200):
        next(iterator)
    result["pipeline_alone_ms_per_batch"] = (
        1e3 * (time.perf_counter() - start) / 200
    )
    return result


def peak_memory_mb(contender, name, batch_size):
    """Peak RSS growth of training steps in a fresh process (Linux, MB)."""
    code = (
        "import sys; sys.argv=['x']; from benchmarks import step_time as s; "
        f"s._train_only({contender!r}, {name!r}, {batch_size})"
    )
    return float(process.last_line_of_python(code))


def _train_only(contender, name, batch_size):
    """Prints the peak RSS growth (MB) of training steps after warm-up.

    TensorFlow's start-up sets the process's peak, so the high-water mark is
    reset (Linux `clear_refs`) once the step is traced and has run.
    """
    keras.utils.set_random_seed(0)
    model = CONTENDERS[contender](_build(name))
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    dataset = _dataset(MODELS[name], batch_size)
    model.fit(dataset, steps_per_epoch=2, verbose=0)
    process.reset_peak()
    before = process.status_kb("VmRSS")
    model.fit(dataset, steps_per_epoch=5, verbose=0)
    print((process.status_kb("VmHWM") - before) / 1024.0)


def run(flags_obj):
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "batch_size": flags_obj.batch_size,
        "timings": {},
        "peak_rss_mb": {},
    }
    for name in flags_obj.models:
        for mode in flags_obj.modes:
            key = f"{name}/{mode}"
            results["timings"][key] = time_model(
                name,
                mode,
                flags_obj.rounds,
                flags_obj.steps,
                flags_obj.batch_size,
                flags_obj.contenders,
            )
            print(key, json.dumps(results["timings"][key], indent=1))
        results["peak_rss_mb"][name] = {
            c: peak_memory_mb(c, name, flags_obj.batch_size)
            for c in ("sgd", "sam", "naive_assign_subtract")
        }
        print(name, "peak RSS MB", results["peak_rss_mb"][name])
    if flags_obj.pipeline:
        results["pipeline"] = time_pipeline(
            flags_obj.data_dir, flags_obj.rounds, flags_obj.steps, 128
        )
        print("pipeline", json.dumps(results["pipeline"], indent=1))
    if flags_obj.output:
        with open(flags_obj.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
