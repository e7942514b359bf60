"""A run's settings as typed values: the flags are read here, once.

`trainers.loop` takes a `TrainingConfig` and never sees the flags; an entry
point builds one with `TrainingConfig.from_flags(flags_obj)` (or by hand,
in a test or a notebook). Every field is the flag of its name, declared
with its default, help and check by `trainers.data.config.setting`;
`trainers.flags` makes the flags from the fields. SAM's settings are
`keras_sam.options.SAMOptions`' fields and `PolicySettings`'.
"""

import dataclasses
import inspect
import os
import sys
from typing import Optional

from absl import flags

from keras_sam import options
from keras_sam import switching as switching_lib
from trainers import models
from trainers import strategy as strategy_lib
from trainers.data import config as data_config
from trainers.data.config import at_least
from trainers.data.config import setting
from trainers.data.config import unset_or_at_least

BELOW_ONE = (lambda v: 0 <= v < 1, "must lie in [0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(data_config.FlagFields):
    """SGD with momentum, its learning rate and what Keras adds to it."""

    learning_rate: float = setting(
        0.05,
        "Peak learning rate of SGD.",
        check=(lambda v: v > 0, "must be > 0"),
    )
    lr_schedule: str = setting(
        "cosine",
        "constant, or cosine decay to 0 over all training steps.",
        choices=["constant", "cosine"],
    )
    momentum: float = setting(
        0.9,
        "SGD momentum, in [0, 1].",
        check=(lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    )
    nesterov: bool = setting(False, "Nesterov momentum.")
    gradient_clipping: float = setting(
        0.0,
        "Clip the global gradient norm to this value; 0 disables.",
        check=at_least(0),
    )
    ema_decay: float = setting(
        0.0,
        "Evaluate an exponential moving average of the weights with this "
        "decay (the final test, validation and memorization figures and "
        "model.keras are the average's; each epoch's logs the raw "
        "weights'); 0 disables.",
        check=BELOW_ONE,
    )
    label_smoothing: float = setting(
        0.0,
        "Label smoothing in [0, 1).",
        check=BELOW_ONE,
    )


@dataclasses.dataclass(frozen=True)
class AcceleratorConfig(data_config.FlagFields):
    """Where and how the steps run."""

    ACTS_ONLY_WITH = {"tpu": ("strategy", "tpu")}

    strategy: str = setting(
        "default",
        "default (one device); mirrored (this host's devices); "
        "multi_worker (every process's devices: TF_CONFIG on TensorFlow, "
        "keras.distribution.initialize's KERAS_DISTRIBUTION_* variables "
        "or the TPU/SLURM cluster on JAX); tpu (TensorFlow).",
        choices=list(strategy_lib.STRATEGIES),
    )
    tpu: Optional[str] = setting(None, "TPU name or grpc:// address.")
    model_parallel: int = setting(
        1,
        "JAX: devices along the mesh's model axis; the others form the "
        "batch axis (default 1: data parallel only).",
        check=at_least(1),
    )
    layout_map: str = setting(
        "",
        "JAX: how variables are split over the (batch, model) mesh, as "
        "PATTERN=AXES entries separated by ';' (re.fullmatch on the "
        "variable path; one axis name or nothing per dimension), e.g. "
        "'.*dense.*/kernel=,model'.",
    )
    jit_compile: str = setting(
        "auto",
        "XLA: auto resolves as Keras does (TensorFlow: off on CPU and "
        "under tf.distribute; JAX: on; PyTorch: off).",
        choices=["auto", "true", "false"],
    )
    mixed_precision: str = setting(
        "auto",
        "Mixed precision compute dtype: float16 for GPUs, bfloat16 for TPUs; "
        "auto is bfloat16 under --strategy=tpu and none otherwise.",
        choices=["auto", "none", "float16", "bfloat16"],
    )
    steps_per_execution: Optional[int] = setting(
        None,
        "Training steps per compiled call, to keep the host from limiting "
        "the step (default: 32 under --strategy=tpu, else 1).",
        check=unset_or_at_least(1),
    )
    deterministic: bool = setting(
        False,
        "Deterministic TensorFlow ops, so a resumed run matches an "
        "uninterrupted one.",
    )


def _argument_default(cls, argument):
    return inspect.signature(cls).parameters[argument].default


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """SAM's settings beyond `SAMOptions`' fields: those that give some
    fields their command-line form, ρ following the learning rate and the
    switching policy by name with its parameters (a policy's own default
    where it has one). Only declared: a run holds them in
    `TrainingConfig.sam`."""

    rho_min: Optional[float] = setting(
        None,
        "If set, ρ follows the learning-rate schedule linearly from --rho at "
        "the peak rate down to --rho_min at rate 0 (GSAM); default: "
        "constant ρ.",
    )
    sam_every: int = setting(
        _argument_default(switching_lib.Periodic, "every"),
        "Period of --switching=periodic, in steps.",
    )
    sam_probability: float = setting(
        _argument_default(switching_lib.Randomized, "probability"),
        "Probability of a SAM step for --switching=randomized.",
    )
    sam_start_fraction: float = setting(
        0.9,
        "For --switching=late_phase: the fraction of the training steps "
        "after which every step is a SAM step (0 is SAM throughout).",
        check=(lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    )


def sam_defaults(**overrides):
    """`{name: default}` of SAM's settings: those of `SAMOptions`' fields
    (`switching` by name), then `PolicySettings`'; `overrides` replace
    them."""
    defaults = {
        field.name: "none" if field.name == "switching" else field.default
        for field in options.fields()
    }
    defaults.update(
        {f.name: f.default for f in dataclasses.fields(PolicySettings)}
    )
    defaults.update({k: v for k, v in overrides.items() if k in defaults})
    return defaults


# The settings a run resumed from its checkpoint may change; every other
# one defines the run, and a checkpoint written with another value is
# refused (`TrainingConfig.settings`). They say where files are, what is
# reported or saved when, and how the same steps execute (which changes
# rounding, not the method).
MAY_CHANGE_ON_RESUME = (
    "output_dir",
    "data_dir",
    "tpu",
    "layout_map",
    "verbose",
    "eval_every_epochs",
    "checkpoint_every_steps",
    "steps_per_execution",
    "jit_compile",
    "deterministic",
)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Everything `trainers.loop.run` needs besides the data and model
    loaders.

    Attributes:
        model: a name of `trainers.models.NAMES`.
        output_dir: where the checkpoint, the model and results.json go.
        data: the data's settings (batch size and seed included).
        optimizer: the base optimizer's settings.
        sam: `{name: value}` of SAM's settings (`sam_defaults`, made into
            `SAMOptions` by `trainers.flags.sam_options`); a setting it
            lacks has its default. None trains the base model with a plain
            Keras `fit` (the SGD baseline).
        accelerator: strategy, XLA, precision, determinism.
        recorded_flags: what results.json lists under "flags".

    The other fields are settings (`setting`): their help says what they
    mean.
    """

    model: str
    output_dir: str
    data: data_config.DataConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    sam: Optional[dict] = dataclasses.field(default_factory=sam_defaults)
    accelerator: AcceleratorConfig = AcceleratorConfig()
    epochs: int = setting(
        10, "Passes over the training set.", check=at_least(1)
    )
    train_steps: int = setting(
        0,
        "Total training steps, overriding --epochs; 0: --epochs passes.",
        check=at_least(0),
    )
    weight_decay: float = setting(
        5e-4,
        "Weight decay λ, as an L2 term λ/2·Σw² over all kernels added to the "
        "loss (gradient λ·w, as in the SAM paper's code, so SAM sees it at "
        "w + ε); not decoupled. Biases and BatchNorm are not decayed.",
        check=at_least(0),
    )
    checkpoint_every_steps: Optional[int] = setting(
        None,
        "Save a checkpoint every this many steps (default: every epoch).",
        check=unset_or_at_least(1),
    )
    eval_every_epochs: int = setting(
        1, "Evaluate on the test set every N epochs.", check=at_least(1)
    )
    verbose: int = setting(
        1,
        "Keras verbosity: 0, 1 (bars), 2.",
        check=(lambda v: v in (0, 1, 2), "must be 0, 1 or 2"),
    )
    recorded_flags: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        data_config.check_settings(self)
        if self.model not in models.NAMES:
            raise ValueError(
                f"`model` must be one of {models.NAMES}. Received: "
                f"model={self.model!r}"
            )
        if self.sam is not None:
            unknown = sorted(set(self.sam) - set(sam_defaults()))
            if unknown:
                raise ValueError(
                    f"`sam` has no settings {unknown}; it takes "
                    f"{sorted(sam_defaults())}. Received: sam={self.sam!r}"
                )
            # Here, not at the top: `trainers.flags` imports this module.
            from trainers import flags as flags_lib

            flags_lib.check_sam_settings(self.sam, self.optimizer.momentum)

    @property
    def seed(self):
        return self.data.seed

    @property
    def batch_size(self):
        return self.data.batch_size

    def settings(self):
        """`{flag name: value}` of every setting of the run.

        `data`, `optimizer` and `accelerator` are flattened into their
        fields, `sam` is a bool followed by SAM's flags when it is on, and
        `recorded_flags` is left out, and `epochs` when `train_steps`
        overrides it. A checkpoint holds these, and a run resumes it only
        when all but `MAY_CHANGE_ON_RESUME` are equal.
        """
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "recorded_flags":
                continue
            if field.name == "sam":
                values["sam"] = value is not None
                if value is not None:
                    values.update(sam_defaults(**value))
            elif dataclasses.is_dataclass(value):
                values.update(dataclasses.asdict(value))
            else:
                values[field.name] = value
        if values["train_steps"]:
            del values["epochs"]  # overridden: a resume may change it
        return values

    @classmethod
    def from_flags(cls, flags_obj):
        """The settings `flags_obj` holds (`absl.flags.FLAGS` or any object
        with the same attributes); without a `sam` attribute, SAM is on."""
        return cls(
            model=flags_obj.model,
            output_dir=flags_obj.output_dir,
            data=data_config.DataConfig.from_flags(flags_obj),
            optimizer=OptimizerConfig.from_flags(flags_obj),
            sam=(
                {
                    name: getattr(flags_obj, name)
                    for name in sam_defaults()
                    if hasattr(flags_obj, name)
                }
                if getattr(flags_obj, "sam", True)
                else None
            ),
            accelerator=AcceleratorConfig.from_flags(flags_obj),
            **{
                f.name: getattr(flags_obj, f.name)
                for f in dataclasses.fields(cls)
                if "help" in f.metadata
            },
            recorded_flags=flag_record(flags_obj),
        )


def flag_record(flags_obj):
    """The trainer's flags as a dict: those absl, TensorFlow and others
    declare in the same `absl.flags.FLAGS` (logging, help, ...) are left
    out."""
    if hasattr(flags_obj, "flag_values_dict"):
        values = flags_obj.flag_values_dict()
    else:
        values = dict(vars(flags_obj))
    foreign = foreign_flag_names()
    return {
        k: v
        for k, v in values.items()
        if k not in foreign
        and isinstance(v, (str, int, float, bool, type(None), list))
    }


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


def setting_fields():
    """The fields of a run's settings that are flags (`setting`), in the
    order of the dataclasses; SAM's are `sam_defaults`."""
    return [
        field
        for cls in (
            data_config.DataConfig,
            OptimizerConfig,
            AcceleratorConfig,
            TrainingConfig,
        )
        for field in dataclasses.fields(cls)
        if "help" in field.metadata
    ]
