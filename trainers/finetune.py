"""Finetuning a pretrained keras.applications model with SAM.

The head is re-initialized for the data set's classes and BatchNorm layers
are frozen, as in the paper. --pretrained_weights is a local weight file of
the architecture (e.g. efficientnetb7_notop.h5 as keras.applications
downloads it, or the `save_weights` of a model built with
`weights="imagenet"`); nothing is downloaded. Needs a prepared
tensorflow-datasets copy of --dataset in --data_dir. Smoke run on a CPU:

    python -m trainers.finetune --dataset=oxford_flowers102 \\
        --synthetic_data --model=efficientnetb0 --image_size=64 \\
        --batch_size=16 --train_steps=4

The paper's setting (EfficientNet-B7 pretrained on ImageNet, here at its
native 600 px; 5k steps, batch 1024, lr 0.016 cosine, weight decay 1e-5,
ρ = 0.05; top-1 error with SAM against without: Flowers 0.63 / 1.16 %,
Stanford Cars 5.18 / 5.94 %, Oxford Pets 3.97 / 4.24 %, CIFAR-100
7.44 / 7.68 %, Food101 7.02 / 7.17 %; FGVC Aircraft and Birdsnap are not
in tensorflow-datasets):

    python -m trainers.finetune --dataset=oxford_flowers102 \\
        --data_dir=<tfds dir> --model=efficientnetb7 --image_size=600 \\
        --pretrained_weights=<dir>/efficientnetb7_notop.h5 \\
        --train_steps=5000 --batch_size=1024 --learning_rate=0.016 \\
        --weight_decay=1e-5 --rho=0.05 --strategy=tpu --tpu=<name>

The paper used AutoAugment for CIFAR-100: add
--augmentation=autoaugment_cifar (its CIFAR-10 policy, after the crop).
"""

from absl import flags

from trainers import config as trainer_config
from trainers import flags as trainer_flags
from trainers import loop
from trainers.data import datasets
from trainers.data import stream

DATASETS = datasets.FINETUNING


def define_flags():
    if "dataset" not in flags.FLAGS:
        flags.DEFINE_enum(
            "dataset",
            "oxford_flowers102",
            sorted(DATASETS),
            "tensorflow-datasets name of the data set to finetune on.",
        )
    if "pretrained_weights" not in flags.FLAGS:
        flags.DEFINE_string(
            "pretrained_weights",
            None,
            "Local weight file of the keras.applications model (.weights.h5, "
            ".keras, or legacy .h5 such as efficientnetb7_notop.h5); "
            "default: train from random weights.",
        )
    if "freeze_batchnorm" not in flags.FLAGS:
        flags.DEFINE_bool(
            "freeze_batchnorm",
            True,
            "Keep BatchNorm layers (scale, offset and statistics) fixed.",
        )
    trainer_flags.define_stream_flags(
        model="efficientnetb0",
        train_steps=5000,
        batch_size=1024,
        learning_rate=0.016,
        weight_decay=1e-5,
        rho=0.05,
        augmentation="basic",
        output_dir="runs/finetune",
    )
    flags.adopt_module_key_flags(trainer_flags)


def run(flags_obj, strategy_override=None):
    if flags_obj.dataset not in DATASETS:
        raise ValueError(
            f"Unknown --dataset={flags_obj.dataset!r}; expected one of "
            f"{sorted(DATASETS)}."
        )
    return loop.run(
        trainer_config.TrainingConfig.from_flags(flags_obj),
        lambda data_config: stream.load(
            data_config, DATASETS[flags_obj.dataset]
        ),
        strategy_override,
        pretrained_weights=flags_obj.pretrained_weights,
        freeze_batchnorm=flags_obj.freeze_batchnorm,
    )


if __name__ == "__main__":
    define_flags()
    trainer_flags.run_main(trainer_flags.accuracy_main(run, "top-1 accuracy"))
