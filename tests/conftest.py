"""Test session setup: two logical CPUs, so MirroredStrategy has 2 replicas.

Logical devices can only be configured before TensorFlow initializes its
devices, so this runs at collection time, before any test module imports.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
except RuntimeError:
    pass  # Already initialized with its own configuration.
