"""What a SAM step costs over an SGD step, in CPU time, measured in one process.

    taskset -c 0 python -m benchmarks.step_time \
        --output=docs/performance.json
    taskset -c 0 python -m benchmarks.step_time --pipeline=false \
        --output=docs/performance_repeat.json
    KERAS_BACKEND=torch taskset -c 0 python -m benchmarks.step_time \
        --modes=torch,torch_compile --models=small_cnn,resnet20 \
        --memory=false --pipeline=false --output=docs/performance_torch.json

For each model and mode, every contender (plain `fit` with SGD, exact SAM,
the two-pass floor, the naive port, every variant of `SAMModel`) is
compiled once; then all are timed in interleaved rounds. A round times one
step of each (a whole period of a switching policy), calling Keras' train
function directly, with an SGD step between every two contenders, and
records the process's CPU time (`time.process_time`) and the wall time of
each step. A contender's ratio is to the SGD step beside it; the report
gives its median over many rounds. A step's CPU time here varies by
10-15 % from one step to the next, so many short rounds of neighbouring
steps estimate a ratio better than a few long ones. TensorFlow runs on one
thread (`--threads`): CPU time then counts the step's work only.

Memory (`--memory`) is the peak of the bytes of live tensors while a
contender trains, from the allocation events TensorFlow's allocator
records, and the allocator's own peak, in a fresh process per contender
and mode (`peak_memory_mb`).

The second command repeats the timings and the memory after the first, so
that the report can show how well two runs agree; run them one after the
other on an otherwise idle machine (two runs side by side, one per core,
disagreed by up to 30 %: they share the cache and the memory bus).

The third times the same steps on Keras' PyTorch backend, eagerly (`torch`)
and under `torch.compile` (`torch_compile`, `jit_compile=True`): SGD and
the contenders that are a `SAMModel` (`TORCH_TIMED`; the floor and the
naive port are written with `tf.GradientTape`), on one batch already in
torch tensors, with torch on `--threads` threads. Memory on PyTorch is
`benchmarks.torch_memory`'s.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks import allocations  # noqa: E402
from benchmarks import process  # noqa: E402
from keras_sam import compat  # noqa: E402
from keras_sam import perturbations  # noqa: E402
from trainers import checkpoint  # noqa: E402
from trainers import models  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list(
        "models",
        list(MODELS),
        f"Models to time, any of {list(MODELS)}.",
    )
    flags.DEFINE_list(
        "modes",
        ["graph", "xla"],
        f"Compilation modes, of {list(JIT_COMPILE)}: graph and/or xla on "
        "TensorFlow, torch (eager) and/or torch_compile (torch.compile) "
        "with KERAS_BACKEND=torch.",
    )
    flags.DEFINE_list(
        "rounds",
        [
            "small_cnn:32",
            # Its switched SAM step under XLA is long (0.7-0.9 s) and
            # bimodal; 40 rounds left its ratio 5.6 % apart in two runs.
            "small_cnn_no_dropout:80",
            "resnet20:24",
            "wrn_16_4:8",
        ],
        "Interleaved timing rounds, as model:rounds, after one untimed round "
        "(the first steps after compiling run slow).",
    )
    flags.DEFINE_list(
        "steps",
        ["small_cnn:1", "small_cnn_no_dropout:1", "resnet20:1", "wrn_16_4:1"],
        "Training steps per contender and round, as model:steps.",
    )
    flags.DEFINE_integer("batch_size", 64, "Batch size of every step.")
    flags.DEFINE_list(
        "contenders",
        list(CONTENDERS),
        "What to time against sgd, of what `TIMED` lists for each model; "
        f"any of {list(CONTENDERS)}.",
    )
    flags.DEFINE_list(
        "xla_switching_models",
        ["small_cnn_no_dropout"],
        f"Models whose {SWITCHED_SAM_STEPS} are timed under XLA too. XLA's CPU "
        "compiler runs weight-gradient convolutions inside a conditional "
        "~100x slower (jax-ml/jax#12868), and these policies take SAM "
        "behind one, so on larger models a step takes minutes.",
    )
    flags.DEFINE_integer(
        "threads",
        1,
        "TensorFlow's intra- and inter-op threads (torch's threads on "
        "PyTorch); 0 keeps the default. With one thread, process CPU time "
        "counts the step's work and nothing else (no idle workers "
        "spinning).",
    )
    flags.DEFINE_bool("timings", True, "Time the steps (see --models).")
    flags.DEFINE_bool(
        "memory",
        True,
        "Also measure peak memory, in a fresh process per contender and mode.",
    )
    flags.DEFINE_integer(
        "graph_memory_processes",
        3,
        "Fresh processes per contender whose peak memory is measured in "
        "graph mode. The peak can depend on the order in which "
        "TensorFlow's executor runs the ops that are ready, which may differ "
        "between processes (the floor's on the small CNN moved by 2.9 MB); "
        "XLA assigns its buffers when it compiles, so one process measures "
        "it.",
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
    flags.DEFINE_string(
        "output",
        None,
        "Write the results as JSON here, after every model and mode.",
    )


# `jit_compile` of each mode; the torch modes need KERAS_BACKEND=torch.
JIT_COMPILE = {
    "graph": False,
    "xla": True,
    "torch": False,
    "torch_compile": True,
}
TORCH_MODES = ("torch", "torch_compile")

MODELS = {
    "small_cnn": (28, 28, 1),
    # The same CNN without its dropout layer: under XLA on a CPU, dropout's
    # random numbers cost more than the rest of the step (see the report).
    "small_cnn_no_dropout": (28, 28, 1),
    "resnet20": (32, 32, 3),
    "wrn_16_4": (32, 32, 3),
}


def _build(name):
    if name == "small_cnn_no_dropout":
        base = models.build("small_cnn", MODELS[name], 10)
        return keras.Sequential(
            [keras.Input(MODELS[name])]
            + [
                layer
                for layer in base.layers
                if not isinstance(layer, keras.layers.Dropout)
            ],
            name=name,
        )
    return models.build(name, MODELS[name], 10)


class Wrapper(keras.Model):
    """`base` inside a model whose subclasses write their own step."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def call(self, inputs, training=None):
        return self.base(inputs, training=training)


class NaiveSAM(Wrapper):
    """What earlier ports do: assign w + ε, recompute, subtract ε back."""

    def __init__(self, base, rho=0.05):
        super().__init__(base)
        self.rho = rho

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
        compat.loss_tracker(self).update_state(loss)
        return self.compute_metrics(x, y, y_pred)


class TwoGradients(Wrapper):
    """The floor of exact SAM: two forward/backward passes, no ε."""

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
        compat.loss_tracker(self).update_state(loss)
        return self.compute_metrics(batch_x, batch_y, y_pred)


def _sam(**kwargs):
    kwargs.setdefault("rho", 0.05)
    return lambda base: keras_sam.SAMModel(base, **kwargs)


def _switched(policy, *args, **kwargs):
    """SAM behind `switching.<policy>(*args)`, made when the model is: a
    policy made at import would start TensorFlow before `--threads` is
    applied."""

    def wrap(base):
        made = getattr(keras_sam.switching, policy)(*args)
        return keras_sam.SAMModel(base, rho=0.05, switching=made, **kwargs)

    return wrap


CONTENDERS = {
    "sgd": lambda base: base,
    "sam": _sam(),
    "floor_two_passes": TwoGradients,
    "sam_rho_0": _sam(rho=0.0),
    "sam_micro_batches_2": _sam(micro_batches=2),
    "sam_sync": _sam(sync_perturbations=True),
    "naive_assign_subtract": lambda base: NaiveSAM(base, rho=0.05),
    "asam": _sam(rho=0.5, adaptive=True),
    "gsam": _sam(gsam_alpha=0.1),
    "sam_on": _sam(perturbed_variables="normalization"),
    "periodic_2": _switched("Periodic", 2),
    "periodic_5": _switched("Periodic", 5),
    "randomized_0.5": _switched("Randomized", 0.5),
    "randomized_0.2": _switched("Randomized", 0.2),
    # c = 0 throughout: SAM on about half of the steps, AE-SAM's average.
    "ae_sam": _switched("GradientNormOutlier", 0.9, 0.0),
    "looksam_5": _switched("Periodic", 5, looksam_alpha=0.7),
    # Late-phase SAM's two kinds of step: before its phase (the base step
    # behind a switch) and during it (SAM behind a switch).
    "late_phase_before": _switched("LatePhase", 10**9),
    "late_phase_during": _switched("LatePhase", 0),
    "momentum_sam": _sam(rho=1.0, perturbation="momentum"),
}
CORE = [
    "sgd",
    "sam",
    "floor_two_passes",
    "sam_rho_0",
    "late_phase_before",
    "momentum_sam",
    "naive_assign_subtract",
]
# Policies that mix SAM steps and base steps time, in each round, this many
# times `--steps`: a whole period, or the count whose expected number of
# SAM steps is whole, so that a round's mean step is the policy's cost and
# the median over rounds does not pick one kind of step.
MIXED_STEPS = {
    "periodic_2": 2,
    "periodic_5": 5,
    "randomized_0.5": 2,
    "randomized_0.2": 5,
    "ae_sam": 2,
    "looksam_5": 5,
}
# The contenders that take SAM steps behind a switch (a conditional).
SWITCHED_SAM_STEPS = [*MIXED_STEPS, "late_phase_during"]
# What is timed on each model: every contender on the small CNN, whose step
# takes tens of milliseconds; on the others, which take up to seconds on
# one thread, the core and what each model is there for.
TIMED = {
    "small_cnn": list(CONTENDERS),
    "small_cnn_no_dropout": CORE + ["late_phase_during"],  # XLA's caveats
    "resnet20": CORE + ["sam_on"],  # SAM-ON needs normalization layers
    "wrn_16_4": CORE,
}
# What runs on PyTorch: `SAMModel` and SGD. The floor and the naive port
# take their gradients with `tf.GradientTape`.
TORCH_TIMED = ["sgd", "sam", "sam_rho_0", "momentum_sam"]
MEMORY_CONTENDERS = [
    "sgd",
    "sam",
    "floor_two_passes",
    "momentum_sam",
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


def _compiled_step(model, dataset, jit_compile, loss=None):
    """Compiles `model`, runs two steps, and returns a one-step callable.

    The callable runs Keras' own train function on an iterator of
    `dataset`, without `fit`'s per-call work (callbacks, a new iterator),
    which would add the same constant to every contender.
    """
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=loss
        or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    model.fit(dataset.take(2), verbose=0)  # builds the train function
    if keras.backend.backend() == "torch":
        # Keras' PyTorch train function takes a list of batches of tensors.
        batch = next(iter(dataset.as_numpy_iterator()))
        data = [tuple(keras.ops.convert_to_tensor(t) for t in batch)]
        for _ in range(2):  # warms up what fit compiled
            model.train_function(data)
        return lambda: model.train_function(data)
    iterator = iter(dataset)
    for _ in range(2):  # traces it for this iterator, warms up
        model.train_function(iterator)
    return lambda: model.train_function(iterator)


def time_model(name, mode, rounds, steps, batch_size, contenders=CORE):
    start = time.perf_counter()
    dataset = _dataset(MODELS[name], batch_size)
    compiled = {}
    for contender in ["sgd"] + [c for c in contenders if c != "sgd"]:
        keras.utils.set_random_seed(0)
        model = CONTENDERS[contender](_build(name))
        compiled[contender] = _compiled_step(model, dataset, JIT_COMPILE[mode])
        if contender == "sgd":
            params = int(model.count_params())
    compiled_at = time.perf_counter()
    result = interleaved_ratios(
        compiled, rounds, {c: steps * MIXED_STEPS.get(c, 1) for c in compiled}
    )
    result["compile_seconds"] = compiled_at - start
    result["timing_seconds"] = time.perf_counter() - compiled_at
    result["params"] = params
    result["rounds"] = rounds
    result["steps_per_round"] = steps
    return result


def interleaved_ratios(compiled, rounds, steps):
    """Per-step CPU and wall time of each contender, and ratios to "sgd".

    After an untimed round, every round times `steps[contender]` steps of
    each contender (or `steps` steps of all) in an order that rotates from
    round to round, with an SGD step between every two of them: sgd, a, b,
    sgd, c, d, sgd, ... A contender's ratio in a round is to the SGD step
    beside it, a fraction of a second away: this machine's speed drifts
    by 10-15 % within seconds, and the SGD step of a round's start would
    have seen another speed. The report gives the median over rounds.
    """
    names = [c for c in compiled if c != "sgd"]
    if isinstance(steps, int):
        steps = dict.fromkeys(compiled, steps)
    clocks = ("cpu", "wall")
    seconds = {c: {clock: [] for clock in clocks} for c in compiled}
    ratios = {c: {clock: [] for clock in clocks} for c in compiled}
    for round_index in range(-1, rounds):  # round -1 is not recorded
        shift = round_index % max(len(names), 1)
        order = names[shift:] + names[:shift]
        sequence = ["sgd"]
        for i in range(0, len(order), 2):
            sequence += order[i : i + 2] + ["sgd"]
        timed = [(c, _time_steps(compiled[c], steps[c])) for c in sequence]
        if round_index < 0:
            continue
        for position, (contender, measured) in enumerate(timed):
            beside = None
            if contender != "sgd":  # it follows an SGD step or precedes one
                previous = timed[position - 1]
                beside = (
                    previous if previous[0] == "sgd" else timed[position + 1]
                )
            for clock in clocks:
                seconds[contender][clock].append(measured[clock])
                ratios[contender][clock].append(
                    measured[clock] / beside[1][clock] if beside else 1.0
                )
    result = {"contenders": {}}
    for contender, measured in seconds.items():
        stats = {}
        for clock, values in measured.items():
            paired = np.array(ratios[contender][clock])
            stats[clock] = {
                "median_step_ms": 1e3 * float(np.median(values)),
                "median_ratio_to_sgd": float(np.median(paired)),
                "ratio_min": float(paired.min()),
                "ratio_max": float(paired.max()),
                "step_ms": [1e3 * v for v in values],
            }
        result["contenders"][contender] = stats
    return result


def _time_steps(step, count):
    """CPU and wall seconds per call of `step`, over `count` calls."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        step()
    return {
        "cpu": (time.process_time() - cpu) / count,
        "wall": (time.perf_counter() - wall) / count,
    }


def time_pipeline(data_dir, rounds, steps, batch_size):
    """The Fashion-MNIST trainer's tf.data pipeline against in-memory data.

    The same small CNN trains with SGD, fed either by the trainer's own
    pipeline over the real data (gather, scale, one-hot, prefetch) or by
    one cached batch, which costs nothing to produce. The ratio is what
    the input pipeline adds to a step; the pipeline's own throughput is
    measured alone, without training.
    """
    from trainers.data import arrays
    from trainers.data import datasets as data_lib

    train_split, _, info = data_lib.load("fashion_mnist", data_dir)
    total = (rounds + 1) * steps + 4
    indices = arrays.step_indices(len(train_split.labels), batch_size, total, 0)
    real = arrays.training_dataset(train_split, indices, 0, None, 10).repeat()
    cached = real.take(1).cache().repeat()
    compiled = {}
    for name, dataset in (("sgd", cached), ("real_pipeline", real)):
        keras.utils.set_random_seed(0)
        model = models.build("small_cnn", info.shape, 10)
        compiled[name] = _compiled_step(
            model,
            dataset,
            False,
            keras.losses.CategoricalCrossentropy(from_logits=True),
        )
    result = interleaved_ratios(compiled, rounds, steps)
    result["contenders"]["in_memory_batch"] = result["contenders"].pop("sgd")
    iterator = iter(real)
    next(iterator)
    start = time.process_time()
    for _ in range(200):
        next(iterator)
    result["pipeline_alone_cpu_ms_per_batch"] = (
        1e3 * (time.process_time() - start) / 200
    )
    return result


def peak_memory_mb(contender, name, batch_size, jit_compile):
    """What a contender's training holds at most at once (MB), measured in
    a fresh process over six steps after warm-up:

    - `tensors`: the bytes of live tensors (`allocations.tensor_peak`):
      variables, optimizer slots, the cached batches and the step's
      tensors (under XLA, its buffers);
    - `outside_model`: of those, at that moment, the tensors not made in
      the model's name scope: all but its layers' activations and the
      gradients its backward pass computes (of activations and weights);
      meaningful in graph mode, as XLA's buffers belong to no scope;
    - `allocator`: the peak of TensorFlow's allocator, which also counts
      the unused part of the chunks it handed out.
    """
    code = (
        "import sys; sys.argv=['x']; from benchmarks import step_time as s; "
        f"s._print_peak_memory({contender!r}, {name!r}, {batch_size}, "
        f"{jit_compile})"
    )
    return json.loads(
        process.last_line_of_python(code, TF_CPU_ALLOCATOR_USE_BFC="true")
    )


def model_memory(name, modes, batch_size, graph_processes):
    """The model's parameter count and, per mode and memory contender, the
    `peak_memory_mb` of each fresh process that trained it."""
    measured = {"params": int(_build(name).count_params()), "modes": {}}
    for mode in modes:
        processes = 1 if mode == "xla" else graph_processes
        measured["modes"][mode] = {
            c: [
                peak_memory_mb(c, name, batch_size, mode == "xla")
                for _ in range(processes)
            ]
            for c in MEMORY_CONTENDERS
        }
    return measured


def seeded_contender(contender, name):
    """The contender's model around a freshly built, seeded `name`, and
    that base model (whose name scope holds the layers)."""
    keras.utils.set_random_seed(0)
    base = _build(name)
    return CONTENDERS[contender](base), base


def _print_peak_memory(contender, name, batch_size, jit_compile):
    _set_threads(1)
    dataset = _dataset(MODELS[name], batch_size)
    print(
        json.dumps(
            memory_mb(
                lambda: seeded_contender(contender, name), dataset, jit_compile
            )
        )
    )


def memory_mb(build, dataset, jit_compile):
    """`peak_memory_mb`'s three figures for the model that `build()`
    returns with the base model whose name scope holds its layers, in this
    process, which must not have started TensorFlow's allocator without
    `TF_CPU_ALLOCATOR_USE_BFC=true`."""
    with tempfile.TemporaryDirectory() as logdir:
        with allocations.recorded(logdir):
            model, base = build()
            step = _compiled_step(model, dataset, jit_compile)
            allocator = peak_bytes(allocations.measured(step))
        events, steps = allocations.read(logdir)
    tensors, outside = allocations.tensor_peak(
        events, steps, allocations.scope_matcher(base.name)
    )
    return {
        "tensors": tensors / 2**20,
        "outside_model": outside / 2**20,
        "allocator": allocator / 2**20,
    }


def peak_bytes(step, count=6):
    """The largest peak of TensorFlow's CPU allocator over `count` calls of
    `step`; needs an allocator that keeps statistics."""
    peak = 0
    for _ in range(count):
        tf.config.experimental.reset_memory_stats("CPU:0")
        step()
        peak = max(
            peak, tf.config.experimental.get_memory_info("CPU:0")["peak"]
        )
    return peak


def _set_threads(threads):
    if threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _write(results, path):
    if path:
        checkpoint.write_json(path, results)


def _torch_version():
    if keras.backend.backend() != "torch":
        return {}
    import torch

    return {"torch": torch.__version__}


def _check_backend(flags_obj):
    """Raises `ValueError` naming the flag that this backend cannot run."""
    on_torch = keras.backend.backend() == "torch"
    for mode in flags_obj.modes:
        if mode not in JIT_COMPILE or (mode in TORCH_MODES) != on_torch:
            allowed = TORCH_MODES if on_torch else ("graph", "xla")
            raise ValueError(
                f"--modes must be of {list(allowed)} with "
                f"KERAS_BACKEND={keras.backend.backend()}. Received: "
                f"--modes={','.join(flags_obj.modes)}"
            )
    if on_torch:
        for flag in ("memory", "pipeline"):
            if getattr(flags_obj, flag):
                raise ValueError(
                    f"--{flag} measures TensorFlow (its allocator, its "
                    "input pipeline); pass --memory=false --pipeline=false "
                    "with KERAS_BACKEND=torch (memory on PyTorch: "
                    "benchmarks.torch_memory). Received: "
                    f"--{flag}={getattr(flags_obj, flag)}"
                )


def run(flags_obj):
    _check_backend(flags_obj)
    _set_threads(flags_obj.threads)
    steps, rounds = (
        {name: int(n) for name, n in (item.split(":") for item in counts)}
        for counts in (flags_obj.steps, flags_obj.rounds)
    )
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            **_torch_version(),
        },
        "batch_size": flags_obj.batch_size,
        "threads": flags_obj.threads,
        "timings": {},
        "peak_memory_mb": {},
    }
    for name in flags_obj.models:
        contenders = [c for c in TIMED[name] if c in flags_obj.contenders]
        if keras.backend.backend() == "torch":
            contenders = [c for c in contenders if c in TORCH_TIMED]
        for mode in flags_obj.modes if flags_obj.timings else []:
            key = f"{name}/{mode}"
            timed = contenders
            if mode == "xla" and name not in flags_obj.xla_switching_models:
                timed = [c for c in contenders if c not in SWITCHED_SAM_STEPS]
            results["timings"][key] = time_model(
                name,
                mode,
                rounds[name],
                steps[name],
                flags_obj.batch_size,
                timed,
            )
            print(key, "done", flush=True)
            _write(results, flags_obj.output)
        if flags_obj.memory:
            results["peak_memory_mb"][name] = model_memory(
                name,
                flags_obj.modes,
                flags_obj.batch_size,
                flags_obj.graph_memory_processes,
            )
            print(name, "peak MB", results["peak_memory_mb"][name])
            _write(results, flags_obj.output)
    if flags_obj.pipeline:
        results["pipeline"] = time_pipeline(
            flags_obj.data_dir, rounds["small_cnn"], 2, 128
        )
        _write(results, flags_obj.output)
    return results


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
