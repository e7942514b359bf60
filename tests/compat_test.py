"""Each reading of Keras internals in `keras_sam.compat` still holds."""

import os
import re

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import backend
from keras_sam import compat
from tests import backends


def test_keras_evaluates_a_learning_rate_schedule_at_the_calls():
    # Under accumulation `iterations` counts updates; the rate follows the
    # calls to `apply`, which `schedule_step` returns.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [0, 1, 2], [1.0, 2.0, 3.0, 4.0]
    )
    optimizer = keras.optimizers.SGD(schedule, gradient_accumulation_steps=2)
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer.build([variable])
    for _ in range(3):
        optimizer.apply([keras.ops.ones(2)], [variable])
    assert int(optimizer.iterations) == 1
    assert int(compat.schedule_step(optimizer)) == 3
    assert float(optimizer.learning_rate) == float(schedule(3)) == 4.0


def test_a_loss_scale_optimizer_steps_with_its_inner_optimizer():
    schedule = keras.optimizers.schedules.CosineDecay(1.0, 10)
    inner = keras.optimizers.SGD(schedule)
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    # The inner optimizer owns the rate and its step.
    assert compat.schedule_step(optimizer) is inner._iterations
    assert optimizer.learning_rate is not None
    assert float(optimizer.learning_rate) == float(schedule(0))
    # The schedule it applies, which the public `learning_rate` is not.
    assert compat.learning_rate_schedule(optimizer) is schedule
    assert compat.learning_rate_schedule(keras.optimizers.SGD(0.1)) is None


# Each test below checks (a) that a workaround in `keras_sam.compat` still
# provides its behaviour on this Keras and, where it can, (b) that Keras
# still needs it: such an assertion fails with "Keras fixed ...: remove
# compat.<name>" once Keras no longer has the defect.


def test_a_nested_stateless_scope_sees_the_enclosing_mapping():
    a = keras.Variable(np.zeros(2, "float32"))
    b = keras.Variable(np.zeros(2, "float32"))
    ones, twos = np.ones(2, "float32"), np.full(2, 2.0, "float32")
    with keras.StatelessScope(state_mapping=[(a, ones)]):
        with compat.stateless_scope([(b, twos)]):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(a.value), ones
            )
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(b.value), twos
            )
        with keras.StatelessScope(state_mapping=[(b, twos)]):
            stale = keras.ops.convert_to_numpy(a.value)
    assert np.array_equal(stale, np.zeros(2)), (
        "Keras fixed nested StatelessScope reading the enclosing mapping: "
        "remove compat.stateless_scope"
    )


class _OffsetLoss(keras.Model):
    """Overrides `compute_loss`: the compiled loss plus 1."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x, y, y_pred, sample_weight, training=training
        )
        return loss + 1.0


def test_an_uncompiled_base_computes_its_loss_with_a_lent_compiled_loss():
    base = _OffsetLoss()
    lender = keras.Sequential([keras.layers.Dense(1)])
    lender.compile(loss="mse")
    y = np.array([[1.0], [2.0]], "float32")
    y_pred = np.array([[0.0], [4.0]], "float32")
    loss = compat.compute_loss_with(base, lender, y=y, y_pred=y_pred)
    want = np.mean((y - y_pred) ** 2) + 1.0
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert base._compile_loss is None
    # Without it Keras has no loss to compute: it raises (TensorFlow,
    # PyTorch) or leaves the compiled part out (JAX).
    try:
        alone = float(base.compute_loss(y=y, y_pred=y_pred))
    except ValueError:
        alone = None
    assert alone is None or alone == 1.0, (
        "Keras now computes an uncompiled model's loss: remove "
        "compat.compute_loss_with"
    )


def test_an_untracked_variable_is_not_a_weight():
    rho = keras.Variable(0.5)
    layer = keras.layers.Layer()
    compat.set_untracked_attribute(layer, "rho", rho)
    assert layer.rho is rho
    assert layer.weights == []
    tracked = keras.layers.Layer()
    tracked.rho = rho
    assert any(w is rho for w in tracked.weights), (
        "Keras no longer tracks a variable set as an attribute: remove "
        "compat.set_untracked_attribute"
    )


def test_flatten_layers_reaches_nested_models():
    norm = keras.layers.BatchNormalization()
    inner = keras.Sequential([keras.layers.Dense(2), norm])
    outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1)])
    assert any(layer is norm for layer in compat.flatten_layers(outer))
    assert not any(layer is norm for layer in outer.layers), (
        "Keras' `model.layers` now lists nested layers: remove "
        "compat.flatten_layers"
    )


def test_rematerialized_layers_are_those_keras_may_rematerialize_whole():
    def names(mode, layer_names=None):
        with keras.RematScope(mode=mode, layer_names=layer_names):
            first = keras.layers.Dense(2, activation="relu", name="a")
            with keras.RematScope(mode=None):  # off, inside another
                second = keras.layers.Dense(1, name="b")
            model = keras.Sequential([keras.Input((3,)), first, second])
        return [layer.name for layer in compat.rematerialized_layers(model)]

    assert "a" in names("full") and "b" not in names("full")
    assert names("list_of_layers", ["a", "b"]) == ["a"]
    assert names("activations") == []
    # Whatever its size: the size at the call decides.
    assert "a" in names("larger_than")
    outside = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert compat.rematerialized_layers(outside) == []


def test_optimizer_slots_builds_as_apply_and_maps_each_variable():
    a = keras.Variable(np.zeros(2, "float32"))
    b = keras.Variable(np.zeros(3, "float32"))
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9, name="mine")
    slots = compat.optimizer_slots(
        optimizer, lambda inner: inner.momentums, [b, a]
    )
    assert optimizer.built
    assert [tuple(s.shape) for s in slots] == [(3,), (2,)]
    optimizer.apply([keras.ops.ones(2), keras.ops.full((3,), 2.0)], [a, b])
    # SGD: m ← μ m − lr g, from m = 0; each variable finds its own slot
    # also in another order than the optimizer's.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(slots[0]), np.full(3, -0.2)
    )
    got = compat.optimizer_slots(optimizer, lambda o: o.momentums, [a, b])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got[0]), np.full(2, -0.1)
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got[1]), np.full(3, -0.2)
    )
    # The same variables, paths included, as a build by `apply`.
    reference = keras.optimizers.SGD(0.1, momentum=0.9, name="mine")
    reference.apply([keras.ops.ones(3), keras.ops.ones(2)], [b, a])
    assert [v.path for v in optimizer.variables] == [
        v.path for v in reference.variables
    ]


def test_optimizer_slots_looks_through_loss_scaling():
    a = keras.Variable(np.zeros(2, "float32"))
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    (slot,) = compat.optimizer_slots(optimizer, lambda o: o.momentums, [a])
    assert slot is inner.momentums[0]


def test_public_optimizer_classes_renames_backend_classes():
    torch_sgd = {
        "module": "keras.src.backend.torch.optimizers.torch_sgd",
        "class_name": "SGD",
        "config": {"learning_rate": 0.5},
    }
    other = {"module": "keras.src.backend.torch.layers", "class_name": "X"}
    config = compat.public_optimizer_classes(
        {"optimizer": torch_sgd, "list": [torch_sgd, other]}
    )
    assert config["optimizer"]["module"] == "keras.optimizers"
    assert config["list"][0]["module"] == "keras.optimizers"
    assert config["list"][1] == other
    optimizer = keras.saving.deserialize_keras_object(config["optimizer"])
    assert type(optimizer) is type(keras.optimizers.SGD())
    assert float(optimizer.learning_rate) == 0.5
    module = keras.saving.serialize_keras_object(keras.optimizers.SGD())[
        "module"
    ]
    if backends.BACKEND == "torch":
        assert module.startswith("keras.src.backend.torch."), (
            "Keras now serializes PyTorch's SGD by its public class: remove "
            "compat.public_optimizer_classes"
        )


def test_a_single_process_is_not_multi_worker():
    assert backend.is_multi_worker() is False
    assert compat.logs_for_workers({"loss": 1.0}) == {"loss": 1.0}


@backends.tensorflow_only
def test_tf_distribute_still_has_the_private_multi_worker_query():
    from tensorflow.python.distribute import collective_all_reduce_strategy

    extended = collective_all_reduce_strategy.CollectiveAllReduceExtended
    assert callable(getattr(extended, "_in_multi_worker_mode", None))


@backends.tensorflow_only
def test_multi_worker_logs_survive_keras_reduction(monkeypatch):
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    # The reduction Keras applies to a step's logs under several workers.
    monkeypatch.setattr(
        trainer, "_collective_all_reduce_multi_worker", lambda s: True
    )
    monkeypatch.setattr(backend, "is_multi_worker", lambda s=None: True)
    strategy = tf.distribute.get_strategy()
    logs = compat.logs_for_workers({"loss": tf.constant(2.0)})
    reduced = trainer.reduce_per_replica(logs, strategy, "auto")
    assert float(np.squeeze(reduced["loss"])) == 2.0
    try:
        trainer.reduce_per_replica({"loss": tf.constant(2.0)}, strategy, "auto")
    except ValueError:
        return
    raise AssertionError(
        "Keras fixed keras-team/keras#20585 for logs: remove "
        "compat.logs_for_workers"
    )


@backends.tensorflow_only
def test_multi_worker_build_takes_one_replicas_batch(monkeypatch):
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    with strategy.scope():
        model = keras.Sequential([keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
    data = tf.data.Dataset.from_tensor_slices(
        (np.ones((4, 3), "float32"), np.ones((4, 2), "float32"))
    ).batch(4)

    def epoch_iterator():
        return [(0, 0, iter(strategy.experimental_distribute_dataset(data)))]

    reduced = []
    reduce = strategy.reduce

    def recording_reduce(*args, **kwargs):
        reduced.append(args)
        return reduce(*args, **kwargs)

    monkeypatch.setattr(strategy, "reduce", recording_reduce)
    monkeypatch.setattr(backend, "is_multi_worker", lambda s=None: True)
    compat.maybe_symbolic_build(model, iterator=epoch_iterator())
    assert model.built and model.optimizer.built
    assert not reduced
    # Keras' own build all-reduces the batch eagerly, which fails across
    # workers.
    keras.Model._maybe_symbolic_build(model, iterator=epoch_iterator())
    assert reduced, (
        "Keras no longer all-reduces the build batch (keras-team/keras"
        "#20585): remove compat.maybe_symbolic_build"
    )


@backends.tensorflow_only
def test_an_eager_model_without_a_strategy_is_built_before_its_step():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    batch = (np.ones((4, 3), "float32"), np.ones((4, 2), "float32"))
    keras.Model._maybe_symbolic_build(model, data_batch=batch)
    assert not model._compile_loss.built, (
        "Keras' TensorFlow trainer now builds the compiled loss before an "
        "eager step: remove the eager branch of compat.maybe_symbolic_build"
    )
    compat.maybe_symbolic_build(model, data_batch=batch)
    assert model._compile_loss.built and model.optimizer.built


@backends.tensorflow_only
def test_a_model_only_an_eager_call_runs_still_trains_eagerly():
    class ReadsNumPy(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x) * float(np.sign(x.numpy().sum()) or 1.0)

    base = ReadsNumPy()
    base(np.ones((1, 3), "float32"))
    model = keras_sam.SAMModel(base, rho=0.05)
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    history = model.fit(
        np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()


def test_weights_files_in_the_base_layout(tmp_path):
    import keras_sam

    def base():
        return keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2, name="dense")]
        )

    model = keras_sam.SAMModel(base(), rho=0.1)
    model.compile(optimizer="sgd", loss="mse")
    model.base.layers[0].kernel.assign(np.full((3, 2), 0.25, "float32"))
    path = str(tmp_path / "m.weights.h5")
    compat.save_weights(model, path)
    assert compat.weights_file_has_path(path, compat.SAM_STATE)
    bare = base()
    bare.load_weights(path)
    np.testing.assert_array_equal(
        np.asarray(bare.layers[0].kernel), np.full((3, 2), 0.25)
    )
    clone = keras_sam.SAMModel(base(), rho=0.1)
    clone.compile(optimizer="sgd", loss="mse")
    compat.load_weights(clone, path)
    np.testing.assert_array_equal(
        np.asarray(clone.base.layers[0].kernel), np.full((3, 2), 0.25)
    )
    # Keras' own layout nests the base's weights under the wrapper's.
    nested = str(tmp_path / "nested.weights.h5")
    keras.Model.save_weights(model, nested)
    assert compat.weights_file_has_path(nested, "base"), (
        "Keras now writes a wrapper's weights in its base's layout: remove "
        "compat.save_weights and compat.load_weights"
    )


def test_a_compiled_models_file_lends_its_optimizer_state(tmp_path):
    import keras_sam

    def base():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    plain = base()
    plain.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
    plain.fit(np.ones((4, 3)), np.ones((4, 2)), batch_size=2, verbose=0)
    path = str(tmp_path / "plain.weights.h5")
    plain.save_weights(path)
    model = keras_sam.SAMModel(base())
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    compat.load_base_weights(model, path)
    assert int(model.optimizer.iterations.numpy()) == 2
    for got, want in zip(model.optimizer.variables, plain.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # An uncompiled model's file has no optimizer state to lend.
    bare = str(tmp_path / "bare.weights.h5")
    base().save_weights(bare)
    compat.load_base_weights(model, bare)
    assert int(model.optimizer.iterations.numpy()) == 2


def test_the_loss_tracker_is_the_metric_fit_logs_as_loss():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    tracker = compat.loss_tracker(model)
    assert tracker.name == "loss" and tracker in model.metrics
    tracker.update_state(3.0)
    assert float(model.get_metrics_result()["loss"]) == 3.0


def test_layer_names_start_again_after_a_reset():
    # The trainers' checkpoints are keyed by variable path: a model built
    # again in the same process must get the same layer names.
    compat.reset_layer_names()
    first = keras.layers.Dense(1).name
    assert keras.layers.Dense(1).name == first + "_1"
    compat.reset_layer_names()
    assert keras.layers.Dense(1).name == first == "dense"


class _RefusingStep(keras.Sequential):
    def train_step(self, *args):
        raise ValueError("refused")


def test_a_refused_first_step_keeps_the_weights():
    # A SAM step refuses a summed loss split into micro-batches at trace.
    base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model = keras_sam.SAMModel(base, micro_batches=2)
    model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError("sum"))
    kernel = keras.ops.convert_to_numpy(base.layers[0].kernel)
    with pytest.raises(ValueError, match="reduction"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(base.layers[0].kernel), kernel
    )
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    assert np.all(np.isfinite(base.get_weights()[0]))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's fit")
def test_keras_jax_fit_still_loses_the_weights_of_a_refused_first_step():
    model = _RefusingStep([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="refused"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    assert model.trainable_variables[0]._value is None, (
        "Keras' JAX fit now keeps the weights when a step raises: remove "
        "compat.restoring_state_on_error"
    )


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="not on JAX")
def test_unseeded_draws_advance_the_state_stateful_variables_adds():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keras.utils.set_random_seed(0)
    state = compat.stateful_variables(model, create=True)[-1]
    assert len(compat.stateful_variables(model)) == 1
    before = keras.ops.convert_to_numpy(state.value).copy()
    keras.random.normal((1,))
    assert (keras.ops.convert_to_numpy(state.value) != before).any()


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch")
def test_random_brightness_still_brightens_its_input_in_place():
    images = keras.ops.convert_to_tensor(np.full((1, 2, 2, 1), 0.5, "float32"))
    layer = keras.layers.RandomBrightness(0.3, value_range=(0, 1), seed=3)
    layer(images, training=True)
    assert (keras.ops.convert_to_numpy(images) != 0.5).any(), (
        "Keras' RandomBrightness no longer changes its input in place on "
        "PyTorch: compat.unshared_inputs may go"
    )
    batch = compat.unshared_inputs((images, None, None))
    assert batch[0] is not images


def test_keras_batch_variance_still_has_a_wrong_hessian_on_tensorflow():
    # The variance of [1, 0, 0, 0] over its axis has the Hessian
    # (I − 11ᵀ/n)·2/n; its product with e₀ is [3/8, −1/8, −1/8, −1/8].
    # Keras' TensorFlow `ops.moments` stops the mean's gradient and gives
    # [1/2, 0, 0, 0]: when it stops doing so, remove
    # `compat.check_second_derivatives`.
    def variance(weights):
        return keras.ops.moments(weights[0], axes=[0])[1]

    x = [keras.ops.convert_to_tensor([1.0, 0.0, 0.0, 0.0])]
    e0 = [keras.ops.convert_to_tensor([1.0, 0.0, 0.0, 0.0])]
    product = backend.hessian_vector_product(variance, x, e0)[0]
    exact = [0.375, -0.125, -0.125, -0.125]
    if backends.BACKEND == "tensorflow":
        np.testing.assert_allclose(product, [0.5, 0.0, 0.0, 0.0], atol=1e-6)
    else:
        np.testing.assert_allclose(product, exact, atol=1e-6)
    bn = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization()]
    )
    compat.check_second_derivatives(bn, training=False)
    if backends.BACKEND == "tensorflow":
        with pytest.raises(ValueError, match=r"\['batch_normalization"):
            compat.check_second_derivatives(bn, training=True)
    else:
        compat.check_second_derivatives(bn, training=True)
    # Frozen, it normalizes with its moving statistics in training mode.
    bn.layers[0].trainable = False
    compat.check_second_derivatives(bn, training=True)


def test_keras_still_leaves_a_stateful_rnns_states_untracked():
    # Else `stateful_variables` would list them twice.
    model = keras.Sequential(
        [keras.Input((2, 3), batch_size=2), keras.layers.GRU(2, stateful=True)]
    )
    states = {id(s) for s in model.layers[0].states}
    assert states and not states & {id(v) for v in model.variables}


def test_keras_still_leaves_a_sub_models_trackers_out_of_its_metrics():
    # Else the wrapper would not need `own_metrics`.
    inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    inner.tracker = keras.metrics.Mean(name="tracker")
    inner.compile(loss="mse", metrics=["mae"])
    outer = keras.Sequential([inner])
    outer.compile(loss="mse")
    assert inner.tracker in inner.metrics
    assert inner.tracker not in outer.metrics
    assert compat.own_metrics(inner) == [inner.tracker]


def test_a_wrapper_built_in_its_constructor_keeps_its_state_open():
    # Keras' build locks a subclassed model's state: a subclass of
    # `SAMModel` adding a tracker after `super().__init__` on a built base
    # had been refused. When the first half fails, Keras no longer locks:
    # remove `compat.keep_state_open`.
    class Locked(keras.Model):
        def __init__(self):
            super().__init__()
            self.build((None, 2))

    with pytest.raises(ValueError, match="cannot add new elements of state"):
        Locked().extra = keras.metrics.Mean()

    class Counting(keras_sam.SAMModel):
        def __init__(self, base, **kwargs):
            super().__init__(base, **kwargs)
            self.extra = keras.metrics.Mean(name="extra")

    base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model = Counting(base)
    assert model.built and model.extra.name == "extra"


@pytest.mark.skipif(
    backends.BACKEND != "jax", reason="keras.distribution runs on JAX"
)
def test_a_variable_of_a_symbolic_build_has_its_layout_only_by_path():
    # Made in a stateless scope (JAX's symbolic build of a model at its
    # first step), a variable has no layout until it is initialized:
    # `variable_layout` asks the distribution. When the first assertion
    # fails, Keras gives it one: `_layout` alone serves.
    from tests.jax_distribution_test import columns_split

    keras.distribution.set_distribution(columns_split(".*kernel"))
    try:
        with keras.StatelessScope():
            dense = keras.layers.Dense(4)
            dense.build((None, 3))
            assert dense.kernel._layout is None
            layout = compat.variable_layout(dense.kernel)
        assert tuple(layout.axes) == (None, "model")
    finally:
        keras.distribution.set_distribution(None)


def keras_hub_image_task():
    """`tests/keras_hub_test.py`'s ResNet classifier (8x8 images) with a
    preprocessor that scales by 1/255; skips without keras-hub."""
    pytest.importorskip("keras_hub")
    from tests import keras_hub_test

    return keras_hub_test.resnet_classifier(
        preprocessor=keras_hub_test.image_preprocessor()
    )


def test_a_keras_hub_task_prepares_the_arguments_of_keras_models_method():
    # Raw images of 255s: the task's preprocessor scales them to 1.
    task = keras_hub_image_task()
    images = np.full((3, 8, 8, 3), 255, "uint8")
    prepared = compat.pipeline_arguments(
        task, "predict", {"x": images, "batch_size": 2}
    )
    batches = [keras.ops.convert_to_numpy(b) for b in prepared.pop("x")]
    assert prepared == {"batch_size": None}
    np.testing.assert_allclose(np.concatenate(batches), 1.0, rtol=1e-6)
    assert [len(b) for b in batches] == [2, 1]
    # Any other model takes its arguments as they are.
    plain = keras.Sequential([keras.layers.Dense(1)])
    arguments = {"x": images, "batch_size": 2}
    assert compat.pipeline_arguments(plain, "predict", arguments) is arguments


def test_a_new_pipeline_model_still_resets_the_bases_of_functional_tasks():
    # Why `compat.pipeline_arguments` does not initialize its stand-in:
    # `PipelineModel.__init__` resets the class's bases to `keras.Model`,
    # which Keras had changed to `Functional` for the functional tasks that
    # exist; they then have no `call`. When this fails, KerasHub no longer
    # does so, and the stand-in may be an initialized model.
    task = keras_hub_image_task()
    from keras_hub.src.utils.pipeline_model import PipelineModel

    x = np.zeros((1, 8, 8, 3), "float32")
    task(x)

    class Plain(PipelineModel):
        pass

    try:
        Plain()
        with pytest.raises(NotImplementedError, match="call"):
            task(x)
    finally:
        keras_hub_image_task()  # a functional task sets the bases back
    task(x)


def test_the_keras_pin_starts_at_the_release_compat_was_checked_against():
    # Lowering setup.py's floor admits releases whose private code the
    # overrides were not read against (3.10 to 3.14 fail the weights-file
    # tests); a newer floor means the overrides were read again, and their
    # docstrings say so. The installed Keras is one the pin admits.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "setup.py")) as f:
        (floor,) = re.findall(r'"keras>=([\d.]+),<4"', f.read())
    with open(compat.__file__) as f:
        checked = re.findall(r"Keras\s+(\d+\.\d+\.\d+)", f.read())
    assert len(checked) >= 20 and set(checked) == {floor}

    def release(version):
        return tuple(int(part) for part in version.split(".")[:3])

    assert release(floor) <= release(keras.version()) < (4,)
