"""The flags every trainer shares; each trainer sets its own defaults.

A trainer's `define_flags()` declares them and adopts them as key flags of
its module (`flags.adopt_module_key_flags`), so `--help` lists them; its
program ends with `run_main(main)`.
"""

import functools
import inspect
import math
import os
import re
import sys
import traceback

import keras
from absl import app
from absl import flags

from keras_sam import options
from keras_sam import schedules
from keras_sam import switching as switching_lib
from trainers import models
from trainers import strategy
from trainers.data import augment

DEFAULTS = dict(
    model="small_cnn",
    epochs=10,
    batch_size=128,
    learning_rate=0.05,
    lr_schedule="cosine",
    momentum=0.9,
    nesterov=False,
    weight_decay=5e-4,
    label_smoothing=0.0,
    gradient_clipping=0.0,
    ema_decay=0.0,
    augmentation="none",
)


OTHER_DEFAULTABLE = {
    "data_dir",
    "output_dir",
    "train_steps",
    "train_examples",
    "validation_examples",
    "track_memorization",
    "label_noise",
    "seed",
    "verbose",
}


def define_common_flags(model_names=None, model_help="Model.", **defaults):
    """Declares the shared flags, with `defaults` overriding `DEFAULTS`.

    `--model` takes one of `model_names` (default: `trainers.models`'
    registry), described by `model_help`.
    """
    d = dict(DEFAULTS, **defaults)
    unknown = set(defaults) - set(DEFAULTS) - OTHER_DEFAULTABLE
    unknown -= set(sam_defaults())
    if unknown:
        raise ValueError(f"No such trainer flags: {sorted(unknown)}")
    flags.DEFINE_string(
        "data_dir",
        d.get("data_dir"),
        "Where the data set lives: a prepared tensorflow-datasets directory, "
        "or for Fashion-MNIST also a directory with the four IDX .gz files.",
    )
    flags.DEFINE_bool(
        "synthetic_data",
        False,
        "Random data with the data set's shapes and classes (smoke runs).",
    )
    flags.DEFINE_string(
        "output_dir",
        d.get("output_dir", "runs/default"),
        "Checkpoints, TensorBoard logs and results.json go here; the same "
        "command started again resumes (other settings are refused, see "
        "docs/faults.md). One process at a time.",
    )
    flags.DEFINE_enum(
        "model", d["model"], model_names or sorted(models.MODELS), model_help
    )
    flags.DEFINE_integer("epochs", d["epochs"], "Passes over the training set.")
    flags.DEFINE_integer(
        "train_examples",
        d.get("train_examples"),
        "Train on only the first N training examples (default: all); "
        "applied before --label_noise. For CPU-sized studies.",
    )
    flags.DEFINE_integer(
        "validation_examples",
        d.get("validation_examples", 0),
        "Hold out the last N examples of the training split as a "
        "validation set (labels noised like the training labels, at "
        "--label_noise); its accuracy is recorded every epoch, for choosing "
        "hyperparameters without the test set.",
    )
    flags.DEFINE_bool(
        "track_memorization",
        d.get("track_memorization", False),
        "Record every epoch the training accuracy on the examples whose "
        "label --label_noise changed (memorization) and on the others.",
    )
    flags.DEFINE_integer(
        "train_steps",
        d.get("train_steps"),
        "Total training steps; overrides --epochs.",
    )
    flags.DEFINE_integer(
        "batch_size",
        d["batch_size"],
        "Global batch size, in examples, split evenly across replicas.",
    )
    flags.DEFINE_float(
        "learning_rate", d["learning_rate"], "Peak learning rate of SGD."
    )
    flags.DEFINE_enum(
        "lr_schedule",
        d["lr_schedule"],
        ["constant", "cosine"],
        "constant, or cosine decay to 0 over all training steps.",
    )
    flags.DEFINE_float("momentum", d["momentum"], "SGD momentum.")
    flags.DEFINE_bool("nesterov", d["nesterov"], "Nesterov momentum.")
    flags.DEFINE_float(
        "weight_decay",
        d["weight_decay"],
        "Weight decay λ, as an L2 term λ/2·Σw² over all kernels added to the "
        "loss (gradient λ·w, as in the SAM paper's code, so SAM sees it at "
        "w + ε); not decoupled. Biases and BatchNorm are not decayed.",
    )
    flags.DEFINE_float(
        "label_smoothing", d["label_smoothing"], "Label smoothing in [0, 1)."
    )
    flags.DEFINE_float(
        "gradient_clipping",
        d["gradient_clipping"],
        "Clip the global gradient norm to this value; 0 disables.",
    )
    flags.DEFINE_float(
        "ema_decay",
        d["ema_decay"],
        "Evaluate an exponential moving average of the weights with this "
        "decay; 0 disables.",
    )
    _define_sam_flags(d)
    flags.DEFINE_enum(
        "augmentation",
        d["augmentation"],
        list(augment.AUGMENTATIONS),
        "none; basic (flip, pad 4, random crop); cutout (basic + cutout); "
        "randaugment (basic + Keras RandAugment); autoaugment_cifar and "
        "autoaugment_svhn (the AutoAugment policy, then basic and cutout, "
        "as in the SAM paper's code).",
    )
    flags.DEFINE_float(
        "label_noise",
        d.get("label_noise", 0.0),
        "Fraction of training labels replaced by uniformly random classes "
        "(seeded; the test set stays clean).",
    )
    flags.DEFINE_enum(
        "strategy",
        "default",
        list(strategy.STRATEGIES),
        "default (one device); mirrored (this host's devices); "
        "multi_worker (every process's devices: TF_CONFIG on TensorFlow, "
        "keras.distribution.initialize's KERAS_DISTRIBUTION_* variables "
        "or the TPU/SLURM cluster on JAX); tpu (TensorFlow).",
    )
    flags.DEFINE_integer(
        "model_parallel",
        1,
        "JAX: devices along the mesh's model axis; the others form the "
        "batch axis (default 1: data parallel only).",
    )
    flags.DEFINE_string(
        "layout_map",
        "",
        "JAX: how variables are split over the (batch, model) mesh, as "
        "PATTERN=AXES entries separated by ';' (re.fullmatch on the "
        "variable path; one axis name or nothing per dimension), e.g. "
        "'.*dense.*/kernel=,model'.",
    )
    flags.DEFINE_string("tpu", None, "TPU name or grpc:// address.")
    flags.DEFINE_enum(
        "jit_compile",
        "auto",
        ["auto", "true", "false"],
        "XLA: auto resolves as Keras does (off on CPU and under "
        "tf.distribute).",
    )
    flags.DEFINE_enum(
        "mixed_precision",
        "auto",
        ["auto", "none", "float16", "bfloat16"],
        "Mixed precision compute dtype: float16 for GPUs, bfloat16 for TPUs; "
        "auto is bfloat16 under --strategy=tpu and none otherwise.",
    )
    flags.DEFINE_integer(
        "steps_per_execution",
        None,
        "Training steps per compiled call, to keep the host from limiting "
        "the step (default: 32 under --strategy=tpu, else 1).",
    )
    flags.DEFINE_integer(
        "seed", d.get("seed", 0), "Seed of weights, data order and noise."
    )
    flags.DEFINE_bool(
        "deterministic",
        False,
        "Deterministic TensorFlow ops, so a resumed run matches an "
        "uninterrupted one.",
    )
    flags.DEFINE_integer(
        "checkpoint_every_steps",
        None,
        "Save a checkpoint every this many steps (default: every epoch).",
    )
    flags.DEFINE_integer(
        "eval_every_epochs", 1, "Evaluate on the test set every N epochs."
    )
    flags.DEFINE_integer(
        "verbose", d.get("verbose", 1), "Keras verbosity: 0, 1 (bars), 2."
    )
    _define_validators()


# SAM's flags: one per field of `keras_sam.options.SAMOptions`, named as the
# field, with its default and its help, and the flags that give some fields
# their command-line form: ρ following the learning rate and the switching
# policy by name, with its parameters (a policy's own default where it has
# one).
def _argument_default(cls, argument):
    return inspect.signature(cls).parameters[argument].default


POLICY_FLAGS = {
    "rho_min": (
        None,
        "If set, ρ follows the learning-rate schedule linearly from --rho at "
        "the peak rate down to --rho_min at rate 0 (GSAM); default: "
        "constant ρ.",
    ),
    "sam_every": (
        _argument_default(switching_lib.Periodic, "every"),
        "Period of --switching=periodic, in steps.",
    ),
    "sam_probability": (
        _argument_default(switching_lib.Randomized, "probability"),
        "Probability of a SAM step for --switching=randomized.",
    ),
    "sam_start_fraction": (
        0.9,
        "For --switching=late_phase: the fraction of the training steps "
        "after which every step is a SAM step (0 is SAM throughout).",
    ),
}
SWITCHING = ("none", "periodic", "randomized", "ae_sam", "late_phase")
_COMMAND_LINE_HELP = {
    "rho": "On the command line a number; --rho_min makes it follow the "
    "learning rate.",
    "perturbed_variables": "On the command line the list is comma-separated.",
    "switching": "On the command line by name: none (every step); periodic "
    "(every --sam_every-th step); randomized (with probability "
    "--sam_probability); ae_sam (when the gradient norm is an outlier, Jiang "
    "et al. 2023); late_phase (from --sam_start_fraction of the training "
    "steps on, Zhou et al. 2025). Other steps are plain SGD steps.",
}
# Arguments of the objects the flags make, by the flag that sets them.
_ARGUMENT_FLAGS = {
    "rho_max": "rho",
    "every": "sam_every",
    "probability": "sam_probability",
}


def sam_defaults(**overrides):
    """`{flag: default}` of SAM's flags: those of `SAMOptions`' fields
    (`switching` by name), then `POLICY_FLAGS`; `overrides` replace them."""
    defaults = {
        field.name: "none" if field.name == "switching" else field.default
        for field in options.fields()
    }
    defaults.update({name: d for name, (d, _) in POLICY_FLAGS.items()})
    defaults.update({k: v for k, v in overrides.items() if k in defaults})
    return defaults


def _define_sam_flags(overrides):
    flags.DEFINE_bool(
        "sam",
        True,
        "Train with keras_sam.SAMModel; --nosam trains the base model with "
        "a plain Keras fit and ignores the SAM flags (the SGD baseline).",
    )
    helps = {
        field.name: " ".join(
            filter(
                None,
                [field.metadata["help"], _COMMAND_LINE_HELP.get(field.name)],
            )
        )
        for field in options.fields()
    }
    helps.update({name: h for name, (_, h) in POLICY_FLAGS.items()})
    # A field's own type where it is one of these; else its default's
    # (`object` fields: a number, or None for off).
    types = {f.name: f.type for f in options.fields()}
    define = {
        bool: flags.DEFINE_bool,
        int: flags.DEFINE_integer,
        str: flags.DEFINE_string,
        float: flags.DEFINE_float,
    }
    for name, default in sam_defaults(**overrides).items():
        if name == "switching":
            flags.DEFINE_enum(name, default, list(SWITCHING), helps[name])
            continue
        kind = types.get(name)
        if kind not in define:
            kind = float if default is None else type(default)
        define[kind](name, default, helps[name])
    for name in sam_defaults():
        flags.register_validator(name, functools.partial(_check_sam_flag, name))


def sam_options(values, seed=0, total_steps=None, learning_rate=None):
    """The `keras_sam.options.SAMOptions` that SAM's flags describe.

    Args:
        values: `{flag: value}` of SAM's flags; a flag it lacks has its
            default (`sam_defaults`).
        seed: the seed of --switching=randomized's draws.
        total_steps: the run's training steps, over which
            --switching=ae_sam's threshold moves and from which
            --sam_start_fraction counts.
        learning_rate: the learning rate or its schedule, which ρ follows
            when --rho_min is set (with a constant rate ρ is constant).

    Raises the `ValueError` of `SAMOptions` (or of the policy or schedule
    a flag makes) that names the argument and the value.
    """
    values = dict(sam_defaults(), **values)
    kwargs = {name: values[name] for name in options.NAMES}
    if values["rho_min"] is not None and callable(learning_rate):
        kwargs["rho"] = schedules.RhoFollowingLearningRate(
            learning_rate, rho_max=values["rho"], rho_min=values["rho_min"]
        )
    if kwargs["perturbed_variables"] not in ("all", "normalization"):
        kwargs["perturbed_variables"] = [
            p for p in kwargs["perturbed_variables"].split(",") if p
        ]
    policies = {
        "none": lambda: None,
        "periodic": lambda: switching_lib.Periodic(values["sam_every"]),
        "randomized": lambda: switching_lib.Randomized(
            values["sam_probability"], seed=seed
        ),
        "ae_sam": lambda: switching_lib.GradientNormOutlier(
            decay_steps=total_steps
        ),
        "late_phase": lambda: switching_lib.LatePhase(
            int(round(values["sam_start_fraction"] * total_steps))
        ),
    }
    kwargs["switching"] = policies[values["switching"]]()
    return options.SAMOptions(**kwargs)


def _check_sam_flag(name, value):
    """Checks SAM's flags, `name` at `value`, as `sam_options` does (with a
    nominal schedule of one step), and every policy whose parameter is a
    flag; an error is the flag error of the first flag it names, each
    argument named as its flag."""
    values = {n: flags.FLAGS[n].value for n in sam_defaults()}
    values[name] = value
    try:
        sam_options(
            values,
            total_steps=1,
            learning_rate=keras.optimizers.schedules.CosineDecay(1.0, 1),
        )
        switching_lib.Periodic(values["sam_every"])
        switching_lib.Randomized(values["sam_probability"])
    except ValueError as error:
        message = _in_flag_terms(str(error))
        named = [n for n in re.findall(r"--(\w+)", message) if n in values]
        if not named or named[0] == name:
            raise flags.ValidationError(message) from None
    return True


def _in_flag_terms(message):
    names = {**{n: n for n in sam_defaults()}, **_ARGUMENT_FLAGS}
    alternatives = "|".join(sorted(names, key=len, reverse=True))
    message = re.sub(
        rf"`({alternatives})`", lambda m: f"--{names[m[1]]}", message
    )
    return re.sub(
        rf"(?<![\w-])({alternatives})=", lambda m: f"--{names[m[1]]}=", message
    )


def define_stream_flags(**defaults):
    """Declares the common flags and the streaming ones, each only once.

    `defaults` override `trainers.flags.DEFAULTS`; `model` may name any of
    `trainers.models.NAMES`. Flags already declared in the process (by
    another trainer, in tests) are left as they are.
    """
    if "rho" not in flags.FLAGS:
        define_common_flags(
            model_names=models.NAMES,
            model_help="Model: a keras.applications ResNet or EfficientNet, "
            "or a CIFAR-sized model of trainers.models for CPU runs.",
            **{"model": "resnet50", **defaults},
        )
    if "image_size" not in flags.FLAGS:
        flags.DEFINE_integer(
            "image_size",
            224,
            "Height and width, in pixels, of the images the model sees.",
        )
        flags.register_validator(
            "image_size",
            lambda v: v >= 32,
            message="--image_size must be >= 32",
        )
    if "shuffle_buffer" not in flags.FLAGS:
        flags.DEFINE_integer(
            "shuffle_buffer",
            10000,
            "Examples in the shuffle buffer (encoded images, about 110 kB "
            "each on ImageNet), after tensorflow-datasets' file shuffling.",
        )


def _define_validators():
    checks = {
        "batch_size": (lambda v: v >= 1, "must be >= 1"),
        "epochs": (lambda v: v >= 1, "must be >= 1"),
        "train_steps": (lambda v: v is None or v >= 1, "must be >= 1"),
        "train_examples": (lambda v: v is None or v >= 1, "must be >= 1"),
        "validation_examples": (lambda v: v >= 0, "must be >= 0"),
        "steps_per_execution": (
            lambda v: v is None or v >= 1,
            "must be >= 1",
        ),
        "sam_start_fraction": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        "learning_rate": (lambda v: v > 0, "must be > 0"),
        "label_noise": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        "label_smoothing": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        "ema_decay": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        "weight_decay": (lambda v: v >= 0, "must be >= 0"),
        "gradient_clipping": (lambda v: v >= 0, "must be >= 0"),
        "checkpoint_every_steps": (
            lambda v: v is None or v >= 1,
            "must be >= 1",
        ),
        "eval_every_epochs": (lambda v: v >= 1, "must be >= 1"),
    }
    for name, (check, message) in checks.items():
        flags.register_validator(
            name,
            lambda v, check=check: _finite(v) and check(v),
            message=f"--{name} {message}" + " and finite" * _is_float(name),
        )


def _finite(value):
    return not isinstance(value, float) or math.isfinite(value)


def _is_float(name):
    return flags.FLAGS[name].flag_type() == "float"


def foreign_flag_names(flag_values=flags.FLAGS):
    """Names of the flags in `flag_values` that no trainer declared.

    A flag is a trainer's when a module of `trainers` or the main program
    declared it; absl, TensorFlow and other libraries declare the rest
    (logging, help, TPU tracing, ...).
    """
    here = os.path.dirname(os.path.abspath(__file__))

    def trainers_own(module):
        return (
            module == sys.argv[0]
            or module.split(".")[0] == "trainers"
            or os.path.dirname(os.path.abspath(module)) == here
        )

    return {
        name
        for module, declared in flag_values.flags_by_module_dict().items()
        if not trainers_own(module)
        for flag in declared
        for name in (flag.name, flag.short_name)
        if name
    }


_OURS = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "keras_sam",
    ),
)


def accuracy_main(run, label="test accuracy"):
    """An absl `main` that runs `run(FLAGS)` and prints its test accuracy
    after `label`."""

    def main(argv):
        del argv
        results = run(flags.FLAGS)
        print(f"{label} {results['test_accuracy']:.4f}")

    return main


def error_line(error):
    """The one line `run_main` prints for `error`, or None when the error
    keeps its traceback.

    That line is `"<type>: <message>"` for the `ValueError`s, `OSError`s
    and `FloatingPointError`s raised in `trainers` or `keras_sam` (a flag
    value that cannot work, missing data, a checkpoint of another run or a
    corrupt one, a directory another process trains in or that cannot be
    written, a diverged run). Any other error keeps its traceback.
    """
    if not isinstance(error, (ValueError, OSError, FloatingPointError)):
        return None
    frame = error.__traceback__
    if frame is None:
        return None
    while frame.tb_next is not None:
        frame = frame.tb_next
    filename = os.path.abspath(frame.tb_frame.f_code.co_filename)
    if not filename.startswith(_OURS):
        return None
    return f"{type(error).__name__}: {error}"


def run_main(main):
    """`absl.app.run(main)`, with the errors the trainers raise on purpose
    printed as one line (`error_line`), not a traceback; the program then
    exits with status 1, at once in a run of several JAX processes
    (`trainers.strategy.leave_processes`)."""

    def main_with_clear_errors(argv):
        try:
            return main(argv)
        except (ValueError, OSError, FloatingPointError) as error:
            line = error_line(error)
            strategy.leave_processes(line or traceback.format_exc())
            if line is None:
                raise
            sys.exit(line)
        except Exception:
            strategy.leave_processes(traceback.format_exc())
            raise

    app.run(main_with_clear_errors)
