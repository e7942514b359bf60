"""SAMModel with the rest of Keras: multi-IO, metrics, optimizer options."""

import functools
import warnings

import keras
import numpy as np
import pytest

import keras_sam
from tests import backends
from tests import oracle
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import batches
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent


def two_in_two_out(outputs_as_list=False):
    keras.utils.set_random_seed(11)
    a = keras.Input((5,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Dense(8, activation="relu")(
        keras.layers.Concatenate()([a, b])
    )
    h = keras.layers.Dropout(0.2)(h)
    cls = keras.layers.Dense(3, name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    if outputs_as_list:
        # Keras names a list's outputs by their layers, cls and reg.
        return keras.Model({"a": a, "b": b}, [cls, reg])
    return keras.Model({"a": a, "b": b}, {"cls": cls, "reg": reg})


def two_in_two_out_data():
    x, y, _, _ = softmax_data()
    rng = np.random.RandomState(4)
    inputs = {"a": x, "b": rng.randn(len(x), 2).astype("float32")}
    targets = {"cls": y, "reg": rng.randn(len(x), 1).astype("float32")}
    return inputs, targets


def softmax_setup():
    x, y, w0, b0 = softmax_data()
    return softmax_regression(w0, b0), x, y


def multi_io_setup():
    inputs, targets = two_in_two_out_data()
    return two_in_two_out(), inputs, targets


def list_outputs_setup():
    inputs, targets = two_in_two_out_data()
    base = two_in_two_out(outputs_as_list=True)
    return base, inputs, [targets["cls"], targets["reg"]]


def frozen_setup():
    base, x, y = softmax_setup()
    base.trainable = False
    return base, x, y


MULTI_IO_COMPILE = dict(
    loss={"cls": xent(), "reg": "mse"},
    loss_weights={"cls": 1.0, "reg": 0.5},
    metrics={"cls": ["accuracy"], "reg": ["mae"]},
)

CONFIGS = {
    "multi_input_multi_output": (multi_io_setup, MULTI_IO_COMPILE, {}),
    # On TensorFlow without a strategy Keras builds the per-output loss
    # trackers in the first step, where they had lost that step's update.
    "multi_input_multi_output_eager": (
        multi_io_setup,
        dict(MULTI_IO_COMPILE, run_eagerly=True),
        {},
    ),
    # Losses and metrics by output name on a list of outputs, and one
    # metric on both outputs: each logged under its output's name.
    "list_outputs_named": (
        list_outputs_setup,
        dict(
            MULTI_IO_COMPILE,
            metrics={"cls": ["accuracy"], "reg": ["accuracy"]},
        ),
        {},
    ),
    "list_outputs_listed": (
        list_outputs_setup,
        dict(loss=[xent(), "mse"], metrics=[["accuracy"], ["accuracy"]]),
        {},
    ),
    # Nothing to train: Keras still logs the loss.
    "frozen_base": (
        frozen_setup,
        dict(loss=xent(), metrics=["accuracy"]),
        {},
    ),
    "steps_per_execution": (
        softmax_setup,
        dict(loss=xent(), metrics=["accuracy"], steps_per_execution=3),
        {},
    ),
    "gradient_accumulation": (
        softmax_setup,
        dict(loss=xent(), optimizer_kwargs=dict(gradient_accumulation_steps=2)),
        {},
    ),
    "clipnorm": (
        softmax_setup,
        dict(loss=xent(), optimizer_kwargs=dict(clipnorm=0.05)),
        {},
    ),
    "global_clipnorm_and_weight_decay": (
        softmax_setup,
        dict(
            loss=xent(),
            optimizer_kwargs=dict(global_clipnorm=0.05, weight_decay=0.1),
        ),
        {},
    ),
    "class_weight_and_weighted_metrics": (
        softmax_setup,
        dict(loss=xent(), weighted_metrics=["accuracy"]),
        dict(class_weight={0: 1.0, 1: 3.0, 2: 0.5}),
    ),
}


def compile_and_fit(model, x, y, compile_kwargs, fit_kwargs):
    compile_kwargs = dict(compile_kwargs)
    optimizer_kwargs = compile_kwargs.pop("optimizer_kwargs", {})
    model.compile(
        optimizer=keras.optimizers.SGD(
            LR, momentum=MOMENTUM, **optimizer_kwargs
        ),
        **compile_kwargs,
    )
    return model.fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, **fit_kwargs
    )


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(name, marks=backends.needs_steps_per_execution)
        if name == "steps_per_execution"
        else name
        for name in CONFIGS
    ],
)
def test_rho_zero_reproduces_plain_fit_bitwise(config):
    setup, compile_kwargs, fit_kwargs = CONFIGS[config]
    base, x, y = setup()
    plain_history = compile_and_fit(base, x, y, compile_kwargs, fit_kwargs)
    assert plain_history.history["loss"][0] > 0
    plain_weights = [v.numpy() for v in base.variables]

    base, x, y = setup()
    model = keras_sam.SAMModel(base, rho=0.0)
    sam_history = compile_and_fit(model, x, y, compile_kwargs, fit_kwargs)

    assert sam_history.history == plain_history.history
    for want, got in zip(plain_weights, base.variables):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("setup", [multi_io_setup, list_outputs_setup])
def test_multi_output_logs_every_output_loss_and_metric(setup):
    base, x, y = setup()
    model = keras_sam.SAMModel(base, rho=RHO)
    history = compile_and_fit(model, x, y, MULTI_IO_COMPILE, {})
    logs = history.history
    assert set(logs) >= {"loss", "cls_loss", "reg_loss", "cls_accuracy"}
    for name in ("cls_loss", "reg_loss", "reg_mae"):
        assert np.all(np.array(logs[name]) > 0), name
    np.testing.assert_allclose(
        logs["loss"],
        np.add(logs["cls_loss"], 0.5 * np.array(logs["reg_loss"])),
        rtol=1e-5,
    )


@backends.needs_steps_per_execution
def test_steps_per_execution_does_not_change_sam_steps():
    results = []
    for steps in (1, 3):
        base, x, y = softmax_setup()
        model = keras_sam.SAMModel(base, rho=RHO)
        model.compile(optimizer=sgd(), loss=xent(), steps_per_execution=steps)
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        results.append(base.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_class_weight_is_the_oracle_with_per_example_weights():
    class_weight = {0: 1.0, 1: 3.0, 2: 0.5}
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(
        x,
        y,
        class_weight=class_weight,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
    )
    sw = np.array([class_weight[int(c)] for c in y])
    want_w, want_b, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y, sw), RHO, LR, MOMENTUM
    )
    np.testing.assert_allclose(model.base.get_weights()[0], want_w, rtol=1e-5)
    np.testing.assert_allclose(model.base.get_weights()[1], want_b, rtol=1e-5)


ACTIVITY_L2 = 0.3


def tanh_network(activity_l2):
    """Dense(5, tanh) → Dense(3); an L2 activity regularizer on the hidden
    layer if `activity_l2`, else the hidden layer as a second output."""
    keras.utils.set_random_seed(5)
    hidden_layer = keras.layers.Dense(
        5,
        activation="tanh",
        activity_regularizer=(
            keras.regularizers.L2(activity_l2) if activity_l2 else None
        ),
    )
    inputs = keras.Input((softmax_data()[0].shape[1],))
    hidden = hidden_layer(inputs)
    logits = keras.layers.Dense(3)(hidden)
    return keras.Model(inputs, logits if activity_l2 else [logits, hidden])


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_an_activity_regularizer_is_taken_at_w_plus_eps(mode):
    # Keras adds it in the layer's call (`add_loss`), so it must be
    # collected inside each pass, at the weights that pass hands in.
    x, y, _, _ = softmax_data()
    model = tanh_network(ACTIVITY_L2)
    sam = keras_sam.SAMModel(model, rho=RHO)
    sam.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=xent(),
        run_eagerly=mode == "eager",
        jit_compile=mode == "jit",
    )
    sam.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)

    def loss_with_the_penalty(y_true, outputs):
        logits, hidden = outputs
        # Keras divides an activity penalty by the batch size.
        penalty = ACTIVITY_L2 * keras.ops.sum(hidden**2) / BATCH
        return xent()(y_true, logits) + penalty

    want = backends.train_by_hand_sam(
        tanh_network(None), loss_with_the_penalty, x, y, BATCH, RHO, LR
    )
    for got, expected in zip(model.get_weights(), want.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_frozen_base_logs_its_loss_and_keeps_its_weights():
    base, x, y = frozen_setup()
    weights = base.get_weights()
    model = keras_sam.SAMModel(base, rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    with pytest.warns(UserWarning, match="does not have any trainable"):
        logs = model.fit(x, y, batch_size=len(x), verbose=0).history
    # The mean cross-entropy at the initial weights, from NumPy.
    w, b = weights
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want = -np.mean(log_p[np.arange(len(y)), y])
    np.testing.assert_allclose(logs["loss"][0], want, rtol=1e-5)
    for got, initial in zip(base.get_weights(), weights):
        np.testing.assert_array_equal(got, initial)


class ProbabilityClassifier(keras.Model):
    """A subclassed classifier whose `predict_step` returns probabilities
    (as KerasHub's detectors decode boxes)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x, training=None):
        return self.dense(x)

    def predict_step(self, *args):
        output = super().predict_step(*args)
        if isinstance(output, tuple):  # JAX's (outputs, state)
            return keras.ops.softmax(output[0]), output[1]
        return keras.ops.softmax(output)


def test_predict_goes_through_the_bases_predict_step():
    # SAMModel's predict had returned the base's raw outputs.
    x, y, w0, b0 = softmax_data()
    base = ProbabilityClassifier()
    base(x[:1])
    base.set_weights([w0, b0])
    model = keras_sam.SAMModel(base, rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=BATCH, verbose=0)
    logits = x @ base.get_weights()[0] + base.get_weights()[1]
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model.predict_on_batch(x[:4])),
        want[:4],
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "method, refused",
    [
        ("train_step", ("fit",)),
        ("test_step", ("evaluate",)),
        ("compute_metrics", ("fit", "evaluate")),
        # JAX's steps reach the loss through these: they had been ignored.
        # The other trainers call neither, in a plain fit too.
        *[
            (hook, ("fit", "evaluate") if backends.BACKEND == "jax" else ())
            for hook in ("compute_loss_and_updates", "stateless_compute_loss")
        ],
    ],
)
def test_a_base_overriding_a_replaced_step_is_refused(method, refused):
    # The override had been ignored, with no word. The model is still
    # made (a saved one loads) and predicts.
    def step(self, *args, **kwargs):
        return getattr(keras.Model, method)(self, *args, **kwargs)

    custom = type("Custom", (keras.Sequential,), {method: step})
    base = custom([keras.Input((2,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(base)
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    assert model.predict(x, verbose=0).shape == (4, 1)
    for name in ("fit", "evaluate"):
        if name in refused:
            with pytest.raises(ValueError, match=f"overrides `{method}`"):
                getattr(model, name)(x, y, verbose=0)
        else:
            getattr(model, name)(x, y, verbose=0)


@pytest.mark.parametrize(
    "validation",
    [dict(validation_split=0.5), "validation_data"],
)
def test_a_replaced_test_step_is_refused_before_fit_trains(validation):
    # It had been refused at the first validation, after an epoch.
    class Custom(keras.Sequential):
        def test_step(self, *args):
            return super().test_step(*args)

    base = Custom([keras.Input((2,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(base)
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 2), "float32"), np.ones((4, 1), "float32")
    if validation == "validation_data":
        validation = dict(validation_data=(x, y))
    before = base.get_weights()
    with pytest.raises(ValueError, match="overrides `test_step`"):
        model.fit(x, y, verbose=0, **validation)
    for now, then in zip(base.get_weights(), before):
        np.testing.assert_array_equal(now, then)
    model.fit(x, y, verbose=0)  # without validation it trains


def stateful_lstm():
    keras.utils.set_random_seed(5)
    return keras.Sequential(
        [
            keras.Input((4, 3), batch_size=4),
            keras.layers.LSTM(5, stateful=True),
            keras.layers.Dense(2),
        ]
    )


def lstm_data():
    rng = np.random.RandomState(8)
    return rng.randn(8, 4, 3).astype("float32"), rng.randint(0, 2, 8)


def lstm_states(model):
    return [np.array(s) for s in model.layers[0].states]


@pytest.mark.skipif(
    backends.BACKEND == "torch",
    reason="Keras' own fit of a stateful LSTM fails on PyTorch (in place)",
)
def test_a_stateful_rnn_at_rho_zero_is_bitwise_a_plain_fit():
    # TensorFlow carries the states from batch to batch, Keras' JAX
    # trainer drops them; SAM does as each does. On TensorFlow SAM had
    # reset them at every batch.
    x, y = lstm_data()
    results = []
    for wrap in (lambda m: m, lambda m: keras_sam.SAMModel(m, rho=0.0)):
        model = wrap(stateful_lstm())
        model.compile(optimizer=sgd(), loss=xent())
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        base = getattr(model, "base", model)
        results.append(base.get_weights() + lstm_states(base))
    for plain, sam in zip(*results):
        np.testing.assert_array_equal(plain, sam)


@pytest.mark.skipif(
    backends.BACKEND == "jax",
    reason="Keras' JAX trainer drops the states of a stateful RNN",
)
def test_a_stateful_rnn_keeps_the_clean_pass_states():
    x, y = lstm_data()
    reference = stateful_lstm()
    reference(x[:4], training=True)  # a forward pass at w assigns them
    model = keras_sam.SAMModel(stateful_lstm(), rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x[:4], y[:4], batch_size=4, shuffle=False, verbose=0)
    for got, want in zip(lstm_states(model.base), lstm_states(reference)):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def distiller():
    from keras.distillation import Distiller
    from keras.distillation import LogitsDistillation

    def mlp(units, seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [
                keras.Input((softmax_data()[0].shape[1],)),
                keras.layers.Dense(units, activation="relu"),
                keras.layers.Dense(3),
            ]
        )

    return Distiller(
        teacher=mlp(16, 1),
        student=mlp(4, 2),
        distillation_losses=LogitsDistillation(temperature=2.0),
        student_loss_weight=0.5,
    )


def test_keras_distiller_is_compiled_first_then_trains_as_a_plain_fit(
    tmp_path,
):
    # Its `compute_loss` reads what its own `compile` sets: uncompiled, it
    # had failed with "'Distiller' object has no attribute '_student_loss'".
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(distiller(), rho=RHO)
    model.compile(optimizer=sgd(), loss=xent())
    refused = "_student_loss.*Compile it with its own arguments.*Distiller"
    with pytest.raises(ValueError, match=refused):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    # Loading does not call the base's own `compile` either.
    model.base.compile(optimizer=sgd(), loss=xent())
    model.save(tmp_path / "distiller.keras")
    loaded = keras.saving.load_model(tmp_path / "distiller.keras")
    with pytest.raises(ValueError, match=refused):
        loaded.evaluate(x, y, verbose=0)
    students = []
    for wrap in (lambda m: m, lambda m: keras_sam.SAMModel(m, rho=0.0)):
        base = distiller()
        base.compile(optimizer=sgd(), loss=xent())
        model = wrap(base)
        if model is not base:
            model.compile(optimizer=sgd(), loss=xent())
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        students.append(base.student.get_weights())
    for plain, sam in zip(*students):
        np.testing.assert_array_equal(plain, sam)


class LossTracking(keras.Model):
    """A base whose `compute_loss` updates its own tracker, as Keras'
    guide to customizing `fit` writes it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)
        self.doubled = keras.metrics.Mean(name="doubled_loss")

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        loss = super().compute_loss(x, y, y_pred, sample_weight)
        self.doubled.update_state(2 * loss)
        return loss


def test_the_bases_own_trackers_are_logged_as_in_a_plain_fit():
    # Keras leaves a sub-model's metrics out of the outer model's: fit and
    # evaluate had neither updated nor logged them.
    x, y, _, _ = softmax_data()
    logs = []
    for wrap in (
        lambda m: m,
        lambda m: keras_sam.SAMModel(m, rho=0.0),
        lambda m: keras_sam.SAMModel(m, rho=RHO),
    ):
        keras.utils.set_random_seed(4)
        model = wrap(LossTracking())
        model.compile(optimizer=sgd(), loss=xent())
        history = model.fit(
            x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
        )
        logs.append((history.history, model.evaluate(x, y, verbose=0)))
    (plain, plain_eval), (rho_zero, rho_zero_eval), (sam, sam_eval) = logs
    assert rho_zero == plain and rho_zero_eval == plain_eval
    # The clean pass's loss only: the tracker's mean is twice the loss's.
    np.testing.assert_allclose(
        sam["doubled_loss"], 2 * np.array(sam["loss"]), rtol=1e-6
    )
    np.testing.assert_allclose(sam_eval[1], 2 * sam_eval[0], rtol=1e-6)


def _fit_warnings(base, loss):
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(base, rho=0.05)
    model.compile(optimizer=sgd(), loss=loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
    return [str(w.message) for w in caught if "not used" in str(w.message)]


def test_a_loss_that_the_compiled_base_would_not_use_is_warned_of():
    # Its `super().compute_loss` computes the base's own compiled loss.
    summed = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )
    overriding = LossTracking()
    overriding.compile(loss=xent())
    (message,) = _fit_warnings(overriding, summed)
    assert "'reduction': 'sum'" in message.split("base=")[0]
    assert message.split("base=")[1].startswith(
        f"{overriding.name!r} compiled with loss="
    )
    assert "'reduction': 'sum_over_batch_size'" in message.split("base=")[1]
    assert not _fit_warnings(overriding, xent())  # the same loss
    plain = softmax_regression(*softmax_data()[2:])
    plain.compile(loss=xent())  # SAMModel's loss is used: nothing to warn
    assert not _fit_warnings(plain, summed)
    assert not _fit_warnings(LossTracking(), summed)  # uncompiled
    # Losses that do not serialize are compared as objects.
    partial = functools.partial(
        keras.losses.sparse_categorical_crossentropy, from_logits=True
    )
    overriding.compile(loss=partial)
    assert not _fit_warnings(overriding, partial)
    (message,) = _fit_warnings(overriding, xent())
    assert message.endswith(f"compiled with loss={partial!r}")


class TwoHeadsTracking(LossTracking):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.other = keras.layers.Dense(1)

    def call(self, x):
        return {"a": self.dense(x), "b": self.other(x)}


def test_a_compiled_bases_loss_logs_its_outputs_losses_as_a_plain_fit():
    # Compiled first, the base's own compiled loss computes the objective
    # and updates its per-output trackers; they had been left out.
    x, y, _, _ = softmax_data()
    targets = {"a": y, "b": x[:, :1]}
    settings = dict(loss={"a": xent(), "b": "mse"}, metrics={"a": ["accuracy"]})
    logs = []
    for rho in (None, 0.0):
        keras.utils.set_random_seed(4)
        model = base = TwoHeadsTracking()
        base.compile(optimizer=sgd(), **settings)
        if rho is not None:
            model = keras_sam.SAMModel(base, rho=rho)
            model.compile(optimizer=sgd(), **settings)
        history = model.fit(
            x, targets, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
        )
        logs.append(
            (history.history, model.evaluate(x, targets, return_dict=True))
        )
    assert logs[1] == logs[0]
    assert {"a_loss", "b_loss", "a_accuracy", "doubled_loss"} <= set(logs[0][0])
