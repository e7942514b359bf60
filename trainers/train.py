"""The training loop every trainer runs: data, model, SAM, fit, results.

Batches are indexed by their absolute step: data epoch k visits the training
set in the order of a permutation seeded by (seed, k). A resumed run
therefore sees exactly the batches an uninterrupted run would, from the
state in its checkpoint (`trainers.checkpoint`).
"""

import collections
import contextlib
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras.src.utils import naming

import keras_sam
from trainers import augment as augment_lib
from trainers import checkpoint as checkpoint_lib
from trainers import data as data_lib
from trainers import flags as trainer_flags
from trainers import models
from trainers import strategy as strategy_lib

RESULTS = "results.json"
MODEL = "model.keras"  # the trained base model, for inference and analysis


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


class ExampleSetAccuracy(keras.callbacks.Callback):
    """Adds to each epoch's logs the accuracy of `model` on each `Split`
    of `example_sets` (a dict: log key to split)."""

    def __init__(self, model, example_sets):
        super().__init__()
        self.measured = model
        self.example_sets = example_sets

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for key, split in self.example_sets.items():
                logs[key] = accuracy(self.measured, split)


def step_indices(num_examples, batch_size, steps, seed):
    """Example indices of every training step: shape (steps, batch_size)."""
    per_epoch = num_examples // batch_size
    epochs = math.ceil(steps / per_epoch)
    order = [
        np.random.default_rng([seed, epoch]).permutation(num_examples)[
            : per_epoch * batch_size
        ]
        for epoch in range(epochs)
    ]
    return np.concatenate(order).reshape(-1, batch_size)[:steps]


def training_dataset(split, indices, start_step, augment, num_classes, seed=0):
    """Batches for steps `start_step ..`, scaled, augmented and one-hot.

    The augmentation of step k is drawn from the seed (seed, k), so it too
    is the same in a resumed and in an uninterrupted run.
    """
    images = tf.constant(split.images)
    labels = tf.constant(split.labels)

    def batch(step, index):
        x = tf.cast(tf.gather(images, index), tf.float32) / 255.0
        if augment is not None:
            x = augment(x, seed=tf.stack([tf.constant(seed, tf.int64), step]))
        y = tf.one_hot(tf.gather(labels, index), num_classes)
        return x, y

    dataset = tf.data.Dataset.zip(
        tf.data.Dataset.range(start_step, len(indices)),
        tf.data.Dataset.from_tensor_slices(indices[start_step:]),
    )
    dataset = dataset.map(batch, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def test_dataset(split, batch_size, num_classes):
    def scale(x, y):
        return tf.cast(x, tf.float32) / 255.0, tf.one_hot(y, num_classes)

    return (
        tf.data.Dataset.from_tensor_slices((split.images, split.labels))
        .batch(batch_size)
        .map(scale, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def _learning_rate(flags_obj, total_steps):
    if flags_obj.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            flags_obj.learning_rate, decay_steps=total_steps
        )
    return flags_obj.learning_rate


def _optimizer(flags_obj, learning_rate):
    return keras.optimizers.SGD(
        learning_rate,
        momentum=flags_obj.momentum,
        nesterov=flags_obj.nesterov,
        global_clipnorm=flags_obj.gradient_clipping or None,
        use_ema=flags_obj.ema_decay > 0,
        ema_momentum=flags_obj.ema_decay or 0.99,
    )


def _rho(flags_obj, learning_rate):
    # With a constant learning rate, ρ following it is the constant --rho.
    if flags_obj.rho_min is None or not callable(learning_rate):
        return flags_obj.rho
    return keras_sam.schedules.RhoFollowingLearningRate(
        learning_rate, rho_max=flags_obj.rho, rho_min=flags_obj.rho_min
    )


def variant_arguments(flags_obj, total_steps=None):
    """The SAMModel arguments of the variant flags (GSAM, SAM-ON, switching,
    LookSAM, Momentum-SAM). AE-SAM's threshold moves over `total_steps`."""
    policies = {
        "none": lambda: None,
        "periodic": lambda: keras_sam.switching.Periodic(flags_obj.sam_every),
        "randomized": lambda: keras_sam.switching.Randomized(
            flags_obj.sam_probability, seed=flags_obj.seed
        ),
        "ae_sam": lambda: keras_sam.switching.GradientNormOutlier(
            decay_steps=total_steps
        ),
        "late_phase": lambda: keras_sam.switching.LatePhase(
            int(round(flags_obj.sam_start_fraction * total_steps))
        ),
    }
    perturbed = flags_obj.perturbed_variables
    if perturbed not in ("all", "normalization"):
        perturbed = [p for p in perturbed.split(",") if p]
    return dict(
        gsam_alpha=flags_obj.gsam_alpha,
        perturbed_variables=perturbed,
        switching=policies[flags_obj.switching](),
        looksam_alpha=flags_obj.looksam_alpha,
        perturbation=flags_obj.perturbation,
    )


def accelerator_settings(flags_obj, on_tpu):
    """jit_compile, steps_per_execution and the mixed-precision policy.

    On TPUs everything is compiled with XLA, bfloat16 is the mixed
    precision of choice and several steps run per host call.
    """
    precision = flags_obj.mixed_precision
    if precision == "auto":
        precision = "bfloat16" if on_tpu else "none"
    if on_tpu and precision == "float16":
        raise ValueError(
            "--mixed_precision=float16 is for GPUs; TPUs compute in "
            "bfloat16 (use --mixed_precision=bfloat16 or auto)."
        )
    jit = {"auto": "auto", "true": True, "false": False}[flags_obj.jit_compile]
    steps_per_execution = flags_obj.steps_per_execution or (32 if on_tpu else 1)
    return dict(
        jit_compile=True if on_tpu else jit,
        steps_per_execution=steps_per_execution,
        policy=None if precision == "none" else f"mixed_{precision}",
    )


def run(
    flags_obj,
    dataset_name,
    datasets_override=None,
    strategy_override=None,
    train_split="train",
):
    """Trains `flags_obj.model` on `dataset_name` with SAM; returns results.

    Args:
        flags_obj: the parsed flags (`absl.flags.FLAGS` or any object with
            the same attributes).
        dataset_name: a key of `trainers.data.DATASETS`.
        datasets_override: optional `(train, test, info)` to use instead of
            loading (tests).
        strategy_override: optional tf.distribute strategy (tests).
        train_split: the tensorflow-datasets split to train on.

    Returns:
        The results dict also written to `output_dir/results.json`.
    """
    start_time = time.time()
    strategy, settings = prepare(flags_obj, strategy_override)
    with precision_policy(settings["policy"]):
        return _train(
            flags_obj,
            dataset_name,
            strategy,
            settings,
            datasets_override,
            train_split,
            start_time,
        )


def prepare(flags_obj, strategy_override=None):
    """Seeds, determinism, the strategy and the accelerator settings.

    Keras' counters of layer names are reset first: layers are then named
    alike in every run, in this process or another, so checkpoints, keyed
    by variable path, match. (Not `keras.backend.clear_session()`: after
    it, a new MirroredStrategy's all-reduces can collide with an earlier
    strategy's in the same process.)
    """
    naming.reset_uids()
    keras.utils.set_random_seed(flags_obj.seed)
    if flags_obj.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = strategy_override or strategy_lib.get_strategy(
        flags_obj.strategy, flags_obj.tpu
    )
    settings = accelerator_settings(
        flags_obj, isinstance(strategy, tf.distribute.TPUStrategy)
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
    if flags_obj.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"--batch_size={flags_obj.batch_size} must be divisible by the "
            f"{strategy.num_replicas_in_sync} replicas."
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


def _train(
    flags_obj,
    dataset_name,
    strategy,
    settings,
    datasets_override,
    train_split,
    start_time,
):
    splits = in_memory_splits(
        flags_obj, dataset_name, datasets_override, train_split
    )
    train, validation, info = splits.train, splits.validation, splits.info
    test = splits.test
    example_sets = {}
    if validation is not None:
        example_sets["validation_accuracy"] = validation
    if flags_obj.track_memorization:
        flipped = splits.flipped
        example_sets["train_accuracy_flipped"] = data_lib.Split(
            train.images[flipped], train.labels[flipped]
        )
        example_sets["train_accuracy_unflipped"] = data_lib.Split(
            train.images[~flipped], train.labels[~flipped]
        )
    steps_per_epoch = len(train.labels) // flags_obj.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch_size={flags_obj.batch_size} exceeds the "
            f"{len(train.labels)} training examples."
        )
    total_steps = flags_obj.train_steps or flags_obj.epochs * steps_per_epoch
    base, model = build_sam_model(
        flags_obj,
        strategy,
        settings,
        lambda: models.build(
            flags_obj.model,
            info.shape,
            info.num_classes,
            flags_obj.weight_decay,
        ),
        total_steps,
    )
    augment = None
    if flags_obj.augmentation != "none":
        augment = augment_lib.Augmentation(
            flags_obj.augmentation,
            info.shape,
            seed=flags_obj.seed,
            flip=dataset_name not in ("svhn",),
        )
    indices = step_indices(
        len(train.labels), flags_obj.batch_size, total_steps, flags_obj.seed
    )

    def train_data(step, epoch, steps):
        del epoch
        return training_dataset(
            train,
            indices,
            step,
            augment,
            info.num_classes,
            seed=flags_obj.seed,
        ).take(steps)

    return fit_and_report(
        flags_obj,
        strategy,
        base,
        model,
        dataset_name,
        steps_per_epoch,
        total_steps,
        train_data,
        test_dataset(test, flags_obj.batch_size, info.num_classes),
        start_time,
        example_sets=example_sets,
    )


def accuracy(model, split, batch_size=1024):
    """Accuracy of `model` (inference mode) on a `Split` of uint8 images."""
    if not len(split.labels):
        return float("nan")
    logits = model.predict(
        split.images.astype(np.float32) / 255.0,
        batch_size=batch_size,
        verbose=0,
    )
    return float(np.mean(np.argmax(logits, axis=-1) == split.labels))


Splits = collections.namedtuple(
    "Splits", ["train", "validation", "test", "info", "flipped"]
)


def in_memory_splits(
    flags_obj, dataset_name, datasets_override=None, train_split="train"
):
    """The training, validation and test `Split`s a run trains on.

    The last --validation_examples training examples are held out first,
    then the first --train_examples of the rest are kept, and --label_noise
    is applied to both the training and the validation labels. `flipped`
    marks the training examples whose label the noise changed.
    """
    train, test, info = datasets_override or data_lib.load(
        dataset_name,
        flags_obj.data_dir,
        flags_obj.synthetic_data,
        train_split=train_split,
    )
    validation = None
    if flags_obj.validation_examples:
        held_out = flags_obj.validation_examples
        if held_out >= len(train.labels):
            raise ValueError(
                f"--validation_examples={held_out} leaves no training "
                f"examples of the {len(train.labels)} in {dataset_name}."
            )
        validation = data_lib.Split(
            train.images[-held_out:], train.labels[-held_out:]
        )
        train = data_lib.Split(
            train.images[:-held_out], train.labels[:-held_out]
        )
    train_examples = flags_obj.train_examples
    if train_examples:
        if train_examples > len(train.labels):
            raise ValueError(
                f"--train_examples={train_examples} exceeds the "
                f"{len(train.labels)} training examples of {dataset_name}."
            )
        train = data_lib.Split(
            train.images[:train_examples], train.labels[:train_examples]
        )
    clean_labels = train.labels
    if flags_obj.label_noise > 0:
        noisy, _ = data_lib.add_label_noise(
            train.labels,
            flags_obj.label_noise,
            info.num_classes,
            flags_obj.seed,
        )
        train = data_lib.Split(train.images, noisy)
        if validation is not None:
            # A user has no clean labels to validate on. Under symmetric
            # noise the expected noisy-label accuracy is an increasing
            # affine function of the clean one, so it ranks models alike.
            noisy, _ = data_lib.add_label_noise(
                validation.labels,
                flags_obj.label_noise,
                info.num_classes,
                [flags_obj.seed, 1],
            )
            validation = data_lib.Split(validation.images, noisy)
    return Splits(train, validation, test, info, train.labels != clean_labels)


def build_sam_model(flags_obj, strategy, settings, make_base, total_steps):
    """`(base, model)`: `make_base()` wrapped in a compiled `SAMModel`."""
    with strategy.scope():
        base = make_base()
        learning_rate = _learning_rate(flags_obj, total_steps)
        model = base
        if getattr(flags_obj, "sam", True):
            model = _sam_model(flags_obj, base, learning_rate, total_steps)
        model.compile(
            optimizer=_optimizer(flags_obj, learning_rate),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=flags_obj.label_smoothing
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=settings["jit_compile"],
            steps_per_execution=settings["steps_per_execution"],
        )
        model.optimizer.build(model.trainable_variables)
    return base, model


def _sam_model(flags_obj, base, learning_rate, total_steps):
    return keras_sam.SAMModel(
        base,
        rho=_rho(flags_obj, learning_rate),
        adaptive=flags_obj.adaptive,
        eta=flags_obj.eta,
        sync_perturbations=flags_obj.sync_perturbations,
        micro_batches=flags_obj.micro_batches,
        **variant_arguments(flags_obj, total_steps),
    )


def fit_and_report(
    flags_obj,
    strategy,
    base,
    model,
    dataset_name,
    steps_per_epoch,
    total_steps,
    train_data,
    test_data,
    start_time,
    example_sets=None,
):
    """Resumes, trains epoch by epoch, evaluates and writes the results.

    `train_data(step, epoch, steps)` returns the dataset of the `steps`
    batches that follow global step `step` in `epoch`. `example_sets` maps
    a history key to a `Split` whose accuracy is recorded after every
    epoch (and its last value in the results). The history of the epochs
    before a resumed checkpoint comes from that checkpoint; a finished run
    started again trains no more and keeps its history.
    """
    example_sets = example_sets or {}
    output_dir = flags_obj.output_dir
    os.makedirs(output_dir, exist_ok=True)
    checkpoint_path = os.path.join(output_dir, checkpoint_lib.CHECKPOINT)
    # Workers restore the chief's checkpoint on a shared file system, else
    # the copy each writes beside it (on a disk of its own).
    restored = None
    if os.path.exists(checkpoint_path):
        restored = checkpoint_path
    elif not _is_chief(strategy) and os.path.exists(
        checkpoint_path + ".worker"
    ):
        restored = checkpoint_path + ".worker"
    start_step, history = 0, {}
    if restored:
        start_step = checkpoint_lib.restore(restored, model)
        history = checkpoint_lib.saved_history(restored)
        if start_step >= total_steps:
            print(
                f"The run in {output_dir} has finished: {start_step} steps "
                f"trained, {total_steps} asked for. Evaluating it again."
            )
        else:
            print(f"Resuming from step {start_step} of {total_steps}.")

    every = flags_obj.checkpoint_every_steps or steps_per_epoch
    callbacks = [
        # Before `AtomicCheckpoint`, which saves the stream it restores.
        *(
            [checkpoint_lib.TorchRandomStream()]
            if keras.backend.backend() == "torch"
            else []
        ),
        TrainingTime(),
        ExampleSetAccuracy(base, example_sets),
        checkpoint_lib.AtomicCheckpoint(
            checkpoint_path,
            every,
            start_step,
            _is_chief(strategy),
            history=history,
        ),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.TensorBoard(os.path.join(output_dir, "tensorboard")),
    ]
    step = start_step
    while step < total_steps:
        epoch = step // steps_per_epoch
        steps = min((epoch + 1) * steps_per_epoch, total_steps) - step
        model.fit(
            train_data(step, epoch, steps),
            epochs=epoch + 1,
            initial_epoch=epoch,
            steps_per_epoch=steps,
            validation_data=(
                test_data
                if (epoch + 1) % flags_obj.eval_every_epochs == 0
                else None
            ),
            callbacks=callbacks,
            shuffle=False,
            verbose=flags_obj.verbose,
        )
        step += steps
        if model.stop_training:
            raise FloatingPointError(
                f"Training stopped at step {step}: the loss became NaN or "
                "infinite. The last good checkpoint is "
                f"{checkpoint_path}; try a lower --learning_rate or --rho."
            )

    if flags_obj.ema_decay > 0:
        model.optimizer.finalize_variable_values(model.trainable_variables)
    test_loss, test_accuracy = model.evaluate(test_data, verbose=0)
    results = {
        "dataset": dataset_name,
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "train_steps": int(model.optimizer.iterations.numpy()),
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
        **{key: history[key][-1] for key in example_sets if history.get(key)},
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        "flags": _flag_dict(flags_obj),
    }
    if _is_chief(strategy):
        model_path = os.path.join(output_dir, MODEL)
        tmp_path = os.path.join(output_dir, ".tmp-" + MODEL)
        base.save(tmp_path)
        os.replace(tmp_path, model_path)
        checkpoint_lib.write_atomically(
            os.path.join(output_dir, RESULTS),
            lambda f: f.write(json.dumps(results, indent=1).encode()),
        )
    return results


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


def _flag_dict(flags_obj):
    """The trainer's flags: those absl, TensorFlow and others declare in
    the same `absl.flags.FLAGS` (logging, help, ...) are left out."""
    if hasattr(flags_obj, "flag_values_dict"):
        values = flags_obj.flag_values_dict()
    else:
        values = dict(vars(flags_obj))
    foreign = trainer_flags.foreign_flag_names()
    return {
        k: v
        for k, v in values.items()
        if k not in foreign
        and isinstance(v, (str, int, float, bool, type(None), list))
    }
