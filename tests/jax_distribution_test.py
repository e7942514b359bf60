"""SAMModel under `keras.distribution.DataParallel` on two JAX CPU devices.

The same NumPy oracles as the MirroredStrategy tests (distribute_test.py):
each device perturbs with the gradient of its own half of the batch, or,
with `sync_perturbations=True`, every device with that of the global batch.
conftest.py sets `XLA_FLAGS=--xla_force_host_platform_device_count=2`.
"""

import re

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam.backend import common
from tests.backends import BACKEND
from tests.sam_model_test import LR
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import D
from tests.sam_model_test import assert_one_epoch_matches_the_oracle
from tests.sam_model_test import bn_dropout_model
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent

pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution runs on the JAX backend"
)

BATCH = 8  # Global batch: 4 examples per device.


def data_parallel():
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) >= 2, "conftest.py must create two JAX CPU devices"
    return keras.distribution.DataParallel(devices=devices[:2])


def fit(distribution, jit_compile=True, loss=None, **sam_kwargs):
    x, y, w0, b0 = softmax_data()
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        model = keras_sam.SAMModel(softmax_regression(w0, b0), **sam_kwargs)
        model.compile(
            optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
            loss=loss or xent(),
            jit_compile=jit_compile,
        )
        history = model.fit(
            x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
        )
    finally:
        keras.distribution.set_distribution(previous)
    return model.base.get_weights(), history.history["loss"][0]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_each_device_perturbs_with_its_own_half_batch(jit_compile):
    weights, _ = fit(data_parallel(), jit_compile=jit_compile, rho=RHO)
    assert_one_epoch_matches_the_oracle(weights, parts=2)


def test_sync_perturbations_matches_the_full_batch_oracle():
    weights, loss = fit(data_parallel(), rho=RHO, sync_perturbations=True)
    assert_one_epoch_matches_the_oracle(weights, loss=loss)


def test_micro_batches_split_each_devices_shard():
    weights, _ = fit(data_parallel(), rho=RHO, micro_batches=2)
    assert_one_epoch_matches_the_oracle(weights, parts=4)


def test_reported_loss_is_the_global_batch_loss():
    _, distributed_loss = fit(data_parallel(), rho=RHO)
    _, single_loss = fit(None, rho=RHO, micro_batches=2)
    np.testing.assert_allclose(distributed_loss, single_loss, rtol=1e-6)


def test_a_summed_loss_needs_one_epsilon_for_the_global_batch():
    # Each shard's loss would count for half: a "sum" must stay whole.
    summed = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )
    with pytest.raises(ValueError, match="'sum'.* on 2 data shard"):
        fit(data_parallel(), rho=RHO, loss=summed)
    fit(data_parallel(), rho=RHO, loss=summed, sync_perturbations=True)


@pytest.mark.parametrize(
    "variant, sam_kwargs",
    [
        (
            "looksam_alpha",
            dict(looksam_alpha=0.7, switching=keras_sam.switching.Periodic(2)),
        ),
        ("perturbation='friendly'", dict(perturbation="friendly")),
    ],
    ids=["looksam", "friendly"],
)
def test_one_state_per_step_needs_one_epsilon_for_the_global_batch(
    variant, sam_kwargs
):
    # One direction (or average) per model: with a ε per shard, LookSAM
    # had kept the last shard's direction.
    message = re.escape(f"`{variant}` keeps one state") + ".*: 2 data shards"
    with pytest.raises(ValueError, match=message):
        fit(data_parallel(), rho=RHO, **sam_kwargs)
    fit(data_parallel(), rho=RHO, sync_perturbations=True, **sam_kwargs)


def test_the_weights_are_replicated_over_both_devices():
    x, y, w0, b0 = softmax_data()
    keras.distribution.set_distribution(data_parallel())
    try:
        model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=RHO)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        devices = model.base.trainable_variables[0].value.devices()
    finally:
        keras.distribution.set_distribution(None)
    assert len(devices) == 2


def columns_split(path):
    """`ModelParallel` on a (batch=1, model=2) mesh that splits the
    columns of the variables whose path matches `path` over "model"."""
    devices = keras.distribution.list_devices("cpu")[:2]
    layout_map = keras.distribution.LayoutMap(
        keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    )
    layout_map[path] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map)


@pytest.mark.parametrize("built", [True, False])
def test_a_variants_state_is_split_as_its_variable(built):
    # A base built in the first step's symbolic build has variables not
    # yet initialized, without a layout: F-SAM's average of its split
    # kernel had been whole on each device.
    x, y, _, _ = softmax_data()
    keras.distribution.set_distribution(columns_split(".*hidden/kernel"))
    try:
        inputs = [keras.Input((D,))] if built else []
        base = keras.Sequential(
            inputs
            + [keras.layers.Dense(4, name="hidden"), keras.layers.Dense(3)]
        )
        model = keras_sam.SAMModel(base, rho=RHO, perturbation="friendly")
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    finally:
        keras.distribution.set_distribution(None)
    kernel = base.get_layer("hidden").kernel
    (average,) = [v for v in model.variables if v.name == "friendly_average_0"]
    assert tuple(kernel.value.sharding.spec) == (None, "model")
    assert average.value.sharding.spec == kernel.value.sharding.spec


class Never(keras_sam.switching.SwitchingPolicy):
    """Declines every SAM step, deciding with or without the gradient."""

    def __init__(self, needs_gradient_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.needs_gradient_norm = needs_gradient_norm

    def call(self, step, squared_gradient_norm=None):
        return keras.ops.convert_to_tensor(False)


def bn_model():
    """`bn_dropout_model` without its Dropout layer."""
    return keras.Sequential(
        [
            layer
            for layer in bn_dropout_model().layers
            if not isinstance(layer, keras.layers.Dropout)
        ]
    )


def fit_batchnorm(distribution, dropout=True, **sam_kwargs):
    """The variables of `bn_dropout_model` (with its Dropout layer, or
    without) after two epochs; a plain fit without `sam_kwargs`."""
    x, y, _, _ = softmax_data()
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        base = bn_dropout_model() if dropout else bn_model()
        model = keras_sam.SAMModel(base, **sam_kwargs) if sam_kwargs else base
        model.compile(
            optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
            loss=xent(),
            jit_compile=True,
        )
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        return [v.numpy() for v in base.variables]
    finally:
        keras.distribution.set_distribution(previous)


@pytest.mark.parametrize(
    "sam_kwargs",
    [
        {"rho": 0.0},
        {"rho": 0.0, "micro_batches": 2},
        {"rho": "variable"},
        {"rho": RHO, "switching": "never"},
        {"rho": RHO, "switching": "never_by_norm"},
    ],
    ids=["rho0", "rho0_micro", "rho_variable0", "declined", "declined_norm"],
)
def test_a_step_without_sam_is_the_plain_fit_with_batchnorm(sam_kwargs):
    # Keras' own step normalizes over the global batch; so must every
    # step that takes no SAM step, whatever splits a SAM step would make.
    sam_kwargs = dict(sam_kwargs)
    if sam_kwargs["rho"] == "variable":
        sam_kwargs["rho"] = keras.Variable(0.0, trainable=False)
    if "switching" in sam_kwargs:
        by_norm = sam_kwargs["switching"] == "never_by_norm"
        sam_kwargs["switching"] = Never(needs_gradient_norm=by_norm)
    plain = fit_batchnorm(data_parallel())
    sam = fit_batchnorm(data_parallel(), **sam_kwargs)
    for want, got in zip(plain, sam):
        np.testing.assert_array_equal(got, want)


def test_a_sam_step_normalizes_batchnorm_over_each_devices_shard():
    # As each tf.distribute replica does: the same numbers as one device
    # splitting the batch into two micro-batches, and not the global batch.
    # Without Dropout: each shard draws its own masks, not a micro-batch's.
    distributed = fit_batchnorm(data_parallel(), False, rho=RHO)
    split = fit_batchnorm(None, False, rho=RHO, micro_batches=2)
    whole = fit_batchnorm(
        data_parallel(), False, rho=RHO, sync_perturbations=True
    )
    for got, want, other in zip(distributed, split, whole):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max(np.abs(d - w).max() for d, w in zip(distributed, whole)) > 1e-3


@pytest.mark.parametrize("jit", [True, False])
def test_each_shard_draws_its_own_dropout_masks_in_both_passes(jit):
    # y_pred = dropout(x) W with an invertible W gives the clean passes'
    # dropped inputs z = y_pred W⁻¹. The loss Σ y⊙y_pred / n is linear in
    # W, so the mean of the shards' gradients at their w + ε is zᵀy / n
    # only if each shard's perturbed pass drops what its clean pass did.
    # The two shards' masks differ, and the seed advances as in one step.
    n = 64
    rng = np.random.RandomState(0)
    x = rng.randn(n, D).astype("float32")
    y = rng.randn(n, D).astype("float32")
    kernel = (np.eye(D) + 0.1 * rng.randn(D, D)).astype("float32")
    previous = keras.distribution.distribution()
    distribution = data_parallel()
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((D,)),
                keras.layers.Dropout(0.5),
                keras.layers.Dense(D, use_bias=False),
            ]
        )
        model.set_weights([kernel])
        (seed,) = model.non_trainable_variables
        seed_before = seed.numpy()

        def step(x, y):
            result = keras_sam.sam_step.compute_sam_gradients(
                model,
                lambda x, y, y_pred, sample_weight: keras.ops.mean(
                    keras.ops.sum(y * y_pred, axis=-1)
                ),
                x,
                y,
                rho=RHO,
            )
            return result.y_pred, result.gradients[0]

        if jit:
            import jax

            def stateless(trainable, non_trainable, x, y):
                return common.run_stateless(
                    lambda: step(x, y),
                    [model.trainable_variables, [seed]],
                    [trainable, non_trainable],
                )

            rows = jax.sharding.NamedSharding(
                distribution.device_mesh.backend_mesh,
                jax.sharding.PartitionSpec("batch"),
            )
            (y_pred, gradient), (_, (seed_after,)) = jax.jit(stateless)(
                [kernel],
                [seed.value],
                jax.device_put(x, rows),
                jax.device_put(y, rows),
            )
        else:
            y_pred, gradient = step(x, y)
            seed_after = seed.value
    finally:
        keras.distribution.set_distribution(previous)
    z = keras.ops.convert_to_numpy(y_pred) @ np.linalg.inv(kernel)
    dropped = np.abs(z) < 1e-4
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(z[~dropped], 2 * x[~dropped], rtol=1e-3)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(gradient), z.T @ y / n, rtol=1e-3, atol=1e-4
    )
    assert (dropped[: n // 2] != dropped[n // 2 :]).mean() > 0.3
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(seed_after), seed_before + [0, 1]
    )


def fit_weighted(distribution, mixed=False, **sam_kwargs):
    """`bn_dropout_model` without Dropout, with sample weights and an
    accuracy metric, after two epochs: its variables and its logs. The
    callables among `sam_kwargs` (switching policies) are called inside
    the distribution, where their variables must live."""
    x, y, _, _ = softmax_data()
    weights = np.random.default_rng(0).uniform(0.2, 1.5, len(x))
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        base = bn_model()
        sam_kwargs = {
            k: v() if callable(v) else v for k, v in sam_kwargs.items()
        }
        model = keras_sam.SAMModel(base, **sam_kwargs)
        optimizer = keras.optimizers.SGD(LR, momentum=MOMENTUM)
        if mixed:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(
            optimizer=optimizer,
            loss=xent(),
            metrics=["accuracy"],
            jit_compile=True,
        )
        history = model.fit(
            x,
            y,
            sample_weight=weights,
            batch_size=BATCH,
            epochs=2,
            shuffle=False,
            verbose=0,
        )
        return [v.numpy() for v in base.variables], history.history
    finally:
        keras.distribution.set_distribution(previous)
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(
    "mixed, sam_kwargs",
    [
        (False, dict(switching=lambda: keras_sam.switching.Periodic(2))),
        (
            False,
            dict(switching=lambda: keras_sam.switching.GradientNormOutlier()),
        ),
        (False, dict(adaptive=True)),
        (True, {}),
    ],
    ids=["periodic", "ae_sam", "asam", "mixed_float16"],
)
def test_shards_step_as_one_devices_micro_batches(mixed, sam_kwargs):
    # The shards' steps, vmapped, against the same step written as a loop
    # over micro-batches on one device: switching policies deciding under
    # `cond`, loss scaling, sample weights, BatchNorm and the logged loss
    # and metric.
    distributed, logs = fit_weighted(
        data_parallel(), mixed, rho=RHO, **sam_kwargs
    )
    split, split_logs = fit_weighted(
        None, mixed, rho=RHO, micro_batches=2, **sam_kwargs
    )
    for got, want in zip(distributed, split):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(logs[key], split_logs[key], rtol=1e-5)
    synced, _ = fit_weighted(
        data_parallel(), mixed, rho=RHO, sync_perturbations=True, **sam_kwargs
    )
    assert max(np.abs(d - s).max() for d, s in zip(distributed, synced)) > 1e-4
