"""SGD against SAM on Fashion-MNIST at accelerator scale, on Keras' JAX.

    KERAS_BACKEND=jax python -m benchmarks.gpu_pair \
        --data_dir=data/fashion-mnist --epochs=20 --output=docs/gpu_pair.json

Needs only JAX, Keras and keras_sam (no TensorFlow, no absl), so it runs
where the GPU machines have nothing else; `--data_dir` holds the four IDX
.gz files of Fashion-MNIST. It trains, from the same initial weights and on
the same batches, a plain Keras `fit` of `--model` (default WRN-16-4) and
`SAMModel(base, rho=--rho)` around it: SGD with momentum 0.9, learning rate
0.1 with cosine decay over `--epochs`, weight decay 5e-4 as L2 in the loss,
batch 128, basic augmentation (horizontal flip, pad 4, random crop: a
shift by up to 4 pixels) inside the model, so on the device. One epoch of
each in turn; after every epoch the test accuracy of both is written to
`--output` (atomically), so a run that a time limit stops keeps every
epoch it finished, and `finished_epochs` says how far the schedule got.
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
import keras_sam.options  # noqa: E402
from trainers import checkpoint  # noqa: E402
from trainers import models  # noqa: E402
from trainers.data import datasets  # noqa: E402


def augmented(base, shape):
    """`base` behind a random flip and a shift by up to 4 pixels with zero
    fill, which is padding by 4 and a random crop (identity at inference)."""
    shift = 4 / shape[0]
    translation = keras.layers.RandomTranslation(
        shift, shift, fill_mode="constant", interpolation="nearest"
    )
    # Keras 3.15.1 marks it unfit for compiling; on JAX it traces, and the
    # mark would make Keras run both models' steps eagerly.
    translation.supports_jit = True
    return keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.RandomFlip("horizontal"),
            translation,
            base,
        ]
    )


def pair(args, train, test, write):
    """Trains SGD and SAM epoch by epoch; calls `write(record)` after each."""
    shape, classes = train.images.shape[1:], int(train.labels.max()) + 1
    mean, std = train.images.mean(), train.images.std()

    def normalized(images):
        return ((images - mean) / std).astype("float32")

    x, x_test = normalized(train.images), normalized(test.images)
    steps = args.epochs * (len(x) // args.batch_size)
    runs = {}
    for key in ("sgd", "sam"):
        # Alike from the seed on: initial weights and augmentation streams.
        keras.utils.set_random_seed(args.seed)
        runs[key] = augmented(
            models.build(args.model, shape, classes, 5e-4), shape
        )
    runs["sam"] = keras_sam.SAMModel(runs["sam"], rho=args.rho)
    for model in runs.values():
        schedule = keras.optimizers.schedules.CosineDecay(0.1, steps)
        model.compile(
            optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=True,
        )
        if not model.jit_compile:  # Keras fell back to running eagerly
            raise RuntimeError("The pair's steps must run under jax.jit.")
    record = dict(vars(args), finished_epochs=0, epochs_planned=args.epochs)
    record["history"] = {k: [] for k in runs}
    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x))
        for key, model in runs.items():
            start = time.perf_counter()
            fit = model.fit(
                x[order],
                train.labels[order],
                batch_size=args.batch_size,
                shuffle=False,
                verbose=0,
            )
            seconds = time.perf_counter() - start
            _, accuracy = model.evaluate(x_test, test.labels, verbose=0)
            record["history"][key].append(
                dict(
                    train_loss=fit.history["loss"][-1],
                    test_accuracy=accuracy,
                    seconds=seconds,
                )
            )
        record["finished_epochs"] = epoch + 1
        write(record)
        print(json.dumps({k: v[-1] for k, v in record["history"].items()}))
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=datasets.DEBIAN_FASHION_MNIST)
    parser.add_argument("--model", default="wrn_16_4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--rho", type=float, default=keras_sam.options.SAMOptions.rho
    )
    parser.add_argument("--label_noise", type=float, default=0.0)
    parser.add_argument(
        "--train_examples", type=int, default=None, help="Default: all."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file.")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit("Run with KERAS_BACKEND=jax.")
    if args.model not in models.MODELS:
        raise SystemExit(
            f"--model={args.model!r} is not one of {sorted(models.MODELS)}."
        )
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be ≥ 1. Received: {args.epochs}.")
    train, test = datasets.load_fashion_mnist_idx(args.data_dir)
    if args.train_examples:
        train = datasets.Split(*(a[: args.train_examples] for a in train))
    if args.label_noise:
        labels, _ = datasets.add_label_noise(
            train.labels, args.label_noise, 10, args.seed
        )
        train = datasets.Split(train.images, labels)

    def write(record):
        if args.output:
            checkpoint.write_json(args.output, record)

    return pair(args, train, test, write)


if __name__ == "__main__":
    main()
