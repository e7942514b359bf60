"""The flags every trainer shares; each trainer sets its own defaults.

A trainer's `define_flags()` declares them and adopts them as key flags of
its module (`flags.adopt_module_key_flags`), so `--help` lists them; its
program ends with `run_main(main)`.
"""

import dataclasses
import functools
import os
import re
import sys
import traceback
import typing

import keras
from absl import app
from absl import flags

from keras_sam import options
from keras_sam import schedules
from keras_sam import selection
from keras_sam import switching as switching_lib
from trainers import config
from trainers import models
from trainers import strategy
from trainers.data import config as data_config


def define_common_flags(model_names=None, model_help="Model.", **defaults):
    """Declares the shared flags, with `defaults` overriding theirs.

    Every setting of `trainers.config` but the streamed data sets' is the
    flag of its name, with the setting's default, help and check; then
    --model (one of `model_names`, default: `trainers.models`' registry,
    described by `model_help`), --output_dir, --sam and SAM's flags.
    """
    fields = [f for f in config.setting_fields() if not f.metadata["streamed"]]
    known = {f.name for f in fields} | {"model", "output_dir"}
    unknown = set(defaults) - known - set(config.sam_defaults())
    if unknown:
        raise ValueError(f"No such trainer flags: {sorted(unknown)}")
    flags.DEFINE_enum(
        "model",
        defaults.get("model", "small_cnn"),
        model_names or sorted(models.MODELS),
        model_help,
    )
    flags.DEFINE_string(
        "output_dir",
        defaults.get("output_dir", "runs/default"),
        "Checkpoints, TensorBoard logs and results.json go here; the same "
        "command started again resumes (other settings are refused, see "
        "docs/faults.md). One process at a time.",
    )
    for field in fields:
        define_setting(field, defaults.get(field.name, field.default))
    for cls in (data_config.DataConfig, config.AcceleratorConfig):
        for name, (other, _) in cls.ACTS_ONLY_WITH.items():
            flags.register_multi_flags_validator(
                [name, other], functools.partial(_check_together, cls)
            )
    _define_sam_flags(defaults)


def _check_together(cls, values):
    """Refuses flag `values` that `cls` refuses together (`FlagFields`)."""
    try:
        cls(**values)
    except ValueError as error:
        names = {name: name for name in values}
        raise flags.ValidationError(_as_flags(str(error), names)) from None
    return True


def define_stream_flags(**defaults):
    """Declares the common flags and the streaming ones, each only once.

    `defaults` override the settings' defaults; `model` may name any of
    `trainers.models.NAMES`. Flags already declared in the process (by
    another trainer, in tests) are left as they are.
    """
    streamed = {
        f.name: f for f in config.setting_fields() if f.metadata["streamed"]
    }
    if "rho" not in flags.FLAGS:
        define_common_flags(
            model_names=models.NAMES,
            model_help="Model: a keras.applications ResNet or EfficientNet, "
            "or a CIFAR-sized model of trainers.models for CPU runs.",
            **{
                "model": "resnet50",
                **{k: v for k, v in defaults.items() if k not in streamed},
            },
        )
    for name, field in streamed.items():
        if name not in flags.FLAGS:
            define_setting(field, defaults.get(name, field.default))


_DEFINE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    str: flags.DEFINE_string,
    float: flags.DEFINE_float,
}


def define_setting(field, default):
    """The flag of a setting, refusing what its field refuses."""
    meta = field.metadata
    if meta["choices"]:
        flags.DEFINE_enum(field.name, default, meta["choices"], meta["help"])
    else:
        kind = next(
            (t for t in typing.get_args(field.type) if t is not type(None)),
            field.type,
        )
        _DEFINE[kind](field.name, default, meta["help"])
    if meta["check"]:
        flags.register_validator(
            field.name,
            functools.partial(data_config.accepts, field),
            message=f"--{field.name} {data_config.requirement(field)}",
        )


# SAM's flags: one per field of `keras_sam.options.SAMOptions`, named as the
# field, with its default and its help, and one per field of
# `trainers.config.PolicySettings`.
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
    # A field's own type where it is one of `_DEFINE`'s; else its
    # default's (`object` fields: a number, or None for off).
    types = {f.name: f.type for f in options.fields()}
    defaults = config.sam_defaults(**overrides)
    for name in options.NAMES:
        if name == "switching":
            flags.DEFINE_enum(
                name, defaults[name], list(SWITCHING), helps[name]
            )
            continue
        kind = types[name]
        if kind not in _DEFINE:
            kind = float if defaults[name] is None else type(defaults[name])
        _DEFINE[kind](name, defaults[name], helps[name])
    for field in dataclasses.fields(config.PolicySettings):
        define_setting(field, defaults[field.name])
    for name in defaults:
        flags.register_validator(name, functools.partial(_check_sam_flag, name))


# A policy's parameter, set without its policy, is refused: it would be
# ignored.
_POLICY_OF_SETTING = {
    "sam_every": "periodic",
    "sam_probability": "randomized",
    "sam_start_fraction": "late_phase",
}


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
    values = dict(config.sam_defaults(), **values)
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
    defaults = config.sam_defaults()
    for setting, policy in _POLICY_OF_SETTING.items():
        changed = values[setting] != defaults[setting]
        if changed and values["switching"] != policy:
            raise ValueError(
                f"`{setting}` acts with `switching={policy}` only. "
                f"Received: {setting}={values[setting]}, "
                f"switching={values['switching']}"
            )
    kwargs["switching"] = policies[values["switching"]]()
    return options.SAMOptions(**kwargs)


def check_sam_settings(values, momentum=None):
    """Raises the `ValueError` of `sam_options(values)` (with a nominal
    schedule of one step) or of a policy whose parameter is in `values`,
    naming each argument as its flag, and the value; and, given SGD's
    `momentum`, the one of Momentum-SAM without it."""
    values = dict(config.sam_defaults(), **values)
    try:
        switching_lib.Periodic(values["sam_every"])
        switching_lib.Randomized(values["sam_probability"])
        sam_options(
            values,
            total_steps=1,
            learning_rate=keras.optimizers.schedules.CosineDecay(1.0, 1),
        )
    except ValueError as error:
        # An argument of an object a setting makes, named as the setting.
        raise ValueError(
            _in_flag_terms(str(error), values["switching"])
        ) from None
    if values["perturbation"] == "momentum" and momentum == 0:
        # keras_sam would refuse the optimizer only at the first step.
        raise ValueError(
            "--perturbation=momentum moves the weights along SGD's "
            f"momentum, so it needs --momentum > 0. Received: "
            f"--momentum={momentum}"
        )


def check_perturbed_variables(model, sam):
    """Raises the `ValueError`, naming the flag, of a --perturbed_variables
    of the `SAMOptions` `sam` that selects none of `model`'s trainable
    variables: here, before the data are fed, not at the first step."""
    try:
        selection.perturbed_mask(model, sam.perturbed_variables)
    except ValueError as error:
        names = {"perturbed_variables": "perturbed_variables"}
        raise ValueError(_as_flags(str(error), names)) from None


def _check_sam_flag(name, value):
    """Checks SAM's flags, `name` at `value` (`check_sam_settings`); an
    error is the flag error of the first flag it names."""
    if "sam" in flags.FLAGS and not flags.FLAGS["sam"].value:
        return True  # --nosam ignores them, as its help says
    values = {n: flags.FLAGS[n].value for n in config.sam_defaults()}
    values[name] = value
    momentum = flags.FLAGS["momentum"].value if "momentum" in flags.FLAGS else 1
    try:
        check_sam_settings(values, momentum)
    except ValueError as error:
        message = str(error)
        named = [n for n in re.findall(r"--(\w+)", message) if n in values]
        if not named or named[0] == name:
            raise flags.ValidationError(message) from None
    return True


def _in_flag_terms(message, switching):
    # The policy a message shows as an object (or None, or an example) is
    # a name on the command line.
    message = re.sub(
        r"switching=(<[^>]*>|None)", f"switching={switching}", message
    )
    message = re.sub(
        r"keras_sam\.switching\.Periodic\((\d+)\)",
        r"--switching=periodic --sam_every=\1",
        message,
    )
    names = {**{n: n for n in config.sam_defaults()}, **_ARGUMENT_FLAGS}
    return _as_flags(message, names)


def _as_flags(message, names):
    # `name` and name= in `message` as --flag and --flag=, by `names`:
    # {name: flag}.
    alternatives = "|".join(sorted(names, key=len, reverse=True))
    message = re.sub(
        rf"`({alternatives})`", lambda m: f"--{names[m[1]]}", message
    )
    return re.sub(
        rf"(?<![\w-])({alternatives})=", lambda m: f"--{names[m[1]]}=", message
    )


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
