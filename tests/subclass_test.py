"""Subclasses of SAMModel, as Keras users subclass `keras.Model`: their own
`compute_loss`, layers, `call` and `predict_step`, against a NumPy SAM
step and the same subclass of a plain `keras.Model`."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from tests import backends

X = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
Y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")
W0 = np.random.default_rng(2).normal(size=(3, 2)).astype("float32")
RHO, LR, PENALTY = 0.5, 0.1, 0.01


def linear_base():
    base = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, use_bias=False)]
    )
    base.set_weights([W0])
    return base


class Penalized(keras_sam.SAMModel):
    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + PENALTY * ops.sum(ops.square(y_pred))


@keras.saving.register_keras_serializable(package="keras_sam_tests")
class WithHead(keras_sam.SAMModel):
    def __init__(self, base, **kwargs):
        super().__init__(base, **kwargs)
        self.head = keras.layers.Dense(2, name="head")

    def call(self, inputs, training=None):
        return self.head(super().call(inputs, training=training))


@keras.saving.register_keras_serializable(package="keras_sam_tests")
class WithHeadNoTraining(keras_sam.SAMModel):
    # Keras passes `training` only to a `call` that takes it.
    def __init__(self, base, **kwargs):
        super().__init__(base, **kwargs)
        self.head = keras.layers.Dense(2, name="head")

    def call(self, inputs):
        return self.head(self.base(inputs))


def test_an_overridden_compute_loss_is_in_both_passes():
    def gradient(w):  # of mean((xw - y)²) + PENALTY Σ (xw)²
        y_pred = X.astype(np.float64) @ w
        d_pred = 2 * (y_pred - Y) / Y.size + 2 * PENALTY * y_pred
        return X.T @ d_pred

    g = gradient(W0.astype(np.float64))
    want = W0 - LR * gradient(W0 + RHO * g / np.linalg.norm(g))
    model = Penalized(linear_base(), rho=RHO)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(X, Y, batch_size=len(X), epochs=1, verbose=0)
    np.testing.assert_allclose(model.get_weights()[0], want, rtol=1e-5)
    without_penalty = W0 - LR * gradient(W0)
    assert np.abs(want - without_penalty).max() > 1e-3


@pytest.mark.parametrize("subclass", [WithHead, WithHeadNoTraining])
def test_the_layers_a_subclass_makes_are_saved_and_train_on(tmp_path, subclass):
    # `SAMModel` built itself in `__init__`, before the subclass made its
    # head: a loaded file dropped the head's weights (a warning only) and
    # its `fit` failed in the optimizer.
    def trained(model, epochs):
        model.fit(X, Y, batch_size=4, epochs=epochs, shuffle=False, verbose=0)
        return model

    def compiled():
        keras.utils.set_random_seed(3)  # the head's initial weights
        model = subclass(linear_base(), rho=RHO)
        model.compile(
            optimizer=keras.optimizers.SGD(LR, momentum=0.9), loss="mse"
        )
        return model

    uninterrupted = trained(compiled(), 2)
    model = trained(compiled(), 1)
    path = os.fspath(tmp_path / "with_head.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, subclass) and loaded.head.built
    np.testing.assert_array_equal(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0)
    )
    trained(loaded, 1)
    for want, got in zip(uninterrupted.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # A weights file, before any batch: the model builds its head first.
    weights = os.fspath(tmp_path / "with_head.weights.h5")
    model.save_weights(weights)
    fresh = compiled()
    fresh.load_weights(weights)
    np.testing.assert_array_equal(
        fresh.predict(X, verbose=0), model.predict(X, verbose=0)
    )


@pytest.mark.skipif(
    backends.BACKEND == "torch", reason="Keras exports TF SavedModels there"
)
def test_a_subclass_that_overrides_call_exports_its_call(tmp_path):
    import tensorflow as tf

    model = WithHead(linear_base(), rho=RHO)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    path = os.fspath(tmp_path / "exported")
    model.export(path, verbose=0)
    loaded = tf.saved_model.load(path)  # held: `serve` reads its variables
    served = loaded.serve(X).numpy()
    np.testing.assert_allclose(
        served, model.predict(X, verbose=0), rtol=1e-5, atol=1e-6
    )
    assert np.abs(served - model.base.predict(X, verbose=0)).max() > 1e-3


class Decoded(keras.Sequential):
    def predict_step(self, data):
        return super().predict_step(data) + 100.0


class Scaled(keras_sam.SAMModel):
    def predict_step(self, data):
        return 10.0 * super().predict_step(data)


@pytest.mark.skipif(
    backends.BACKEND == "jax", reason="JAX's predict_step takes a state"
)
def test_the_predict_step_of_a_subclass_is_used_over_the_bases():
    # As a plain Keras subclass: the base's own `predict_step` had run in
    # place of the subclass's.
    base = Decoded([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    base.set_weights([W0])
    model = Scaled(base, rho=RHO)
    want = 10.0 * (X @ W0)
    np.testing.assert_allclose(model.predict(X, verbose=0), want, rtol=1e-5)
    np.testing.assert_allclose(model.predict_on_batch(X), want, rtol=1e-5)
    plain = keras_sam.SAMModel(base, rho=RHO)
    np.testing.assert_allclose(
        plain.predict(X, verbose=0), X @ W0 + 100.0, rtol=1e-5
    )
    # A subclass's own `call` too: its head had been skipped.
    with_head = WithHead(base, rho=RHO)
    head = with_head.predict(X, verbose=0)
    kernel, bias = with_head.head.get_weights()
    np.testing.assert_allclose(head, X @ W0 @ kernel + bias, rtol=1e-5)
