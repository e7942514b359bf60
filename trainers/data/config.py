"""What a run asks of its data, as one typed value instead of flags.

Each setting of a run is a field declared with `setting`: its default,
its help and its check are the flag's of its name (`trainers.flags`
declares the flags from the fields), so each is written once.
"""

import dataclasses
import math
import numbers
from typing import Optional

from trainers.data import augment


def setting(default, help, choices=None, check=None, streamed=False):
    """A field of a run's settings that is also the flag of its name.

    Args:
        default: the field's default and the flag's.
        help: the flag's help, which says what the setting means.
        choices: the values an enum flag takes.
        check: `(predicate, "must ...")`; the flag refuses a value the
            predicate rejects (and a float that is not finite).
        streamed: declared with the streaming trainers' flags only.
    """
    metadata = dict(help=help, choices=choices, check=check, streamed=streamed)
    return dataclasses.field(default=default, metadata=metadata)


def at_least(low):
    return lambda v: v >= low, f"must be >= {low}"


def unset_or_at_least(low):
    return lambda v: v is None or v >= low, f"must be >= {low}"


def accepts(field, value):
    """Whether `value` passes the check of the setting `field`: one of its
    choices, an integer for an integer field, its predicate, and for a
    float, being finite. A field without these takes any value."""
    if field.metadata.get("choices"):
        return value in field.metadata["choices"]
    if _not_an_integer(field, value):
        return False
    if field.metadata.get("check") is None:
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return False
    try:
        return bool(field.metadata["check"][0](value))
    except TypeError:  # None, or a value of another type
        return False


def requirement(field):
    """What the check of the setting `field` asks, as "must ...": the
    message of its flag and of its field."""
    if field.metadata.get("choices"):
        return f"must be one of {field.metadata['choices']}"
    finite = " and finite" if field.type is float else ""
    return field.metadata["check"][1] + finite


def check_settings(config):
    """Raises a `ValueError` naming the first setting of the dataclass
    `config` that its check refuses, and the value."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not accepts(field, value):
            must = (
                "must be an integer"
                if _not_an_integer(field, value)
                else requirement(field)
            )
            raise ValueError(
                f"`{field.name}` {must}. Received: {field.name}={value!r}"
            )


def _not_an_integer(field, value):
    # absl gives an integer flag an int; a config made by hand may not.
    if field.type not in (int, Optional[int]) or value is None:
        return False
    return isinstance(value, bool) or not isinstance(value, numbers.Integral)


class FlagFields:
    """A dataclass whose fields are flags of the same names, checked when
    made (`check_settings`, then `ACTS_ONLY_WITH`).

    `ACTS_ONLY_WITH` maps a setting to `(other setting, its value)`: the
    setting, when set (not its default, None or empty), is refused where
    the other has another value, for there it would be ignored.
    """

    ACTS_ONLY_WITH = {}

    def __post_init__(self):
        check_settings(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, (other, needed) in self.ACTS_ONLY_WITH.items():
            value, others = getattr(self, name), getattr(self, other)
            unset = value in (defaults[name], None, "")
            if not unset and others != needed:
                raise ValueError(
                    f"`{name}` acts with `{other}={needed}` only. "
                    f"Received: {name}={value!r}, {other}={others!r}"
                )

    @classmethod
    def from_flags(cls, flags_obj):
        """The fields of the same names in `flags_obj`; a field it lacks
        (the streamed data sets' flags in an in-memory trainer) keeps its
        default."""
        return cls(
            **{
                field.name: getattr(flags_obj, field.name)
                for field in dataclasses.fields(cls)
                if hasattr(flags_obj, field.name)
            }
        )


@dataclasses.dataclass(frozen=True)
class DataConfig(FlagFields):
    """The data settings of a run; each field is the flag of its name."""

    ACTS_ONLY_WITH = {"data_dir": ("synthetic_data", False)}

    batch_size: int = setting(
        128,
        "Global batch size, in examples, split evenly across replicas.",
        check=at_least(1),
    )
    seed: int = setting(
        0,
        "Seed of weights, data order and noise.",
        check=(lambda v: 0 <= v < 2**32, "must lie in [0, 2**32)"),
    )
    augmentation: str = setting(
        "none",
        "none; basic (flip, pad 4, random crop); cutout (basic + a black "
        "square per image); "
        "randaugment (basic + Keras RandAugment); autoaugment_cifar and "
        "autoaugment_svhn (the AutoAugment policy, then basic and cutout, "
        "as in the SAM paper's code).",
        choices=list(augment.AUGMENTATIONS),
    )
    data_dir: str = setting(
        None,
        "Where the data set lives: a prepared tensorflow-datasets directory, "
        "or for Fashion-MNIST also a directory with the four IDX .gz files.",
    )
    synthetic_data: bool = setting(
        False,
        "Random data with the data set's shapes and classes (smoke runs).",
    )
    train_examples: int = setting(
        None,
        "Train on only the first N training examples (default: all); "
        "applied before --label_noise. For CPU-sized studies.",
        check=unset_or_at_least(1),
    )
    validation_examples: int = setting(
        0,
        "Hold out the last N examples of the training split as a "
        "validation set (labels noised like the training labels, at "
        "--label_noise); its accuracy is recorded every epoch, for choosing "
        "hyperparameters without the test set.",
        check=at_least(0),
    )
    label_noise: float = setting(
        0.0,
        "Fraction of training labels replaced by uniformly random classes "
        "(seeded; the test set stays clean).",
        check=(lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    )
    track_memorization: bool = setting(
        False,
        "Record every epoch the training accuracy on the examples whose "
        "label --label_noise changed (memorization) and on the others.",
    )
    image_size: int = setting(
        224,
        "Height and width, in pixels, of the images the model sees.",
        check=at_least(32),
        streamed=True,
    )
    shuffle_buffer: int = setting(
        10000,
        "Examples in the shuffle buffer (encoded images, about 110 kB each "
        "on ImageNet), after tensorflow-datasets' file shuffling.",
        check=at_least(1),
        streamed=True,
    )
