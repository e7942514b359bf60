"""SAMModel under `keras.distribution.DataParallel` on two JAX CPU devices.

The same NumPy oracles as the MirroredStrategy tests (distribute_test.py):
each device perturbs with the gradient of its own half of the batch, or,
with `sync_perturbations=True`, every device with that of the global batch.
conftest.py sets `XLA_FLAGS=--xla_force_host_platform_device_count=2`.
"""

import keras
import numpy as np
import pytest

import keras_sam
from tests.backends import BACKEND
from tests.sam_model_test import LR
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import assert_one_epoch_matches_the_oracle
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


def fit(distribution, jit_compile=True, **sam_kwargs):
    x, y, w0, b0 = softmax_data()
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        model = keras_sam.SAMModel(softmax_regression(w0, b0), **sam_kwargs)
        model.compile(
            optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
            loss=xent(),
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
