"""Small models for 28×28 images: quick runs and the label-noise study."""

import keras

from trainers.models import regularization


def small_cnn(input_shape, num_classes, weight_decay=0.0):
    """Two conv blocks and a dense head: ~0.4M weights, fast on a CPU."""
    reg = regularization.weight_decay_regularizer(weight_decay)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 3, padding="same", kernel_regularizer=reg),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", kernel_regularizer=reg),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(128, activation="relu", kernel_regularizer=reg),
            keras.layers.Dense(num_classes, kernel_regularizer=reg),
        ],
        name="small_cnn",
    )


def mlp(input_shape, num_classes, weight_decay=0.0, width=512):
    """Two ReLU hidden layers of `width` units: ~0.67M weights on 28x28.

    Without convolutions, pooling, dropout or BatchNorm it has nothing but
    the optimizer to keep it from fitting noisy labels, and it trains in
    seconds on a CPU: the model of the label-noise study
    (`benchmarks/generalization.py`).
    """
    reg = regularization.weight_decay_regularizer(weight_decay)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(
                width, activation="relu", kernel_regularizer=reg
            ),
            keras.layers.Dense(
                width, activation="relu", kernel_regularizer=reg
            ),
            keras.layers.Dense(num_classes, kernel_regularizer=reg),
        ],
        name="mlp",
    )
