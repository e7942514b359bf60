"""`keras_sam.sam_gradients` in custom loops, with and without a strategy."""

import functools
import re
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import backends
from tests import oracle
from tests.distribute_test import mirrored
from tests.sam_model_test import LR
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import N
from tests.sam_model_test import UnseededNoise
from tests.sam_model_test import batches
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent

L2 = 0.01
DOCUMENTED_RHO = 0.05


def documented_example(function=keras_sam.sam_gradients):
    match = re.search(r"```python\n(.*?)```", function.__doc__, re.DOTALL)
    return textwrap.dedent(match.group(1))


def run_documented_example(strategy):
    x, y, w0, b0 = softmax_data()
    with strategy.scope():
        model = softmax_regression(w0, b0, l2=L2)
        optimizer = sgd()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    namespace = dict(
        keras=keras,
        keras_sam=keras_sam,
        tf=tf,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        dataset=dataset,
    )
    exec(documented_example(), namespace)
    return model.get_weights(), float(namespace["loss"])


@backends.tensorflow_only
@pytest.mark.parametrize("replicas", [1, 2])
def test_documented_example_matches_the_numpy_oracle(replicas):
    strategy = mirrored() if replicas == 2 else tf.distribute.get_strategy()
    (w, b), last_loss = run_documented_example(strategy)
    x, y, w0, b0 = softmax_data()
    # Each replica computes ε from its own half of the batch; the weight
    # penalty counts once in the loss of the global batch.
    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0,
        b0,
        batches(x, y),
        DOCUMENTED_RHO,
        LR,
        MOMENTUM,
        gradient_fn=oracle.split_sam_gradient,
        parts=replicas,
        l2=L2,
    )
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, want_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last_loss, want_losses[-1], rtol=1e-5)
    sgd_w, _, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), 0.0, LR, MOMENTUM, l2=L2
    )
    assert np.abs(sgd_w - want_w).max() > 1e-4


@pytest.mark.skipif(
    backends.BACKEND != "jax",
    reason="`optimizer.stateless_apply` is not supported on TensorFlow",
)
def test_documented_stateless_example_matches_the_numpy_oracle():
    """The `stateless_sam_gradients` example under `jax.jit`."""
    import jax

    x, y, w0, b0 = softmax_data()
    model = softmax_regression(w0, b0, l2=L2)
    optimizer = sgd()
    optimizer.build(model.trainable_variables)
    namespace = dict(
        keras_sam=keras_sam,
        jax=jax,
        model=model,
        optimizer=optimizer,
        loss_fn=xent(),
    )
    exec(documented_example(keras_sam.stateless_sam_gradients), namespace)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    optimizer_variables = [v.value for v in optimizer.variables]
    losses = []
    for bx, by, _ in batches(x, y):
        loss, trainable, non_trainable, optimizer_variables = namespace[
            "train_step"
        ](trainable, non_trainable, optimizer_variables, bx, by)
        losses.append(float(loss))
    want_w, want_b, want_losses = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), DOCUMENTED_RHO, LR, MOMENTUM, l2=L2
    )
    np.testing.assert_allclose(trainable[0], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainable[1], want_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


@backends.tensorflow_only
def test_cross_replica_call_under_a_strategy_is_refused():
    x, y, w0, b0 = softmax_data()
    strategy = mirrored()
    with strategy.scope():
        model = softmax_regression(w0, b0)
        with pytest.raises(ValueError, match="inside `strategy.run"):
            keras_sam.sam_gradients(model, x, y, xent())


def softmax_probabilities(w0, b0):
    model = softmax_regression(w0, b0)
    return keras.Sequential([model, keras.layers.Softmax()])


LOSSES = {
    "name": "sparse_categorical_crossentropy",
    "keras_function": keras.losses.sparse_categorical_crossentropy,
    "function_of_two_arguments": lambda y, p: (
        keras.losses.sparse_categorical_crossentropy(y, p)
    ),
    "config": {"class_name": "SparseCategoricalCrossentropy", "config": {}},
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_keras_losses_by_name_and_function_match_the_oracle(loss, weighted):
    x, y, w0, b0 = softmax_data()
    sw = np.random.RandomState(1).uniform(0.0, 2.0, N) if weighted else None
    model = softmax_probabilities(w0, b0)
    loss, grads = keras_sam.sam_gradients(
        model, x, y, LOSSES[loss], sample_weight=sw, rho=RHO
    )
    want_loss, want = oracle.sam_gradient(w0, b0, x, y, RHO, sample_weight=sw)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@backends.tensorflow_only
def test_a_loss_function_in_a_tf_function_matches_the_oracle():
    # Its wrapper's default name had been refused as a graph name scope.
    x, y, w0, b0 = softmax_data()
    model = softmax_probabilities(w0, b0)
    loss, grads = tf.function(
        lambda x, y: keras_sam.sam_gradients(
            model, x, y, LOSSES["function_of_two_arguments"], rho=RHO
        )
    )(x, y)
    want_loss, want = oracle.sam_gradient(w0, b0, x, y, RHO)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", ["positional", "keyword", "after_args"])
def test_a_function_taking_sample_weight_is_called_with_it(form):
    # A keyword-only `sample_weight` had been given positionally: a
    # TypeError, or, after `*args`, into them, unused.
    x, y, w0, b0 = softmax_data()
    sw = np.random.RandomState(1).uniform(0.0, 2.0, N)
    seen = []

    def positional_loss_fn(y_true, y_pred, sample_weight):
        seen.append(sample_weight)
        return xent()(y_true, y_pred, sample_weight)

    def keyword_loss_fn(y_true, y_pred, *, sample_weight=None):
        return positional_loss_fn(y_true, y_pred, sample_weight)

    def after_args_loss_fn(y_true, y_pred, *args, sample_weight=None):
        return positional_loss_fn(y_true, y_pred, sample_weight)

    loss_fn = locals()[f"{form}_loss_fn"]

    _, grads = keras_sam.sam_gradients(
        softmax_regression(w0, b0), x, y, loss_fn, sample_weight=sw, rho=RHO
    )
    _, want = oracle.sam_gradient(w0, b0, x, y, RHO, sample_weight=sw)
    assert seen and all(s is not None for s in seen)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_sample_weight_bound_by_partial_is_kept():
    # It had been replaced by the `sample_weight=None` of a call without.
    x, y, w0, b0 = softmax_data()
    sw = np.random.RandomState(1).uniform(0.0, 2.0, N)

    def loss_fn(y_true, y_pred, sample_weight=None):
        return xent()(y_true, y_pred, sample_weight)

    _, grads = keras_sam.sam_gradients(
        softmax_regression(w0, b0),
        x,
        y,
        functools.partial(loss_fn, sample_weight=sw),
        rho=RHO,
    )
    _, want = oracle.sam_gradient(w0, b0, x, y, RHO, sample_weight=sw)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_loss_of_operators_gets_numpy_inputs_as_tensors():
    # As `fit` gives them (floats as floatx): PyTorch had failed on NumPy's
    # `sample_weight * loss` inside torch.
    x, y, w0, b0 = softmax_data()
    sw = np.random.RandomState(1).uniform(0.0, 2.0, N)
    seen = []

    def loss_fn(y_true, y_pred, sample_weight):
        seen.append((y_true, sample_weight))
        return keras.ops.mean(
            sample_weight
            * keras.losses.sparse_categorical_crossentropy(
                y_true, y_pred, from_logits=True
            )
        )

    model = softmax_regression(w0, b0)

    def step(x, y, sw):
        return keras_sam.sam_gradients(
            model, x, y, loss_fn, sample_weight=sw, rho=RHO
        )

    steps = [step]
    if backends.BACKEND == "tensorflow":  # float64 tensors, not NumPy
        steps.append(tf.function(step))
    want_loss, want = oracle.sam_gradient(w0, b0, x, y, RHO, sample_weight=sw)
    for step in steps:
        loss, grads = step(x, y, sw)
        assert all(keras.ops.is_tensor(t) for pair in seen for t in pair)
        dtypes = {keras.backend.standardize_dtype(w.dtype) for _, w in seen}
        assert dtypes == {"float32"}
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
        for got, expected in zip(grads, want):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_variable_rho_is_read_at_every_call():
    x, y, w0, b0 = softmax_data()
    model = softmax_regression(w0, b0)
    rho = keras.Variable(0.0, trainable=False)

    @backends.compiled
    def stateless_gradients(trainable, non_trainable):
        return keras_sam.stateless_sam_gradients(
            model, trainable, non_trainable, x, y, xent(), rho=rho
        )[1]

    def gradients():
        return stateless_gradients(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

    for value in (0.0, RHO, 0.2):
        rho.assign(value)
        _, want = oracle.sam_gradient(w0, b0, x, y, value)
        for got, expected in zip(gradients(), want):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_compiled_call_needs_the_optimizers_variables():
    # JAX had read the optimizer's step once, at trace: a ρ schedule stayed
    # at its first value, with no word.
    x, y, w0, b0 = softmax_data()
    model = softmax_regression(w0, b0)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)

    @backends.compiled
    def stateless_gradients(trainable, non_trainable):
        return keras_sam.stateless_sam_gradients(
            model,
            trainable,
            non_trainable,
            x,
            y,
            xent(),
            rho=keras.optimizers.schedules.CosineDecay(0.1, 10),
            optimizer=optimizer,
        )[1]

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    if backends.BACKEND == "torch":  # eager: the variables are read live
        stateless_gradients(trainable, non_trainable)
        return
    with pytest.raises(ValueError, match="optimizer_variables=None"):
        stateless_gradients(trainable, non_trainable)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(loss_fn="no_such_loss"), ValueError, "loss_fn='no_such_loss'"),
        (dict(loss_fn=3), TypeError, "loss_fn=3"),
        (
            dict(loss_fn=lambda y, p, sw: ops_square(p)),
            ValueError,
            "must return a scalar; it returned shape",
        ),
        (
            dict(rho=keras.optimizers.schedules.CosineDecay(0.1, 10)),
            ValueError,
            "optimizer=None",
        ),
        (dict(adaptive="yes"), ValueError, "adaptive='yes'"),
        (dict(rho=np.nan), ValueError, "rho=nan"),
        # These three had failed in an attribute lookup or the backend.
        (dict(optimizer="sgd"), TypeError, "Received: optimizer='sgd'"),
        (
            dict(optimizer=keras.optimizers.SGD),
            TypeError,
            "Received: optimizer=<class",
        ),
        (
            # The optimizer given positionally lands in `sample_weight`.
            dict(sample_weight=keras.optimizers.SGD()),
            TypeError,
            "`optimizer` is keyword-only",
        ),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(kwargs, error, message):
    x, y, w0, b0 = softmax_data()
    kwargs = {"loss_fn": xent(), **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        keras_sam.sam_gradients(softmax_regression(w0, b0), x, y, **kwargs)


@pytest.mark.parametrize("built_layers", [0, 1])
def test_an_unbuilt_model_is_refused_naming_it(built_layers):
    # Its layers made their weights in the clean pass, after the step had
    # listed the variables: TensorFlow and JAX returned no gradients for
    # them, with no error.
    x, y, _, _ = softmax_data()
    layers = [keras.layers.Dense(4), keras.layers.Dense(3)]
    for layer in layers[:built_layers]:
        layer.build(x.shape)
    model = keras.Sequential(layers, name="unbuilt")
    with pytest.raises(ValueError, match="model='unbuilt', not built"):
        keras_sam.sam_gradients(model, x, y, xent(), rho=RHO)


@pytest.mark.skipif(backends.BACKEND != "jax", reason="jax.jit")
def test_the_stateful_call_traced_by_jax_jit_is_refused():
    # It read the weights once, as constants, with no error. The stateless
    # twin may take concrete values and a traced batch.
    import jax

    x, y, w0, b0 = softmax_data()
    model = softmax_regression(w0, b0)
    step = jax.jit(lambda x: keras_sam.sam_gradients(model, x, y, xent()))
    with pytest.raises(ValueError, match="use `stateless_sam_gradients`"):
        step(x)
    # A batch closed over is concrete: the trace is told otherwise.
    closed_over = jax.jit(lambda: keras_sam.sam_gradients(model, x, y, xent()))
    with pytest.raises(ValueError, match="its variables not traced"):
        closed_over()
    weights = [v.value for v in model.trainable_variables]
    stateless_step = jax.jit(
        lambda x: keras_sam.stateless_sam_gradients(
            model, weights, [], x, y, xent(), rho=RHO
        )[1]
    )
    _, want = oracle.sam_gradient(w0, b0, x, y, RHO)
    for got, expected in zip(stateless_step(x), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_model_with_its_weights_but_never_marked_built_is_taken():
    # Weights made in `__init__`: Keras never marks such a layer built,
    # and the refusal of an unbuilt model must not take it for one.
    x, y, w0, b0 = softmax_data()

    class Affine(keras.Layer):
        def __init__(self):
            super().__init__()
            self.w = self.add_weight(w0.shape, initializer="zeros")
            self.b = self.add_weight(b0.shape, initializer="zeros")
            self.w.assign(w0)
            self.b.assign(b0)

        def call(self, inputs, training=None):
            return keras.ops.matmul(inputs, self.w) + self.b

    model = Affine()
    assert not model.built
    _, grads = keras_sam.sam_gradients(model, x, y, xent(), rho=RHO)
    _, want = oracle.sam_gradient(w0, b0, x, y, RHO)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_model_without_trainable_weights_has_no_gradients():
    # As `tape.gradient` of none gives none, on every backend (PyTorch's
    # `autograd.grad` refuses an empty list).
    x, y, w0, b0 = softmax_data()
    model = softmax_regression(w0, b0)
    model.trainable = False
    loss, grads = keras_sam.sam_gradients(model, x, y, xent(), rho=RHO)
    assert list(grads) == []
    want = xent()(y, model(x, training=True))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_a_loss_class_is_made_as_compile_makes_it():
    x, y, w0, b0 = softmax_data()
    loss_class = keras.losses.CategoricalHinge
    y_one_hot = np.eye(3, dtype="float32")[y]
    model = softmax_regression(w0, b0)
    got = keras_sam.sam_gradients(model, x, y_one_hot, loss_class, rho=RHO)
    want = keras_sam.sam_gradients(model, x, y_one_hot, loss_class(), rho=RHO)
    for a, b in zip(tree_flat(got), tree_flat(want)):
        np.testing.assert_array_equal(a, b)


def tree_flat(structure):
    return [
        keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(structure)
    ]


@pytest.mark.parametrize(
    "short", ["trainable_variables", "non_trainable_variables", "optimizer"]
)
def test_stateless_value_lists_of_the_wrong_length_are_refused(short):
    # A short list had left the rest to the variables, read once as
    # constants under `jax.jit`, with no error.
    x, y, _, _ = softmax_data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((x.shape[1],)), keras.layers.BatchNormalization()]
    )
    optimizer = sgd()
    optimizer.build(model.trainable_variables)
    values = {
        "trainable_variables": [v.value for v in model.trainable_variables],
        "non_trainable_variables": [
            v.value for v in model.non_trainable_variables
        ],
        "optimizer": [v.value for v in optimizer.variables],
    }
    values[short] = values[short][:1]
    name = "optimizer_variables" if short == "optimizer" else short
    with pytest.raises(ValueError, match=f"Received: {name} of length 1"):
        keras_sam.stateless_sam_gradients(
            model,
            values["trainable_variables"],
            values["non_trainable_variables"],
            x,
            x,
            "mse",
            optimizer=optimizer,
            optimizer_variables=values["optimizer"],
        )


def ops_square(t):
    return keras.ops.square(t)


def test_a_schedule_rho_follows_the_optimizer_step():
    x, y, w0, b0 = softmax_data()
    optimizer = keras.optimizers.SGD(0.0)
    model = softmax_regression(w0, b0)
    optimizer.build(model.trainable_variables)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [0], [RHO, 0.2]
    )
    optimizer.iterations.assign(1)
    _, grads = keras_sam.sam_gradients(
        model, x, y, xent(), rho=schedule, optimizer=optimizer
    )
    _, want = oracle.sam_gradient(w0, b0, x, y, 0.2)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    backends.BACKEND == "jax", reason="JAX refuses unseeded draws"
)
def test_unseeded_noise_is_drawn_anew_at_each_call():
    # An eager loop makes Keras' global generator before the first pass
    # (made inside it, its first advance was dropped: the same noise
    # twice); TensorFlow's loop in a tf.function traces again once made.
    noisy = keras.Sequential(
        [keras.Input((3,)), UnseededNoise(), keras.layers.Dense(2)]
    )
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")

    def step():
        return keras_sam.sam_gradients(noisy, x, y, "mse", rho=RHO)[0]

    loops = [step]
    if backends.BACKEND == "tensorflow":
        loops.append(tf.function(step))
    for loop in loops:
        keras.utils.set_random_seed(0)
        losses = [float(loop()) for _ in range(3)]
        assert len(set(losses)) == 3
