"""SGD next to SAM where SAM has something to prevent: memorizing bad labels.

What `make train` runs (2–3 minutes on 2 cores):

    python -m trainers.compare_sgd_sam \
        --data_dir=/usr/share/datasets/fashion-mnist

40 % of the labels of 4,000 real Fashion-MNIST training examples are
replaced by random classes, and the same MLP (two ReLU layers of 512 units,
nothing else to regularize it but weight decay 5e-4) is trained for 60
epochs twice from the same initial weights and batches: once with a plain
Keras `fit` (SGD with momentum 0.9, learning rate 0.05, cosine decay) and
once wrapped in `keras_sam.SAMModel` with the same optimizer and the ρ the
label-noise study selected at this noise rate on a validation split
(`benchmarks/generalization.py`, docs/results.md). The table shows the
test accuracy on the clean test set, how many of the mislabeled training
examples each model fits (memorization), the largest eigenvalue of the
Hessian of the training loss (sharpness) and the time per epoch.

Each run checkpoints in --output_dir/{sgd,sam}, so running the command
again resumes or, when finished, only reprints the table. The table's
figures are written to --output_dir/comparison.json; docs/results.md
shows the table rendered from a copy of that file, docs/make_train.json.
"""

import os
import types

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import keras_sam.analysis
from trainers import checkpoint
from trainers import config as trainer_config
from trainers import fashion_mnist
from trainers import flags as trainer_flags
from trainers import loop
from trainers.data import arrays
from trainers.data import config as data_config
from trainers.data import datasets as data_lib

FLAGS = flags.FLAGS

# Where SGD memorizes noisy labels within minutes on a CPU: an MLP with no
# dropout, BatchNorm or augmentation, 4,000 examples, 60 epochs. The regime
# of `make train` (this program) and of the label-noise study
# (benchmarks.generalization).
MEMORIZATION_REGIME = dict(
    model="mlp",
    train_examples=4000,
    validation_examples=2000,
    epochs=60,
    batch_size=128,
    learning_rate=0.05,
    weight_decay=5e-4,
    track_memorization=True,
)

# The ρ the label-noise study selected at 40 % noise on seed 0's validation
# split (docs/results.md).
SELECTED_RHO = 0.2
COMPARISON = "comparison.json"
# What the table reads of each run's results.
REPORTED = (
    "test_accuracy",
    "train_accuracy_flipped",
    "train_accuracy_unflipped",
    "sharpness",
    "train_wall_seconds",
    "train_cpu_seconds",
)


def define_flags():
    fashion_mnist.define_flags(
        **MEMORIZATION_REGIME,
        label_noise=0.4,
        rho=SELECTED_RHO,
        output_dir="runs/compare_sgd_sam",
    )
    flags.adopt_module_key_flags(fashion_mnist)
    flags.DEFINE_integer(
        "sharpness_examples",
        2000,
        "Training examples (with their noisy labels) over which the top "
        "Hessian eigenvalue of the loss is measured.",
        lower_bound=1,
    )


def run(flags_obj, datasets_override=None):
    """Trains SGD then SAM; returns {name: results with "sharpness"} and
    writes their `comparison` to --output_dir/comparison.json."""
    if not getattr(flags_obj, "sam", True):
        raise ValueError(
            "--sam must stay on: the comparison trains a plain fit (SGD) "
            "and SAM. Received: --nosam"
        )
    if not flags_obj.track_memorization:
        raise ValueError(
            "--track_memorization must stay on: the comparison reports the "
            "memorized labels. Received: --track_memorization=False"
        )
    if not flags_obj.label_noise > 0:
        raise ValueError(
            "--label_noise must be > 0: the comparison reports how many "
            "mislabeled examples each model fits. Received: --label_noise="
            f"{flags_obj.label_noise}"
        )
    # Read once: both runs and both sharpness measurements use the same.
    datasets = datasets_override or data_lib.load(
        fashion_mnist.DATASET, flags_obj.data_dir, flags_obj.synthetic_data
    )
    results = {}
    for name, sam in (("SGD", False), ("SAM", True)):
        values = dict(
            trainer_config.flag_record(flags_obj),
            sam=sam,
            output_dir=os.path.join(flags_obj.output_dir, name.lower()),
        )
        label = f"rho={flags_obj.rho}" if sam else "plain Keras fit"
        print(f"\n=== {name} ({label}) ===")
        run_flags = types.SimpleNamespace(**values)
        r = fashion_mnist.run(run_flags, datasets_override=datasets)
        r["sharpness"] = top_hessian_eigenvalue(run_flags, datasets)
        results[name] = r
    checkpoint.write_json(
        os.path.join(flags_obj.output_dir, COMPARISON),
        comparison(results, flags_obj.label_noise),
    )
    return results


def comparison(results, label_noise):
    """What the table and its summary read: the label noise, and per run
    its `REPORTED` figures, its epochs and its ρ."""
    return dict(
        label_noise=label_noise,
        **{
            name: dict(
                {key: r[key] for key in REPORTED},
                epochs=len(r["history"]["loss"]),
                rho=r["flags"]["rho"],
            )
            for name, r in results.items()
        },
    )


def top_hessian_eigenvalue(run_flags, datasets_override=None):
    """λ_max of the training loss (cross-entropy on the noisy labels, no
    weight decay) of the model a run saved, on its first training
    examples."""
    splits = arrays.in_memory_splits(
        data_config.DataConfig.from_flags(run_flags),
        fashion_mnist.DATASET,
        datasets_override,
    )
    count = min(run_flags.sharpness_examples, len(splits.train.labels))
    images = splits.train.images[:count].astype(np.float32) / 255.0
    dataset = tf.data.Dataset.from_tensor_slices(
        (images, splits.train.labels[:count])
    ).batch(500)
    model = keras.saving.load_model(
        os.path.join(run_flags.output_dir, loop.MODEL)
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return float(
        keras_sam.analysis.hessian_top_eigenvalues(
            model, dataset, loss, k=1, max_iterations=30, tol=1e-3
        )[0]
    )


def format_table(compared):
    """The markdown table of a `comparison`."""
    sgd, sam = compared["SGD"], compared["SAM"]

    def per_epoch(r, key):
        return r[key] / r["epochs"]

    rows = [
        (
            "test accuracy (clean test set)",
            f"{sgd['test_accuracy']:.2%}",
            f"{sam['test_accuracy']:.2%}",
        ),
        (
            "mislabeled training examples fit (memorized)",
            f"{sgd['train_accuracy_flipped']:.1%}",
            f"{sam['train_accuracy_flipped']:.1%}",
        ),
        (
            "correctly labeled training examples fit",
            f"{sgd['train_accuracy_unflipped']:.1%}",
            f"{sam['train_accuracy_unflipped']:.1%}",
        ),
        (
            "sharpness: top Hessian eigenvalue of the training loss",
            f"{sgd['sharpness']:.1f}",
            f"{sam['sharpness']:.1f}",
        ),
        (
            "wall time per epoch (s)",
            f"{per_epoch(sgd, 'train_wall_seconds'):.2f}",
            f"{per_epoch(sam, 'train_wall_seconds'):.2f}",
        ),
        (
            "CPU time per epoch (s, all threads)",
            f"{per_epoch(sgd, 'train_cpu_seconds'):.2f}",
            f"{per_epoch(sam, 'train_cpu_seconds'):.2f}",
        ),
    ]
    lines = [
        f"Fashion-MNIST, {compared['label_noise']:.0%} of the training "
        f"labels replaced by random ones, MLP, {sgd['epochs']} epochs:",
        "",
        f"| | SGD | SAM (ρ = {sam['rho']}) |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    return "\n".join(lines)


def summary(compared):
    """A plain sentence of what a `comparison` means, whatever it shows."""
    sgd, sam = compared["SGD"], compared["SAM"]
    gain = 100 * (sam["test_accuracy"] - sgd["test_accuracy"])
    ratio = sgd["sharpness"] / max(sam["sharpness"], 1e-12)
    memorized = (
        f"SGD fit {sgd['train_accuracy_flipped']:.0%} of the wrong labels "
        f"by heart, SAM {sam['train_accuracy_flipped']:.0%}; SGD's minimum "
        f"is {ratio:.1f}x as sharp as SAM's"
    )
    cost = sam["train_cpu_seconds"] / sgd["train_cpu_seconds"]
    verdict = "above" if gain > 0 else "below"
    return (
        f"SAM ends {abs(gain):.1f} points {verdict} SGD on the clean test "
        f"set. {memorized}. SAM took {cost:.1f}x SGD's CPU time."
    )


def main(_):
    compared = comparison(run(FLAGS), FLAGS.label_noise)
    print()
    print(format_table(compared))
    print()
    print(summary(compared))
    print(
        "docs/results.md has the study behind this (every noise rate, "
        "several seeds, ρ chosen on a validation split)."
    )


if __name__ == "__main__":
    define_flags()
    trainer_flags.run_main(main)
