"""What `SAMModel` accepts as arguments, and what it refuses."""

import inspect
import os
import re

import keras
import numpy as np
import pytest

import keras_sam
from tests import oracle
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MODES
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import batches
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent


def fit(rho, mode="graph", callbacks=()):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=rho)
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    model.fit(
        x,
        y,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return model


def oracle_weights(rhos):
    x, y, w0, b0 = softmax_data()
    rhos = iter(rhos)

    def gradient(w, b, x, y, rho, sample_weight=None):
        return oracle.sam_gradient(w, b, x, y, next(rhos), sample_weight)

    w, b, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), None, LR, MOMENTUM, gradient_fn=gradient
    )
    return w, b


def assert_weights(model, want):
    for got, expected in zip(model.base.get_weights(), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make", [np.float32, keras.ops.convert_to_tensor], ids=["numpy", "tensor"]
)
def test_a_numpy_or_tensor_rho_trains_as_the_same_python_float(make):
    model = fit(make(0.3))
    assert type(model.rho) is float
    assert model.rho == float(np.float32(0.3))
    assert_weights(model, oracle_weights([model.rho] * 3))


class SetRho(keras.callbacks.Callback):
    """Sets `model.rho` before each batch from a list."""

    def __init__(self, values):
        super().__init__()
        self.values = iter(values)

    def on_train_batch_begin(self, batch, logs=None):
        self.model.rho.assign(next(self.values))


@pytest.mark.parametrize("mode", MODES)
def test_a_variable_rho_set_by_a_callback_takes_effect_at_the_next_step(mode):
    rhos = [0.5, 0.0, 0.2]
    rho = keras.Variable(0.05, trainable=False)
    model = fit(rho, mode, callbacks=[SetRho(rhos)])
    assert model.rho is rho
    assert_weights(model, oracle_weights(rhos))
    assert float(rho.numpy()) == pytest.approx(0.2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["variable", "schedule"])
def test_a_negative_rho_at_run_time_makes_the_step_nan(kind, mode):
    # A compiled step cannot raise on a value; before, the step skipped the
    # perturbed pass and trained without SAM, with no sign in the logs.
    if kind == "variable":
        rho = keras.Variable(0.5, trainable=False)
        callbacks = [SetRho([0.5, -0.1, 0.5])]
    else:

        def rho(step):  # 0.5 at the first step, negative from the second
            return 0.5 - 0.6 * keras.ops.cast(step, "float32")

        callbacks = []
    model = fit(rho, mode, callbacks=callbacks)
    weights = model.base.get_weights()
    assert all(np.isnan(w).all() for w in weights)


def test_a_trainable_variable_rho_is_not_a_weight_of_the_model():
    rho = keras.Variable(0.3)  # trainable by default
    model = fit(rho)
    assert len(model.trainable_variables) == 2
    assert all(v is not rho for v in model.variables)
    assert_weights(model, oracle_weights([0.3] * 3))


@pytest.mark.parametrize(
    "rho", [np.float32(0.25), keras.Variable(0.25)], ids=["numpy", "variable"]
)
def test_new_rho_kinds_round_trip_as_their_kind_and_value(rho, tmp_path):
    model = fit(rho)
    config = model.get_config()
    path = os.fspath(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    clone = keras_sam.SAMModel.from_config(config)
    if isinstance(rho, keras.Variable):
        # A new Variable, which a callback reading `model.rho` can assign.
        assert config["rho"] == {"variable": 0.25, "dtype": "float32"}
        for copy in (clone, loaded):
            assert isinstance(copy.rho, keras.Variable)
            assert copy.rho is not rho and not copy.rho.trainable
            assert float(copy.rho.numpy()) == 0.25
    else:
        assert config["rho"] == 0.25 and isinstance(config["rho"], float)
        assert clone.rho == loaded.rho == 0.25
    x, _, _, _ = softmax_data()
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def base():
    return softmax_regression(*softmax_data()[2:])


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: keras_sam.SAMModel(base(), adaptive="yes"),
            "`adaptive` must be True or False. Received: adaptive='yes'",
        ),
        (
            lambda: keras_sam.SAMModel(base(), sync_perturbations="no"),
            "Received: sync_perturbations='no'",
        ),
        (
            lambda: keras_sam.SAMModel(keras_sam.SAMModel(base())),
            "`base` is already a SAMModel",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=float("inf")),
            "`rho` must be finite. Received: rho=inf",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=float("nan")),
            "`rho` must be finite. Received: rho=nan",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=keras.Variable(np.nan)),
            "`rho` must be finite. Received: rho=nan",
        ),
        (
            lambda: keras_sam.SAMModel(base(), eta=float("nan")),
            "`eta` must be finite. Received: eta=nan",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=True),
            "Received: rho=True",
        ),
        (
            # Not the default: a user may mean "no SAM" by it.
            lambda: keras_sam.SAMModel(base(), rho=None),
            "`rho` must be a number >= 0, a float `keras.Variable` or a "
            "schedule. Received: rho=None",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=keras.Variable([0.1, 0.2])),
            "must be a float scalar. Received: rho=",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=keras.Variable(-0.1)),
            "`rho` must be >= 0. Received: rho=-0.1",
        ),
        (
            lambda: keras_sam.SAMModel(
                base(), rho=keras.optimizers.schedules.ExponentialDecay
            ),
            "pass an instance, not a class. Received: rho=<class",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=lambda step, other: 0.1),
            "before `compile` (to follow the learning rate, use "
            "`schedules.RhoFollowingLearningRate`), and it raised TypeError",
        ),
        (
            lambda: keras_sam.SAMModel(
                base(), rho=lambda step: keras.ops.ones((2,))
            ),
            "a float scalar >= 0. At step 0 it returned",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=lambda step: "0.05"),
            "At step 0 it returned '0.05'. Received: rho=<function",
        ),
        (
            lambda: keras_sam.SAMModel(base(), rho=lambda step: -0.1),
            "At step 0 it returned -0.1. Received: rho=<function",
        ),
        (
            lambda: keras_sam.SAMModel(
                base(), rho=lambda step: keras.ops.convert_to_tensor(np.nan)
            ),
            "At step 0 it returned nan. Received: rho=<function",
        ),
        (
            lambda: keras_sam.schedules.RhoFollowingLearningRate(
                keras.optimizers.schedules.CosineDecay(0.1, 10),
                rho_max="0.05",
            ),
            "`rho_max` must be a number >= 0. Received: rho_max='0.05'",
        ),
        (
            lambda: keras_sam.schedules.RhoFollowingLearningRate(
                keras.optimizers.schedules.CosineDecay(0.1, 10),
                lr_max="0.1",
            ),
            "`lr_max` must be a number. Received: lr_max='0.1'",
        ),
        (
            lambda: keras_sam.SAMModel(base(), eta=np.float32(-1)),
            "`eta` must be >= 0. Received: eta=-1.0",
        ),
        (
            lambda: keras_sam.SAMModel(base(), micro_batches=2.0),
            "Received: micro_batches=2.0",
        ),
        (
            lambda: keras_sam.SAMModel(base(), adaptive_variables="bias"),
            "`adaptive_variables` must be 'weights' or 'all'. Received: "
            "adaptive_variables='bias'",
        ),
        (
            lambda: keras_sam.SAMModel(base(), looksam_alpha=0.5),
            "`looksam_alpha` acts on the steps without SAM, so it needs a "
            "`switching` policy",
        ),
        (
            lambda: keras_sam.SAMModel(
                base(),
                switching=keras_sam.switching.Periodic(2),
                looksam_alpha=0.5,
                micro_batches=2,
            ),
            "`looksam_alpha` stores one direction per step and cannot be "
            "combined with micro_batches=2.",
        ),
        (
            # Refused when built, not when `fit` first matches it.
            lambda: keras_sam.SAMModel(
                base(), perturbed_variables=["kernel", "["]
            ),
            "`perturbed_variables` must hold regular expressions; '[' is "
            "not one",
        ),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_a_variable_rho_of_any_float_dtype_is_accepted(dtype):
    # A bfloat16 value is no `numbers.Real` in NumPy; it had been refused.
    model = keras_sam.SAMModel(base(), rho=keras.Variable(0.5, dtype=dtype))
    assert model.rho.dtype == dtype


def test_numpy_numbers_are_accepted_where_python_numbers_are():
    model = keras_sam.SAMModel(
        base(),
        rho=np.float64(0.1),
        eta=np.float32(0.02),
        micro_batches=np.int64(2),
        gsam_alpha=np.float32(0.5),
        adaptive=np.bool_(True),
    )
    assert model.get_config()["micro_batches"] == 2
    assert model.adaptive is True


def test_concrete_scalar_tensors_are_accepted_where_numbers_are():
    # As Keras' optimizers take a tensor learning rate.
    tensor = keras.ops.convert_to_tensor
    model = keras_sam.SAMModel(
        base(),
        rho=tensor(0.25),
        eta=tensor(0.5),
        micro_batches=tensor(2),
        adaptive=tensor(True),
    )
    config = model.get_config()
    assert (config["rho"], config["eta"], config["micro_batches"]) == (
        0.25,
        0.5,
        2,
    )
    assert model.adaptive is True
    for rho, shown in ((tensor(-1.0), "rho=-1.0"), (tensor([0.1]), "rho=")):
        with pytest.raises(ValueError, match=re.escape(shown)):
            keras_sam.SAMModel(base(), rho=rho)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="a TensorFlow variable"
)
def test_a_tensorflow_variable_rho_is_refused_not_read_once():
    import tensorflow as tf

    # It may change, as a `keras.Variable` ρ does, but the step would not
    # see it change.
    with pytest.raises(ValueError, match="a float `keras.Variable`"):
        keras_sam.SAMModel(base(), rho=tf.Variable(0.1))


def test_rho_may_come_positionally_and_defaults_to_the_options():
    assert keras_sam.SAMModel(base(), 0.2).options.rho == 0.2
    default = keras_sam.options.SAMOptions.rho
    assert keras_sam.SAMModel(base()).options.rho == default
    signature = inspect.signature(keras_sam.SAMModel)
    assert signature.parameters["rho"].default == default
