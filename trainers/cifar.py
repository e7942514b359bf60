"""CIFAR-10 and CIFAR-100 with SAM, with optional label noise.

Needs a prepared tensorflow-datasets copy in --data_dir. Quick CPU run:

    python -m trainers.cifar --dataset=cifar10 --data_dir=<tfds dir> \\
        --model=resnet20 --epochs=5

The paper's WRN-28-10 setting (200 epochs, batch 256, lr 0.1 cosine,
weight decay 5e-4, basic augmentation; ρ = 0.05 for CIFAR-10, 0.1 for
CIFAR-100; 2.7 % / 16.5 % error with SAM against 3.5 % / 18.8 %); the
default --rho is CIFAR-10's:

    python -m trainers.cifar --dataset=cifar10 --data_dir=<tfds dir> \\
        --model=wrn_28_10 --epochs=200 --batch_size=256 \\
        --learning_rate=0.1 --weight_decay=5e-4 --rho=0.05 \\
        --augmentation=basic
    python -m trainers.cifar --dataset=cifar100 --data_dir=<tfds dir> \\
        --model=wrn_28_10 --epochs=200 --batch_size=256 \\
        --learning_rate=0.1 --weight_decay=5e-4 --rho=0.1 \\
        --augmentation=basic

Shake-Shake 26 2x96d and PyramidNet-272 with ShakeDrop, with AutoAugment
(1800 epochs: lr 0.05, weight decay 1e-3; 1.6 % / 1.4 % error on CIFAR-10
with SAM in the paper):

    python -m trainers.cifar --dataset=cifar10 --data_dir=<tfds dir> \\
        --model=shake_shake_26_2x96d --augmentation=autoaugment_cifar \\
        --epochs=1800 --batch_size=256 --learning_rate=0.05 \\
        --weight_decay=1e-3 --rho=0.05
    python -m trainers.cifar --dataset=cifar10 --data_dir=<tfds dir> \\
        --model=pyramidnet_272_200 --augmentation=autoaugment_cifar \\
        --epochs=1800 --batch_size=256 --learning_rate=0.05 \\
        --weight_decay=1e-3 --rho=0.05

Label noise (Table 4: ResNet-32, 200 epochs; ρ = 0.1 up to 60 % noise,
0.05 at 80 %):

    python -m trainers.cifar --dataset=cifar10 --label_noise=0.8 \\
        --model=resnet32 --epochs=200 --rho=0.05 --augmentation=basic
"""

from absl import flags

from trainers import config as trainer_config
from trainers import flags as trainer_flags
from trainers import loop
from trainers.data import arrays


def define_flags():
    flags.DEFINE_enum(
        "dataset", "cifar10", ["cifar10", "cifar100"], "Which CIFAR."
    )
    trainer_flags.define_common_flags(
        model="wrn_16_4",
        epochs=200,
        batch_size=256,
        learning_rate=0.1,
        weight_decay=5e-4,
        rho=0.05,
        augmentation="basic",
        output_dir="runs/cifar",
    )
    flags.adopt_module_key_flags(trainer_flags)


def run(flags_obj, datasets_override=None, strategy_override=None):
    return loop.run(
        trainer_config.TrainingConfig.from_flags(flags_obj),
        lambda data_config: arrays.load(
            data_config, flags_obj.dataset, datasets_override
        ),
        strategy_override,
    )


if __name__ == "__main__":
    define_flags()
    trainer_flags.run_main(trainer_flags.accuracy_main(run))
