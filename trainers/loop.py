"""The one training path of every trainer: seeds, strategy, model, fit.

`run` takes a `trainers.config.TrainingConfig` (never the flags) and a
function that loads the data (an `trainers.data.arrays.ArrayData` held in
memory, or a `trainers.data.stream.StreamData` read from
tensorflow-datasets). Both kinds of data index their batches by absolute
step, so a run resumed from its checkpoint (`trainers.checkpoint`) sees
exactly the batches an uninterrupted run would; the loop trains one data
epoch per `fit` call and saves, evaluates and writes `results.json` the
same way for both.
"""

import contextlib
import errno
import glob
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

import keras_sam
from keras_sam import compat
from trainers import checkpoint as checkpoint_lib
from trainers import config as config_lib
from trainers import flags as trainer_flags
from trainers import models
from trainers import strategy as strategy_lib

RESULTS = "results.json"
MODEL = "model.keras"  # the trained base model, for inference and analysis
LOCK = ".training.lock"  # held by the process that trains in the directory


class TrainingTime(keras.callbacks.Callback):
    """Adds to each epoch's logs the wall and process CPU seconds from the
    epoch's start to its last training batch, so evaluation is left out."""

    KEYS = {
        "train_wall_seconds": "epoch_train_wall_seconds",
        "train_cpu_seconds": "epoch_train_cpu_seconds",
    }

    def on_epoch_begin(self, epoch, logs=None):
        self.start = (time.time(), time.process_time())
        self.elapsed = (0.0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        now = (time.time(), time.process_time())
        self.elapsed = tuple(b - a for a, b in zip(self.start, now))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_train_wall_seconds"] = self.elapsed[0]
            logs["epoch_train_cpu_seconds"] = self.elapsed[1]


class TrainOnRawWeights(keras.callbacks.Callback):
    """Keeps the optimizer's moving average of the weights out of training.

    Keras' `fit` ends by writing the average into the weights; the loop
    calls `fit` once per epoch, so the next epoch would train from the
    average (and a resumed run from the raw weights its checkpoint holds).
    This puts back the weights the epoch ended with, before the
    checkpoint's `on_train_end` saves them (so it comes first).
    """

    def on_train_begin(self, logs=None):
        self.raw = None

    def on_epoch_end(self, epoch, logs=None):
        # On the devices: a process may hold only its shards of a weight.
        variables = self.model.trainable_variables
        self.raw = [keras.ops.copy(v.value) for v in variables]

    def on_train_end(self, logs=None):
        if self.raw is not None:
            for variable, value in zip(
                self.model.trainable_variables, self.raw
            ):
                variable.assign(value)


class ExampleSetAccuracy(keras.callbacks.Callback):
    """Adds to each epoch's logs, for each `key: measure` of
    `example_sets`, `measure(model)` (an accuracy on a set of examples)."""

    def __init__(self, model, example_sets):
        super().__init__()
        self.measured = model
        self.example_sets = example_sets

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for key, measure in self.example_sets.items():
                logs[key] = measure(self.measured)


def run(config, load_data, strategy_override=None, **model_options):
    """Trains `config.model` on the data of `load_data`; returns results.

    Args:
        config: a `trainers.config.TrainingConfig`.
        load_data: called with `config.data` once seeds and precision are
            set; returns the run's data: an `ArrayData` or a `StreamData`
            (`trainers.data`).
        strategy_override: optional tf.distribute strategy (tests).
        **model_options: for `trainers.models.build`: pretrained_weights,
            freeze_batchnorm.

    Returns:
        The results dict also written to `output_dir/results.json`.
    """
    start_time = time.time()
    check_output_dir(config.output_dir)
    strategy, settings = prepare(config, strategy_override)
    # Before the data and the model, which may take long: a second process
    # stops at once.
    with _training_lock(config.output_dir, strategy):
        return _run_locked(
            config, load_data, strategy, settings, start_time, model_options
        )


def check_output_dir(output_dir):
    """Raises unless `output_dir` is a local directory or is free to be
    made one."""
    if "://" in output_dir:
        # A URL made a local folder named "gs:" before this check.
        raise ValueError(
            "--output_dir must be a local path, or a bucket mounted as one "
            "(GCS FUSE): checkpoints are written atomically with POSIX "
            "renames and locks, which a URL's file system lacks. Received: "
            f"--output_dir={output_dir!r}"
        )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(
            f"--output_dir={output_dir} is a file, not a directory."
        )


def _training_lock(output_dir, strategy):
    """One process at a time trains in `output_dir` (a
    `checkpoint.DirectoryLock`; each worker of a multi-worker run takes
    its own)."""
    with _writing(output_dir):
        os.makedirs(output_dir, exist_ok=True)
        return checkpoint_lib.DirectoryLock(
            os.path.join(output_dir, lock_name(strategy))
        )


def _run_locked(config, load_data, strategy, settings, start_time, options):
    with precision_policy(settings["policy"]):
        data = load_data(config.data)
        total_steps = config.train_steps or config.epochs * data.steps_per_epoch
        base, model = build_sam_model(
            config,
            strategy,
            settings,
            lambda: models.build(
                config.model,
                data.shape,
                data.info.num_classes,
                config.weight_decay,
                **options,
            ),
            total_steps,
        )
        return fit_and_report(
            config,
            strategy,
            base,
            model,
            data,
            total_steps,
            start_time,
            run_settings={
                **config.settings(),
                "dataset": data.name,
                **options,
            },
        )


def _learning_rate(optimizer, total_steps):
    if optimizer.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            optimizer.learning_rate, decay_steps=total_steps
        )
    return optimizer.learning_rate


def _optimizer(optimizer, learning_rate):
    return keras.optimizers.SGD(
        learning_rate,
        momentum=optimizer.momentum,
        nesterov=optimizer.nesterov,
        global_clipnorm=optimizer.gradient_clipping or None,
        use_ema=optimizer.ema_decay > 0,
        ema_momentum=optimizer.ema_decay or 0.99,
    )


def accelerator_settings(accelerator, on_tpu):
    """jit_compile, steps_per_execution and the mixed-precision policy of
    an `AcceleratorConfig`.

    On TPUs everything is compiled with XLA, bfloat16 is the mixed
    precision of choice and several steps run per host call.
    """
    precision = accelerator.mixed_precision
    if precision == "auto":
        precision = "bfloat16" if on_tpu else "none"
    if on_tpu and precision == "float16":
        raise ValueError(
            "--mixed_precision=float16 is for GPUs; TPUs compute in "
            "bfloat16 (use --mixed_precision=bfloat16 or auto)."
        )
    jit = {"auto": "auto", "true": True, "false": False}[
        accelerator.jit_compile
    ]
    steps_per_execution = accelerator.steps_per_execution or (
        32 if on_tpu else 1
    )
    return dict(
        jit_compile=True if on_tpu else jit,
        steps_per_execution=steps_per_execution,
        policy=None if precision == "none" else f"mixed_{precision}",
    )


def prepare(config, strategy_override=None):
    """Seeds, determinism, the strategy and the accelerator settings.

    Keras' counters of layer names are reset first
    (`keras_sam.compat.reset_layer_names`): layers are then named alike in
    every run, in this process or another, so checkpoints, keyed by
    variable path, match.
    """
    compat.reset_layer_names()
    keras.utils.set_random_seed(config.seed)
    accelerator = config.accelerator
    if accelerator.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = strategy_override or strategy_lib.get_strategy(
        accelerator.strategy,
        accelerator.tpu,
        accelerator.model_parallel,
        accelerator.layout_map,
    )
    settings = accelerator_settings(
        accelerator, isinstance(strategy, tf.distribute.TPUStrategy)
    )
    if (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and settings["steps_per_execution"] > 1
    ):
        raise ValueError(
            "Keras cannot run several steps per call under "
            "--strategy=multi_worker. Received: "
            f"--steps_per_execution={settings['steps_per_execution']}"
        )
    if (
        keras.backend.backend() == "torch"
        and settings["steps_per_execution"] > 1
    ):
        raise ValueError(
            "Keras' PyTorch trainer runs one step per call. Received: "
            f"--steps_per_execution={settings['steps_per_execution']}; "
            "leave it unset on PyTorch."
        )
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"--batch_size={config.batch_size} must be divisible by the "
            f"{replicas} replicas."
        )
    sam = config_lib.sam_defaults(**(config.sam or {}))
    if config.sam is not None and (
        sam["micro_batches"] > config.batch_size // replicas
    ):
        raise ValueError(
            f"--micro_batches={sam['micro_batches']} is more than the "
            f"{config.batch_size // replicas} examples of each replica's "
            f"batch (--batch_size={config.batch_size} over {replicas} "
            "replicas); each micro-batch needs one example at least."
        )
    return strategy, settings


@contextlib.contextmanager
def precision_policy(policy):
    """Sets the global mixed-precision policy, and restores it after."""
    previous = keras.mixed_precision.global_policy()
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_sam_model(config, strategy, settings, make_base, total_steps):
    """`(base, model)`: `make_base()` wrapped in a compiled `SAMModel` (the
    base model itself when `config.sam` is None)."""
    with strategy.scope():
        base = make_base()
        strategy_lib.check_layout_map(config.accelerator.layout_map, base)
        learning_rate = _learning_rate(config.optimizer, total_steps)
        model = base
        if config.sam is not None:
            sam = trainer_flags.sam_options(
                config.sam, config.seed, total_steps, learning_rate
            )
            model = keras_sam.SAMModel(base, **sam.as_kwargs())
            trainer_flags.check_perturbed_variables(base, sam)
        model.compile(
            optimizer=_optimizer(config.optimizer, learning_rate),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True,
                label_smoothing=config.optimizer.label_smoothing,
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=settings["jit_compile"],
            steps_per_execution=settings["steps_per_execution"],
        )
        model.optimizer.build(model.trainable_variables)
    return base, model


def fit_and_report(
    config,
    strategy,
    base,
    model,
    data,
    total_steps,
    start_time,
    run_settings=None,
):
    """Resumes, trains epoch by epoch, evaluates and writes the results.

    `data.training_batches(step, epoch, steps)` is the dataset of the
    `steps` batches that follow global step `step` in data epoch `epoch`;
    `data.example_sets` maps a history key to a measure of the base model
    recorded after every epoch (and its last value in the results). The
    history of the epochs before a resumed checkpoint comes from that
    checkpoint, and so do the running metrics of an epoch it cut in two;
    a finished run started again trains no more and keeps its history.

    The caller holds the directory's lock (`run` takes it). The processes
    of a JAX `multi_worker` run each feed their rows of every batch
    (`strategy.batch_shards`); process 0 alone writes the checkpoint, the
    model, the results and TensorBoard's logs, and all restore its
    checkpoint, from a directory they share. A checkpoint is resumed only
    when `run_settings` (default: `config.settings()`) equal the settings
    it was written with, but for `config.MAY_CHANGE_ON_RESUME`; a corrupt
    one is skipped for the one before it (`checkpoint.find`) and set
    aside. A file that cannot be written (a full disk, a read-only
    directory) stops the run with an `OSError` naming it.

    One `fit` call trains one data epoch: each epoch's batches are a
    dataset that starts at that epoch's first absolute step, and a
    resumed epoch, or a last one cut short by `train_steps`, has fewer
    steps than the others, while `fit` takes one dataset and one
    `steps_per_epoch` for all its epochs. Keras' `initial_epoch` numbers
    the epochs and its `validation_freq` picks those that evaluate.
    """
    run_settings = run_settings or config.settings()
    chief = _is_chief(strategy)
    example_sets = data.example_sets
    steps_per_epoch = data.steps_per_epoch
    _check_processes_can_share(config, strategy, data)
    test_data = _process_rows(data.test_batches(), strategy)
    output_dir = config.output_dir
    run_settings = json.loads(json.dumps(run_settings))
    with _writing(output_dir):
        stale = _remove_stale_writes(output_dir, chief)
    if stale:
        print(
            f"Removed {len(stale)} file(s) an interrupted write left in "
            f"{output_dir}: {', '.join(sorted(stale))}."
        )
    checkpoint_path = os.path.join(output_dir, checkpoint_lib.CHECKPOINT)
    written_path = checkpoint_path if chief else checkpoint_path + ".worker"
    # Workers restore the chief's checkpoint on a shared file system, else
    # the copy each writes beside it (on a disk of its own).
    saved = checkpoint_lib.find(checkpoint_path)
    if saved is None and not chief:
        saved = checkpoint_lib.find(written_path)
    if (
        saved is not None
        and saved.path == written_path + checkpoint_lib.PREVIOUS
    ):
        # The newest of the pair this process writes failed its check: set
        # aside, so that the next save keeps the good one as the previous.
        with _writing(output_dir):
            checkpoint_lib.set_aside(written_path)
    if _processes(strategy) > 1:
        # Before restoring, which puts values on every process's devices.
        _check_same_start(0 if saved is None else saved.step, checkpoint_path)
    start_step, history, metrics = 0, {}, None
    if saved is not None:
        _check_same_run(saved, run_settings, output_dir)
        start_step = checkpoint_lib.restore(saved, model)
        history = saved.history
        if start_step % steps_per_epoch:
            metrics = saved.metrics
        if start_step >= total_steps:
            print(
                f"The run in {output_dir} has finished: {start_step} steps "
                f"trained, {total_steps} asked for. Evaluating it again."
            )
        else:
            print(f"Resuming from step {start_step} of {total_steps}.")

    every = config.checkpoint_every_steps or steps_per_epoch
    saver = checkpoint_lib.AtomicCheckpoint(
        checkpoint_path,
        every,
        start_step,
        chief,
        history=history,
        settings=run_settings,
        metrics=metrics,
        worker_copy=_processes(strategy) == 1,
        last_step=total_steps,
    )
    # On JAX, processes other than the chief write nothing.
    writes = chief or _processes(strategy) == 1
    tensorboard_dir = os.path.join(output_dir, "tensorboard")
    if writes:
        with _writing(tensorboard_dir):
            os.makedirs(tensorboard_dir, exist_ok=True)
    callbacks = [
        *([TrainOnRawWeights()] if config.optimizer.ema_decay > 0 else []),
        # Before `AtomicCheckpoint`, which saves the stream it restores.
        checkpoint_lib.RandomStream(),
        TrainingTime(),
        ExampleSetAccuracy(base, example_sets),
        saver,
        keras.callbacks.TerminateOnNaN(),
        *([keras.callbacks.TensorBoard(tensorboard_dir)] if writes else []),
    ]
    if metrics and not set(metrics) <= set(checkpoint_lib.metric_paths(model)):
        # Without a strategy, TensorFlow creates the compiled metrics'
        # variables when it first traces a step, after `fit` has begun its
        # epoch (the other backends before); one test batch creates them.
        # (After `RandomStream` has taken the restored generator.)
        model.evaluate(test_data, steps=1, verbose=0)
    step = start_step
    while step < total_steps:
        epoch = step // steps_per_epoch
        steps = min((epoch + 1) * steps_per_epoch, total_steps) - step
        with _writing(tensorboard_dir):
            model.fit(
                _process_rows(
                    data.training_batches(step, epoch, steps), strategy
                ),
                epochs=epoch + 1,
                initial_epoch=epoch,
                steps_per_epoch=steps,
                validation_data=test_data,
                validation_freq=config.eval_every_epochs,
                callbacks=callbacks,
                shuffle=False,
                verbose=config.verbose,
            )
        step += steps
        if model.stop_training:
            step = saver.step
            if os.path.exists(written_path):
                kept = (
                    f"The last good checkpoint is {written_path} (step "
                    f"{saver.saved_step})"
                )
            else:
                kept = "No checkpoint was written"
            raise FloatingPointError(
                f"Training stopped at step {step}: the loss became NaN or "
                f"infinite. {kept}; try a lower --learning_rate or --rho."
            )

    final_sets = {k: history[k][-1] for k in example_sets if history.get(k)}
    if config.optimizer.ema_decay > 0:
        model.optimizer.finalize_variable_values(model.trainable_variables)
        # Measured again on the average, the model that the test accuracy
        # and model.keras are of (the epochs' logs are the raw weights').
        final_sets = {k: float(m(base)) for k, m in example_sets.items()}
    test_loss, test_accuracy = model.evaluate(test_data, verbose=0)
    results = {
        "dataset": data.name,
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "train_steps": int(step),
        "requested_train_steps": int(total_steps),
        "resumed_from_step": int(start_step),
        "wall_time_seconds": time.time() - start_time,
        # Training batches only, every epoch (evaluations left out); CPU
        # time is the whole process's, all threads.
        **{
            key: float(sum(history.get(TrainingTime.KEYS[key], [])))
            for key in TrainingTime.KEYS
        },
        "replicas": strategy.num_replicas_in_sync,
        **final_sets,
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        "flags": config.recorded_flags,
    }
    if chief:
        _save_model(base, output_dir, checkpoint_path)
        results_path = os.path.join(output_dir, RESULTS)
        with _writing(results_path):
            checkpoint_lib.write_json(results_path, results)
    return results


def _save_model(base, output_dir, checkpoint_path):
    """Writes `base` to `output_dir/model.keras` atomically, unless its
    weights are split over several processes (JAX)."""
    if not checkpoint_lib.readable_here(base.variables):
        print(
            f"{MODEL} is not written: the weights are split over several "
            f"processes; {checkpoint_path} holds them whole."
        )
        return
    model_path = os.path.join(output_dir, MODEL)
    tmp_path = os.path.join(output_dir, checkpoint_lib.TMP_PREFIX + MODEL)
    with _writing(model_path):
        try:
            base.save(tmp_path)
            os.replace(tmp_path, model_path)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)


def lock_name(strategy=None):
    """The lock file of a run directory: `.training.lock` for the chief
    (or a single process), `.training.lock-<task>-<index>` for another
    worker (`.training.lock-process-<index>` on JAX)."""
    if strategy is None or _is_chief(strategy):
        return LOCK
    if _processes(strategy) > 1:
        return f"{LOCK}-process-{strategy.process_index}"
    resolver = strategy.cluster_resolver
    return f"{LOCK}-{resolver.task_type}-{resolver.task_id}"


def _process_rows(dataset, strategy):
    """`dataset`'s batches cut to the rows this process feeds, when
    several processes each feed their part of every global batch (JAX);
    else `dataset`."""
    if _processes(strategy) == 1:
        return dataset
    start, stop = strategy.batch_shards
    shards = strategy.num_replicas_in_sync

    def rows(*batch):
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        first, end = size * start // shards, size * stop // shards
        return tf.nest.map_structure(lambda t: t[first:end], batch)

    return dataset.map(rows)


def _check_processes_can_share(config, strategy, data):
    """Raises a `ValueError` for what several JAX processes cannot do
    together: measure the example sets (`predict` does not gather their
    outputs), or split a last test batch unevenly over the batch shards."""
    processes = _processes(strategy)
    if processes == 1:
        return
    if data.example_sets:
        raise ValueError(
            "--validation_examples and --track_memorization are measured "
            f"with predict, which does not gather the {processes} "
            "processes' outputs; leave them unset under "
            "--strategy=multi_worker on JAX."
        )
    splits = getattr(data, "splits", None)
    shards = strategy.num_replicas_in_sync
    if splits is not None and len(splits.test.labels) % config.batch_size % (
        shards
    ):
        raise ValueError(
            f"The {len(splits.test.labels)} test examples leave a last "
            f"batch of {len(splits.test.labels) % config.batch_size} at "
            f"--batch_size={config.batch_size}, which the {shards} batch "
            "shards of several processes cannot split evenly; choose a "
            "--batch_size that divides the test set or leaves a multiple "
            f"of {shards}."
        )


def _check_same_start(start_step, checkpoint_path):
    """Raises a `CheckpointError` unless every process resumes from the
    same step (they read one checkpoint, in a directory they share)."""
    from jax.experimental import multihost_utils

    steps = multihost_utils.process_allgather(np.array(start_step, np.int32))
    if len(set(steps.tolist())) > 1:
        raise checkpoint_lib.CheckpointError(
            f"The processes would resume from steps {steps.tolist()} (by "
            f"process): each reads {checkpoint_path}, which only process 0 "
            "writes, so --output_dir must be a directory all processes "
            "share."
        )


def _remove_stale_writes(output_dir, chief):
    """Removes what interrupted writes of this process' files left:
    the chief's every `.tmp-*` file but the workers' checkpoints', a
    worker's those of `checkpoint.npz.worker`."""
    worker_checkpoint = checkpoint_lib.CHECKPOINT + ".worker"
    if not chief:
        return checkpoint_lib.remove_stale_writes(output_dir, worker_checkpoint)
    stale = [
        path
        for path in glob.glob(
            os.path.join(glob.escape(output_dir), checkpoint_lib.TMP_PREFIX)
            + "*"
        )
        if not os.path.basename(path).startswith(
            checkpoint_lib.TMP_PREFIX + worker_checkpoint
        )
        and os.path.isfile(path)
    ]
    for path in stale:
        os.remove(path)
    return stale


def _flag_value(value):
    return "(unset)" if value is None else value


def _check_same_run(saved, run_settings, output_dir):
    """Raises `CheckpointError` naming every setting of the run that differs
    from the one the checkpoint `saved` was written with."""
    if saved.settings is None:
        print(
            f"Warning: {saved.path} was written without the settings of "
            "its run; resuming it without checking them."
        )
        return
    differing = [
        f"--{key}={_flag_value(saved.settings[key])} there, "
        f"--{key}={_flag_value(value)} now"
        for key, value in run_settings.items()
        if key in saved.settings
        and key not in config_lib.MAY_CHANGE_ON_RESUME
        and saved.settings[key] != value
    ]
    if differing:
        raise checkpoint_lib.CheckpointError(
            f"{output_dir} holds the checkpoint of another run (step "
            f"{saved.step}), whose settings differ: {'; '.join(differing)}. "
            "Run it with its own settings to resume it, or train afresh "
            f"in another --output_dir (or after removing {output_dir})."
        )


_WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


@contextlib.contextmanager
def _writing(path):
    """Turns an error of the file system (a full disk, a read-only
    directory) in writing `path` into an `OSError` that names the file
    (else `path`) and says that what was written before is kept.

    Those are the `OSError`s with an error number, and TensorFlow's errors
    (TensorBoard's writer) that name `path` and a fault of
    `_WRITE_FAULTS`.
    """
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise  # One of ours, saying what happened already.
        _cannot_write(error.filename or path, error.strerror, error)
    except tf.errors.OpError as error:
        reasons = [
            os.strerror(code)
            for code in _WRITE_FAULTS
            if os.strerror(code) in error.message
        ]
        if path not in error.message or not reasons:
            raise
        _cannot_write(path, reasons[0], error)


def _cannot_write(path, reason, error):
    raise OSError(
        f"Cannot write {path}: {reason}. Nothing written before was "
        "damaged; run the same command again once it can be written, or "
        "use another --output_dir."
    ) from error


def _processes(strategy):
    """The processes of a `keras.distribution` run (JAX); 1 on the other
    backends, whose workers `tf.distribute` joins."""
    return getattr(strategy, "num_processes", 1)


def _is_chief(strategy):
    if _processes(strategy) > 1:
        return strategy.process_index == 0
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )
