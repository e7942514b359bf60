"""Test session setup: two CPU devices, for MirroredStrategy and DataParallel.

Logical devices can only be configured before TensorFlow initializes its
devices, so this runs at collection time, before any test module imports.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("KERAS_BACKEND") == "jax":
    # Two JAX CPU devices for keras.distribution, read when JAX starts.
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_force_host_platform_device_count=2"
    )

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
except RuntimeError:
    pass  # Already initialized with its own configuration.


def pytest_collection_modifyitems(config, items):
    import keras

    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason="exercises a TensorFlow-only feature")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_op_determinism():
    # A trainer's --deterministic enables op determinism for the whole
    # process, which also turns XLA off in Keras; later tests must not
    # inherit it.
    yield
    from tensorflow.python.framework import config

    if config.is_op_determinism_enabled():
        config.disable_op_determinism()
    assert not config.is_op_determinism_enabled()
