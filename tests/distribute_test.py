"""SAMModel under MirroredStrategy on two logical CPUs (see conftest.py)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from keras_sam import selection
from keras_sam import switching
from tests import backends
from tests.sam_model_test import LR
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import N
from tests.sam_model_test import assert_one_epoch_matches_the_oracle
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent

# tf.distribute; jax_distribution_test.py covers keras.distribution.
pytestmark = backends.tensorflow_only

BATCH = 8  # Global batch: 4 examples per replica.


@functools.cache
def mirrored():
    # One strategy per process: collective ops of several MirroredStrategy
    # instances in one process can collide on their instance keys.
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "conftest.py must create two logical CPUs"
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


@functools.cache
def one_replica():
    return tf.distribute.MirroredStrategy(
        [tf.config.list_logical_devices("CPU")[0].name]
    )


def assert_two_replicas_match_one_device(
    make_model, make_optimizer, loss, data, batch, epochs
):
    """`make_model()` compiled without XLA and fitted on `data` under a
    two-replica MirroredStrategy ends with the base weights it has on one
    device."""
    x, y = data
    weights = []
    for strategy in (mirrored(), tf.distribute.get_strategy()):
        with strategy.scope():
            model = make_model()
            model.compile(make_optimizer(), loss=loss, jit_compile=False)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        model.fit(dataset.repeat(epochs), verbose=0)
        weights.append(model.base.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def fitted(strategy, epochs=1, make_switching=None, **sam_kwargs):
    """The SAM softmax regression fitted under `strategy`, and its logs."""
    x, y, w0, b0 = softmax_data()
    with strategy.scope():
        if make_switching:  # in the scope, as the policy's statistics must
            sam_kwargs["switching"] = make_switching()
        model = keras_sam.SAMModel(softmax_regression(w0, b0), **sam_kwargs)
        model.compile(
            optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
            loss=xent(),
            jit_compile=False,
        )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    return model, model.fit(dataset, epochs=epochs, verbose=0).history


def fit(strategy, **sam_kwargs):
    model, history = fitted(strategy, **sam_kwargs)
    return model.base.get_weights(), history["loss"][0]


def test_each_replica_perturbs_with_its_own_half_batch():
    weights, _ = fit(mirrored(), rho=RHO)
    assert_one_epoch_matches_the_oracle(weights, parts=2)


def test_sync_perturbations_matches_the_full_batch_oracle():
    weights, loss = fit(mirrored(), rho=RHO, sync_perturbations=True)
    assert_one_epoch_matches_the_oracle(weights, loss=loss)


def test_central_storage_replicas_perturb_with_their_own_half_batch():
    # One copy of each variable, the replicas' gradients all-reduced into
    # it: the step is MirroredStrategy's (Keras' logged metrics are not).
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    strategy = tf.distribute.experimental.CentralStorageStrategy(devices)
    assert_one_epoch_matches_the_oracle(fit(strategy, rho=RHO)[0], parts=2)


def test_a_one_device_strategy_is_bitwise_no_strategy():
    device = tf.config.list_logical_devices("CPU")[0].name
    got = fit(tf.distribute.OneDeviceStrategy(device), rho=RHO)
    want = fit(tf.distribute.get_strategy(), rho=RHO)
    for a, b in zip(got[0] + [got[1]], want[0] + [want[1]]):
        np.testing.assert_array_equal(a, b)


def test_reported_loss_equals_the_single_device_loss():
    strategy_weights, strategy_loss = fit(
        mirrored(), rho=RHO, sync_perturbations=True
    )
    single_weights, single_loss = fit(
        tf.distribute.get_strategy(), rho=RHO, sync_perturbations=True
    )
    np.testing.assert_allclose(strategy_loss, single_loss, rtol=1e-5)
    for a, b in zip(strategy_weights, single_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_replicas_equal_two_micro_batches_on_one_device():
    replicas, _ = fit(mirrored(), rho=RHO)
    micro, _ = fit(tf.distribute.get_strategy(), rho=RHO, micro_batches=2)
    for a, b in zip(replicas, micro):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ae_sam_on_two_replicas_decides_as_on_one_device():
    # AE-SAM's ‖g‖² is the global batch's on every replica, as one device
    # with two micro-batches (and JAX's sharded step) computes it.
    def ae_sam(strategy, **sam_kwargs):
        model, history = fitted(
            strategy,
            epochs=2,
            rho=RHO,
            make_switching=lambda: switching.GradientNormOutlier(0.5, 0.0),
            **sam_kwargs,
        )
        policy = [v.numpy() for v in model.switching.weights]
        return model.base.get_weights(), policy, history

    replicas = ae_sam(mirrored())
    micro = ae_sam(tf.distribute.get_strategy(), micro_batches=2)
    assert 0 < replicas[2]["sam_fraction"][-1] < 1
    for got, want in zip(replicas[0] + replicas[1], micro[0] + micro[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert replicas[2]["sam_fraction"] == micro[2]["sam_fraction"]


def test_ae_sam_with_one_perturbation_all_reduces_the_clean_gradient_once(
    monkeypatch,
):
    # `sync_perturbations` sums the clean gradient across the replicas for
    # ε; AE-SAM's ‖g‖² reuses that sum's norm instead of a second sum.
    reductions = []
    reduce = keras_sam.backend.all_reduce
    monkeypatch.setattr(
        keras_sam.backend,
        "all_reduce",
        lambda tensors, op="sum": reductions.append(op) or reduce(tensors, op),
    )
    outcomes = []
    for strategy in (mirrored(), tf.distribute.get_strategy()):
        reductions.clear()
        model, history = fitted(
            strategy,
            epochs=2,
            rho=RHO,
            sync_perturbations=True,
            make_switching=lambda: switching.GradientNormOutlier(0.5, 0.0),
        )
        policy = [v.numpy() for v in model.switching.weights]
        outcomes.append((model.base.get_weights() + policy, history))
        if strategy is mirrored():
            # The step is traced once, in each replica's thread.
            assert reductions == ["sum", "sum"]
    (replicas, replicas_history), (one, one_history) = outcomes
    assert 0 < replicas_history["sam_fraction"][-1] < 1
    assert replicas_history["sam_fraction"] == one_history["sam_fraction"]
    for got, want in zip(replicas, one):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_rho_variable_made_in_the_strategys_scope_trains_as_a_float():
    # Made in the scope, it is a MirroredVariable, whose `.value` NumPy
    # cannot read: SAMModel's check of ρ and `get_config` had failed.
    with mirrored().scope():
        rho = keras.Variable(RHO, trainable=False)
    model, _ = fitted(mirrored(), rho=rho)
    np.testing.assert_allclose(
        model.get_config()["rho"]["variable"], RHO, rtol=1e-6
    )
    for got, want in zip(model.base.get_weights(), fit(mirrored(), rho=RHO)[0]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_policy_made_outside_the_strategys_scope_is_refused():
    policy = switching.GradientNormOutlier()
    with pytest.raises(ValueError, match="inside the strategy's scope.*mean"):
        fitted(mirrored(), rho=RHO, switching=policy)


@pytest.mark.parametrize("rho", [0.0, RHO])
def test_batchnorm_and_dropout_train_under_mirrored_strategy(rho):
    x, y, _, _ = softmax_data()
    strategy = mirrored()
    results = []
    for wrap in (lambda m: m, lambda m: keras_sam.SAMModel(m, rho=rho)):
        with strategy.scope():
            keras.utils.set_random_seed(7)
            model = wrap(
                keras.Sequential(
                    [
                        keras.Input((x.shape[1],)),
                        keras.layers.Dense(8, activation="relu"),
                        keras.layers.BatchNormalization(),
                        keras.layers.Dropout(0.3),
                        keras.layers.Dense(3),
                    ]
                )
            )
            model.compile(optimizer="sgd", loss=xent(), metrics=["accuracy"])
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        history = model.fit(dataset, epochs=2, verbose=0)
        results.append(([v.numpy() for v in model.variables], history))
    (plain, plain_history), (sam, sam_history) = results
    assert np.all(np.isfinite(sam_history.history["loss"]))
    moving_mean = sam[2 + 2]  # kernel, bias, gamma, beta, moving_mean
    assert np.abs(moving_mean).max() > 0  # updated under the strategy
    if rho == 0.0:
        assert sam_history.history == plain_history.history
        for a, b in zip(plain, sam):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert N % BATCH == 0


@pytest.mark.parametrize(
    "make_options",
    [
        lambda: dict(rho=RHO),
        lambda: dict(rho=keras.Variable(RHO, trainable=False)),
        lambda: dict(rho=RHO, switching=switching.Periodic(2)),
    ],
    ids=["float", "variable", "periodic"],
)
def test_a_synchronized_batchnorm_trains_as_on_one_device(make_options):
    # With one ε (`sync_perturbations`) and BatchNormalization synchronized
    # over the replicas, both passes see the global batch: the step is the
    # one device's. Under a run-time conditional (a ρ Variable, a policy)
    # the all-reduce had failed in `tf.cond`; both branches run instead.
    def make_model():
        keras.utils.set_random_seed(7)
        base = keras.Sequential(
            [
                keras.Input((softmax_data()[0].shape[1],)),
                keras.layers.Dense(6),
                keras.layers.BatchNormalization(synchronized=True),
                keras.layers.Dense(3),
            ]
        )
        return keras_sam.SAMModel(
            base, sync_perturbations=True, **make_options()
        )

    x, y, _, _ = softmax_data()
    assert_two_replicas_match_one_device(
        make_model, sgd, xent(), (x, y), BATCH, epochs=2
    )
    # A strategy of one replica all-reduces too (one GPU, say).
    weights = []
    for strategy in (one_replica(), tf.distribute.get_strategy()):
        with strategy.scope():
            model = make_model()
            model.compile(sgd(), loss=xent(), jit_compile=False)
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        weights.append(model.base.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_frozen_synchronized_batchnorm_keeps_the_conditional():
    # Frozen, it normalizes with its moving statistics and never
    # all-reduces (Keras: `training and self.trainable`), so a declined
    # step need not pay for the perturbed pass.
    block = keras.Sequential(
        [
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(synchronized=True),
        ]
    )
    base = keras.Sequential([keras.Input((3,)), block, keras.layers.Dense(2)])
    with one_replica().scope():
        assert selection.all_reduces_in_passes(base)
        block.trainable = False
        assert not selection.all_reduces_in_passes(base)
    block.trainable = True
    assert not selection.all_reduces_in_passes(base)


def test_jit_compile_auto_is_off_under_tf_distribute_as_in_keras():
    _, _, w0, b0 = softmax_data()
    with mirrored().scope():
        model = keras_sam.SAMModel(softmax_regression(w0, b0))
        model.compile(optimizer="sgd", loss=xent(), jit_compile="auto")
        plain = softmax_regression(w0, b0)
        plain.compile(optimizer="sgd", loss=xent(), jit_compile="auto")
    assert model.jit_compile is False
    assert model.jit_compile == plain.jit_compile
