"""What a run asks of its data, as one typed value instead of flags."""

import dataclasses


class FlagFields:
    """A dataclass whose fields are flags of the same names."""

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
    """The data settings of a run; each field is the flag of its name.

    Attributes:
        batch_size: examples per training step (all replicas).
        seed: fixes the example order, the held-out split, the label noise
            and the augmentation draws.
        augmentation: one of `trainers.data.augment.AUGMENTATIONS`.
        data_dir: where the data set is (IDX files or a prepared
            tensorflow-datasets copy).
        synthetic_data: random images instead of `data_dir`.
        train_examples: train on the first this many examples (0: all).
        validation_examples: hold out the last this many training examples
            (in-memory data sets).
        label_noise: the fraction of training labels resampled uniformly
            (in-memory data sets).
        track_memorization: record the accuracy on the examples whose label
            the noise changed, and on the others (in-memory data sets).
        image_size: side of the images the model sees (streamed data sets).
        shuffle_buffer: encoded examples in the shuffle buffer (streamed
            data sets).
    """

    batch_size: int
    seed: int = 0
    augmentation: str = "none"
    data_dir: str = None
    synthetic_data: bool = False
    train_examples: int = 0
    validation_examples: int = 0
    label_noise: float = 0.0
    track_memorization: bool = False
    image_size: int = 224
    shuffle_buffer: int = 10000
