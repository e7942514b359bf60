"""trainers.config: every setting comes from the flag of its name."""

import dataclasses
import types

from absl import flags

from tests import backends
from trainers import config
from trainers import fashion_mnist
from trainers import flags as trainer_flags
from trainers import loop
from trainers.data import arrays
from trainers.data import config as data_config

pytestmark = backends.tensorflow_only

FLAT_CONFIGS = [
    config.OptimizerConfig,
    config.SAMConfig,
    config.AcceleratorConfig,
    data_config.DataConfig,
]
NESTED = {"data", "optimizer", "sam", "accelerator", "recorded_flags"}


def _declared_flags():
    """The process's flags, with the common and streamed sets' declared."""
    if "rho" not in flags.FLAGS:
        fashion_mnist.define_flags()
    trainer_flags.define_stream_flags()
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])
    return flags.FLAGS


def test_every_field_is_a_flag_with_the_flags_default():
    # A field without a flag of its name would keep its default silently.
    declared = _declared_flags()
    fields = [
        (cls.__name__, f)
        for cls in FLAT_CONFIGS
        for f in dataclasses.fields(cls)
    ]
    fields += [
        ("TrainingConfig", f)
        for f in dataclasses.fields(config.TrainingConfig)
        if f.name not in NESTED
    ]
    assert [f"{c}.{f.name}" for c, f in fields if f.name not in declared] == []
    # Trainers set the defaults of `trainers.flags.DEFAULTS` and a few
    # others themselves; every other field's default is its flag's.
    own = set(trainer_flags.DEFAULTS) | trainer_flags.OTHER_DEFAULTABLE
    assert [
        f"{c}.{f.name}: {f.default!r}, flag {declared[f.name].default!r}"
        for c, f in fields
        if f.name not in own
        and f.default is not dataclasses.MISSING
        and f.default != declared[f.name].default
    ] == []


def test_from_flags_reads_every_value():
    values = dict(
        _declared_flags().flag_values_dict(),
        model="resnet20",
        output_dir="/tmp/x",
        epochs=3,
        train_steps=7,
        weight_decay=1e-3,
        checkpoint_every_steps=5,
        eval_every_epochs=2,
        verbose=0,
        batch_size=32,
        seed=9,
        label_noise=0.2,
        learning_rate=0.3,
        lr_schedule="constant",
        nesterov=True,
        label_smoothing=0.1,
        rho=0.2,
        rho_min=0.01,
        switching="periodic",
        sam_every=3,
        perturbation="momentum",
        jit_compile="true",
        mixed_precision="bfloat16",
        steps_per_execution=4,
        deterministic=True,
    )
    made = config.TrainingConfig.from_flags(types.SimpleNamespace(**values))
    assert (made.model, made.output_dir, made.epochs, made.train_steps) == (
        "resnet20",
        "/tmp/x",
        3,
        7,
    )
    assert (made.weight_decay, made.checkpoint_every_steps) == (1e-3, 5)
    assert (made.eval_every_epochs, made.verbose) == (2, 0)
    assert (made.batch_size, made.seed, made.data.label_noise) == (32, 9, 0.2)
    assert made.optimizer == config.OptimizerConfig(
        learning_rate=0.3,
        lr_schedule="constant",
        momentum=values["momentum"],
        nesterov=True,
        label_smoothing=0.1,
    )
    assert (made.sam.rho, made.sam.rho_min, made.sam.sam_every) == (
        0.2,
        0.01,
        3,
    )
    assert (made.sam.switching, made.sam.perturbation) == (
        "periodic",
        "momentum",
    )
    assert made.accelerator == config.AcceleratorConfig(
        jit_compile="true",
        mixed_precision="bfloat16",
        steps_per_execution=4,
        deterministic=True,
    )
    assert made.recorded_flags["rho"] == 0.2
    assert "logtostderr" not in made.recorded_flags  # absl's own
    baseline = config.TrainingConfig.from_flags(
        types.SimpleNamespace(**dict(values, sam=False))
    )
    assert baseline.sam is None


def test_a_config_made_by_hand_trains_without_flags(tmp_path):
    results = loop.run(
        config.TrainingConfig(
            model="small_cnn",
            output_dir=str(tmp_path),
            data=data_config.DataConfig(batch_size=16, synthetic_data=True),
            train_steps=2,
            verbose=0,
        ),
        lambda data: arrays.load(data, fashion_mnist.DATASET),
    )
    assert results["train_steps"] == 2
    assert results["flags"] == {}
