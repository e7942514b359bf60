"""A run's settings as typed values: the flags are read here, once.

`trainers.loop` takes a `TrainingConfig` and never sees the flags; an entry
point builds one with `TrainingConfig.from_flags(flags_obj)` (or by hand,
in a test or a notebook). Every field is the flag of its name, documented
in `trainers.flags`.
"""

import dataclasses
from typing import Optional

from trainers import flags as trainer_flags
from trainers.data import config as data_config


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(data_config.FlagFields):
    """SGD with momentum, its learning rate and what Keras adds to it.

    Attributes:
        learning_rate: the peak (cosine) or constant learning rate.
        lr_schedule: "cosine" (to 0 over the run's steps) or "constant".
        momentum: SGD's momentum.
        nesterov: Nesterov momentum.
        gradient_clipping: clip the global gradient norm to this; 0: off.
        ema_decay: evaluate an exponential moving average of the weights
            with this decay; 0: off.
        label_smoothing: of the cross-entropy loss.
    """

    learning_rate: float = 0.05
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    nesterov: bool = False
    gradient_clipping: float = 0.0
    ema_decay: float = 0.0
    label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class AcceleratorConfig(data_config.FlagFields):
    """Where and how the steps run.

    Attributes:
        strategy: a name of `trainers.strategy.STRATEGIES`.
        tpu: the TPU's name or grpc:// address.
        model_parallel: JAX: devices along the mesh's "model" axis.
        layout_map: JAX: how variables are split over the mesh
            (`trainers.strategy.parse_layout_map`).
        jit_compile: "auto", "true" or "false".
        mixed_precision: "auto", "none", "float16" or "bfloat16".
        steps_per_execution: steps per compiled call (None: 32 on TPUs,
            else 1).
        deterministic: deterministic TensorFlow ops.
    """

    strategy: str = "default"
    tpu: Optional[str] = None
    model_parallel: int = 1
    layout_map: str = ""
    jit_compile: str = "auto"
    mixed_precision: str = "auto"
    steps_per_execution: Optional[int] = None
    deterministic: bool = False


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
        sam: `{flag: value}` of SAM's flags (`trainers.flags.sam_defaults`,
            made into `SAMOptions` by `trainers.flags.sam_options`); a flag
            it lacks has its default. None trains the base model with a
            plain Keras `fit` (the SGD baseline).
        accelerator: strategy, XLA, precision, determinism.
        epochs: data epochs to train, unless `train_steps` is set.
        train_steps: training steps (0: `epochs` data epochs).
        weight_decay: λ of `trainers.models.regularization`.
        checkpoint_every_steps: None: every data epoch.
        eval_every_epochs: evaluate on the test set every this many epochs.
        verbose: Keras' verbosity.
        recorded_flags: what results.json lists under "flags".
    """

    model: str
    output_dir: str
    data: data_config.DataConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    sam: Optional[dict] = dataclasses.field(
        default_factory=trainer_flags.sam_defaults
    )
    accelerator: AcceleratorConfig = AcceleratorConfig()
    epochs: int = 10
    train_steps: int = 0
    weight_decay: float = 5e-4
    checkpoint_every_steps: Optional[int] = None
    eval_every_epochs: int = 1
    verbose: int = 1
    recorded_flags: dict = dataclasses.field(default_factory=dict)

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
        `recorded_flags` is left out. A checkpoint holds these, and a run
        resumes it only when all but `MAY_CHANGE_ON_RESUME` are equal.
        """
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "recorded_flags":
                continue
            if field.name == "sam":
                values["sam"] = value is not None
                if value is not None:
                    values.update(trainer_flags.sam_defaults(**value))
            elif dataclasses.is_dataclass(value):
                values.update(dataclasses.asdict(value))
            else:
                values[field.name] = value
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
                    for name in trainer_flags.sam_defaults()
                    if hasattr(flags_obj, name)
                }
                if getattr(flags_obj, "sam", True)
                else None
            ),
            accelerator=AcceleratorConfig.from_flags(flags_obj),
            epochs=flags_obj.epochs,
            train_steps=flags_obj.train_steps or 0,
            weight_decay=flags_obj.weight_decay,
            checkpoint_every_steps=flags_obj.checkpoint_every_steps,
            eval_every_epochs=flags_obj.eval_every_epochs,
            verbose=flags_obj.verbose,
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
    foreign = trainer_flags.foreign_flag_names()
    return {
        k: v
        for k, v in values.items()
        if k not in foreign
        and isinstance(v, (str, int, float, bool, type(None), list))
    }
