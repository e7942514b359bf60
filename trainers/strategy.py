"""One factory for every strategy the trainers support, on each backend.

On TensorFlow, `--strategy` names a `tf.distribute` strategy. On JAX,
`mirrored` sets `keras.distribution.DataParallel` over this process's
devices (each device perturbs with its own shard's gradient, as a replica
of MirroredStrategy does), `multi_worker` the same over the devices of
every process, after `keras.distribution.initialize` has joined them;
`default` uses one device and `tpu` is refused (a TPU slice is
`multi_worker` on JAX). With `--model_parallel=M` (JAX), the devices form
a (batch, model) mesh with M devices along "model", and `--layout_map`
says which axes each variable is split over (`ModelParallel`). On
PyTorch, which has no `keras.distribution`, only `default` runs.
"""

import contextlib
import os
import re
import sys

import keras
import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def get_strategy(name, tpu=None, model_parallel=1, layout_map=""):
    """The strategy named by `--strategy`.

    On TensorFlow, `multi_worker` reads the cluster from the `TF_CONFIG`
    environment variable; `tpu` resolves `tpu` (a name or a grpc://
    address) through the standard cluster resolver. On JAX,
    `multi_worker` calls `keras.distribution.initialize()`, which reads
    the coordinator's address, the number of processes and this one's
    index from `KERAS_DISTRIBUTION_JOB_ADDRESSES`,
    `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`
    or, where those are unset, lets `jax.distributed` find them (Cloud
    TPU, SLURM, Open MPI). `model_parallel` and `layout_map` (JAX only)
    are those of `parse_layout_map`.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {list(STRATEGIES)}."
        )
    if model_parallel < 1:
        raise ValueError(
            f"--model_parallel must be >= 1. Received: {model_parallel}"
        )
    if keras.backend.backend() != "jax" and (model_parallel > 1 or layout_map):
        raise ValueError(
            "--model_parallel and --layout_map shard weights with "
            "keras.distribution.ModelParallel, which runs on the JAX "
            f"backend only; this is {keras.backend.backend()}. Received: "
            f"--model_parallel={model_parallel} --layout_map={layout_map!r}"
        )
    if keras.backend.backend() != "tensorflow":
        return _keras_distribution(name, model_parallel, layout_map)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if not tpu:
        raise ValueError("--strategy=tpu needs --tpu=<name or address>.")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    except (OSError, ValueError) as error:  # off GCE: urllib's URLError
        raise ValueError(
            f"--tpu={tpu!r} names no TPU that this machine can find: "
            f"{error}. Pass the TPU's name on Google Cloud or its "
            "grpc://host:port address."
        ) from error
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


class KerasDistribution:
    """The part of a tf.distribute strategy the trainers use, for a
    `keras.distribution` set for the whole process (JAX).

    Attributes:
        num_replicas_in_sync: the shards of every global batch (the
            devices along the mesh's "batch" axis).
        process_index, num_processes: this process's index and the number
            of processes; process 0 is the chief, which alone writes the
            checkpoint and the results.
        batch_shards: `(start, stop)`: this process feeds the rows of
            batch shards `start, …, stop - 1` of every global batch (of
            `num_replicas_in_sync` equal shards); all of them in one
            process.
    """

    def __init__(
        self,
        num_replicas_in_sync,
        process_index=0,
        num_processes=1,
        batch_shards=None,
    ):
        self.num_replicas_in_sync = num_replicas_in_sync
        self.process_index = process_index
        self.num_processes = num_processes
        self.batch_shards = batch_shards or (0, num_replicas_in_sync)

    def scope(self):
        return contextlib.nullcontext()


def parse_layout_map(text):
    """`[(pattern, axes), ...]` of a `--layout_map`.

    The text lists `PATTERN=AXES` entries separated by ";". PATTERN is a
    regular expression matched against a variable's path with
    `re.fullmatch` (as `keras.distribution.LayoutMap` does), AXES one
    mesh axis name ("batch" or "model") or nothing (not split) per
    dimension of the variable, separated by ",". For example
    `.*dense.*/kernel=,model;.*conv2d.*/kernel=,,,model` splits every
    dense and convolution kernel's output dimension over "model".
    Variables no pattern matches are replicated.
    """
    entries = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        pattern, equals, axes = entry.rpartition("=")
        axes = tuple(a.strip() or None for a in axes.split(","))
        problem = None
        if not equals or not pattern:
            problem = "is not PATTERN=AXES"
        elif not set(axes) <= {None, "batch", "model"}:
            problem = "names an axis other than batch and model"
        else:
            try:
                re.compile(pattern)
            except re.error as error:
                problem = f"has an invalid pattern ({error})"
        if problem:
            raise ValueError(
                f"--layout_map entry {entry!r} {problem}; expected "
                "PATTERN=AXES, e.g. '.*dense.*/kernel=,model'."
            )
        entries.append((pattern, axes))
    return entries


def check_layout_map(text, model):
    """Refuses a `--layout_map` pattern that matches none of `model`'s
    variables, which Keras would leave replicated without a word."""
    paths = [v.path for v in model.variables]
    for pattern, _ in parse_layout_map(text):
        # ".../output" patterns lay out a layer's output, not a variable.
        if pattern.endswith("/output"):
            continue
        if not any(re.fullmatch(pattern, path) for path in paths):
            raise ValueError(
                f"--layout_map pattern {pattern!r} matches none of the "
                f"model's {len(paths)} variables "
                f"({', '.join(paths[:3]) or 'none built'}...)."
            )


def _keras_distribution(name, model_parallel=1, layout_map=""):
    backend = keras.backend.backend()
    if name == "default" and model_parallel == 1 and not layout_map:
        return KerasDistribution(1)
    if backend == "torch":
        raise ValueError(
            f"--strategy={name} needs several devices, which the trainers "
            "reach through tf.distribute or keras.distribution; Keras' "
            f"{backend} backend has neither. Run --strategy=default (one "
            "device) or use KERAS_BACKEND=jax or tensorflow."
        )
    if name == "tpu":
        raise ValueError(
            f"--strategy=tpu is a tf.distribute strategy; on the {backend} "
            "backend a TPU slice's hosts each run the trainer with "
            "--strategy=multi_worker (keras.distribution over every "
            "process's devices), or use KERAS_BACKEND=tensorflow."
        )
    if name == "default":
        raise ValueError(
            "--model_parallel and --layout_map split weights over several "
            "devices; use them with --strategy=mirrored (this host's "
            "devices) or multi_worker. Received: --strategy=default "
            f"--model_parallel={model_parallel} --layout_map={layout_map!r}"
        )
    import jax

    if name == "multi_worker":
        # Collectives between processes' CPU devices need gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            keras.distribution.initialize()
        except ValueError as error:
            raise ValueError(
                "--strategy=multi_worker on JAX joins the processes with "
                f"keras.distribution.initialize(), which refused: {error} "
                "Set KERAS_DISTRIBUTION_JOB_ADDRESSES, "
                "KERAS_DISTRIBUTION_NUM_PROCESSES and "
                "KERAS_DISTRIBUTION_PROCESS_ID, or run where jax.distributed "
                "finds the cluster (Cloud TPU, SLURM, Open MPI)."
            ) from error
        devices = jax.devices()
    else:
        devices = jax.local_devices()
    if len(devices) % model_parallel:
        raise ValueError(
            f"--model_parallel={model_parallel} must divide the "
            f"{len(devices)} devices of --strategy={name}."
        )
    layouts = parse_layout_map(layout_map)
    if model_parallel > 1 and not layouts:
        raise ValueError(
            f"--model_parallel={model_parallel} needs a --layout_map that "
            "says which variables to split over the model axis."
        )
    shape = (len(devices) // model_parallel, model_parallel)
    mesh = keras.distribution.DeviceMesh(
        shape, ["batch", "model"], [f"{d.platform}:{d.id}" for d in devices]
    )
    if layouts:
        layout_map = keras.distribution.LayoutMap(mesh)
        for pattern, axes in layouts:
            layout_map[pattern] = axes
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map,
            batch_dim_name="batch",
            auto_shard_dataset=False,
        )
    else:
        distribution = keras.distribution.DataParallel(
            device_mesh=keras.distribution.DeviceMesh(
                (len(devices),), ["batch"], mesh.devices.flatten()
            ),
            auto_shard_dataset=False,
        )
    keras.distribution.set_distribution(distribution)
    return KerasDistribution(
        shape[0],
        jax.process_index(),
        jax.process_count(),
        _process_batch_shards(distribution, shape[0]),
    )


def _process_batch_shards(distribution, shards):
    """`(start, stop)`: the batch shards this process's devices hold,
    which must be consecutive."""
    sharding = distribution.get_data_layout((shards,)).backend_layout
    starts = sorted(
        {
            index[0].start or 0
            for index in sharding.addressable_devices_indices_map(
                (shards,)
            ).values()
        }
    )
    if starts != list(range(starts[0], starts[0] + len(starts))):
        raise ValueError(
            "This process's devices hold batch shards "
            f"{starts} of {shards}, not consecutive ones; keras_sam's "
            "trainers feed each process one slice of every batch."
        )
    return (starts[0], starts[-1] + 1)


def leave_processes(message):
    """In a run of several JAX processes, prints `message` and ends this
    process with status 1 at once; else returns.

    A process that fails (most often because another one was lost: its
    collectives then fail within seconds) would otherwise wait up to
    five minutes at exit for the others to shut `jax.distributed` down
    with it.
    """
    if (
        keras.backend.backend() != "jax"
        or keras.distribution.distribution() is None
    ):
        return
    import jax

    if jax.process_count() == 1:
        return
    print(
        f"{message}\nProcess {jax.process_index()} of "
        f"{jax.process_count()} stops; once every process has stopped, "
        "run the same command in each to resume from the last checkpoint.",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
