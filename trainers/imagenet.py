"""ImageNet (ILSVRC 2012) with SAM, streamed from tensorflow-datasets.

Needs a prepared tensorflow-datasets copy of imagenet2012 in --data_dir
(built from the manually downloaded archives; nothing is downloaded here).
Trains on `train`, evaluates on `validation`. Smoke run on a CPU:

    python -m trainers.imagenet --synthetic_data --image_size=64 \\
        --batch_size=16 --train_steps=4

The paper's setting (ResNet-50, 224 px, batch 4096, lr 1.0 cosine, momentum
0.9, label smoothing 0.1, weight decay 1e-4, ρ = 0.05, Inception crop and
flip; top-1 error 22.5 % with SAM against 22.9 % after 100 epochs, 20.9 %
against 22.3 % after 400; ResNet-152, 400 epochs: 18.4 % against 20.9 %):

    python -m trainers.imagenet --data_dir=<tfds dir> --model=resnet50 \\
        --epochs=100 --batch_size=4096 --learning_rate=1.0 \\
        --label_smoothing=0.1 --weight_decay=1e-4 --rho=0.05 \\
        --strategy=tpu --tpu=<name>

(--epochs=400 for the longer runs, --model=resnet152 for the deeper one.)
"""

from absl import flags

from trainers import config as trainer_config
from trainers import flags as trainer_flags
from trainers import loop
from trainers.data import datasets
from trainers.data import stream

IMAGENET = datasets.IMAGENET


def define_flags():
    trainer_flags.define_stream_flags(
        model="resnet50",
        epochs=100,
        batch_size=4096,
        learning_rate=1.0,
        weight_decay=1e-4,
        label_smoothing=0.1,
        rho=0.05,
        augmentation="basic",
        output_dir="runs/imagenet",
    )
    flags.adopt_module_key_flags(trainer_flags)


def run(flags_obj, strategy_override=None):
    return loop.run(
        trainer_config.TrainingConfig.from_flags(flags_obj),
        lambda data_config: stream.load(data_config, IMAGENET),
        strategy_override,
    )


if __name__ == "__main__":
    define_flags()
    trainer_flags.run_main(trainer_flags.accuracy_main(run, "top-1 accuracy"))
