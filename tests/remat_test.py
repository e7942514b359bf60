"""Rematerialized layers (`keras.RematScope`, `keras.remat`) under SAM.

A rematerialized layer runs its forward again in the backward pass. On
PyTorch (`torch.utils.checkpoint`) that rerun had read the stored w instead
of the pass's w + ε: a wrong gradient for ρ > 0. On TensorFlow
`tf.recompute_grad` gives the weights handed in no gradient at all, so such
layers are refused there. The reference is a hand SAM step on the same
model without rematerialization, by the backend's own autodiff.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_sam
from keras_sam import analysis
from tests import backends
from tests.sam_model_test import MODES

RHO, LR, BATCH, STEPS = 0.5, 0.5, 8, 3


class TanhDense(keras.layers.Layer):
    """`tanh(x W)`, rematerialized by `keras.remat` for `remat` "function"
    (reading W inside) or "function_of_weights" (W an argument)."""

    def __init__(self, units, remat=None, **kwargs):
        super().__init__(**kwargs)
        self.units, self.remat = units, remat

    def build(self, input_shape):
        self.kernel = self.add_weight((input_shape[-1], self.units))

    def call(self, x):
        def forward(x, kernel):
            return ops.tanh(ops.matmul(x, kernel))

        if self.remat == "function":
            return keras.remat(lambda x: forward(x, self.kernel))(x)
        if self.remat == "function_of_weights":
            kernel = ops.convert_to_tensor(self.kernel)
            return keras.remat(forward)(x, kernel)
        return forward(x, self.kernel)


def make_base(remat=None):
    """A two-layer model; `remat` is a `RematScope` mode or a
    `TanhDense` one ("function", "function_of_weights")."""
    keras.utils.set_random_seed(1)
    scope = contextlib.nullcontext()
    if remat in ("full", "list_of_layers", "activations"):
        names = ["hidden"] if remat == "list_of_layers" else None
        scope = keras.RematScope(mode=remat, layer_names=names)
    with scope:
        return keras.Sequential(
            [
                keras.Input((4,)),
                TanhDense(5, remat=remat, name="hidden"),
                keras.layers.Dense(3, activation="tanh"),
            ]
        )


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")
    return x, rng.integers(0, 3, STEPS * BATCH).astype("int32")


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


REMAT = [
    "full",
    "list_of_layers",
    "activations",
    "function",
    "function_of_weights",
]


# On TensorFlow `tf.recompute_grad` differentiates only a function's
# arguments and `tf.Variable`s.
REFUSED_ON_TENSORFLOW = {
    "full": "refused (the test below)",
    "list_of_layers": "refused (the test below)",
    "function": "W gets no gradient, undetected: docs/limits.md",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("remat", REMAT)
def test_a_rematerialized_model_takes_the_sam_step(remat, mode):
    if backends.BACKEND == "tensorflow" and remat in REFUSED_ON_TENSORFLOW:
        pytest.skip(REFUSED_ON_TENSORFLOW[remat])
    x, y = data()
    base = make_base(remat)
    model = keras_sam.SAMModel(base, rho=RHO)
    model.compile(keras.optimizers.SGD(LR), loss=xent(), **MODES[mode])
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    want = backends.train_by_hand_sam(
        make_base(), xent(), x, y, BATCH, RHO, LR
    ).get_weights()
    for got, expected in zip(base.get_weights(), want):
        backends.assert_matches_plain_fit(got, expected, mode, 1e-5, 1e-6)


@backends.tensorflow_only
@pytest.mark.parametrize("remat", ["full", "list_of_layers"])
def test_a_rematerialized_layer_is_refused_on_tensorflow(remat):
    model = keras_sam.SAMModel(make_base(remat))
    model.compile("sgd", loss=xent(), run_eagerly=True)
    with pytest.raises(ValueError, match=r"recompute_grad.*'hidden'"):
        model.fit(*data(), batch_size=BATCH, verbose=0)


@backends.tensorflow_only
def test_analysis_refuses_a_rematerialized_layer_for_gradients_only():
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    base = make_base("list_of_layers")
    with pytest.raises(ValueError, match=r"recompute_grad.*'hidden'"):
        analysis.hessian_top_eigenvalues(base, dataset, xent(), seed=0)
    # Losses alone: the rerun forward reads the weights as handed in.
    got, want = [
        analysis.loss_landscape_1d(model, dataset, xent(), [0.0, 1.0], seed=0)
        for model in (base, make_base())
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_hessian_of_a_rematerialized_model_is_the_models():
    if backends.BACKEND == "tensorflow":
        pytest.skip("refused on TensorFlow")
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    eigenvalues = [
        analysis.hessian_top_eigenvalues(
            make_base(remat), dataset, xent(), k=1, seed=0
        )
        for remat in (None, "full")
    ]
    np.testing.assert_allclose(*eigenvalues, rtol=1e-4)
