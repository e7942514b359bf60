"""One factory for every strategy the trainers support, on each backend.

On TensorFlow, `--strategy` names a `tf.distribute` strategy. On JAX,
`mirrored` sets `keras.distribution.DataParallel` over the local devices
(each device perturbs with its own shard's gradient, as a replica of
MirroredStrategy does); `default` uses one device; `multi_worker` and
`tpu` are TensorFlow strategies and are refused. On PyTorch, which has
no `keras.distribution`, only `default` runs.
"""

import contextlib

import keras
import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def get_strategy(name, tpu=None):
    """The strategy named by `--strategy`.

    `multi_worker` reads the cluster from the `TF_CONFIG` environment
    variable; `tpu` resolves `tpu` (a name or a grpc:// address) through the
    standard cluster resolver.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {list(STRATEGIES)}."
        )
    if keras.backend.backend() != "tensorflow":
        return _keras_distribution(name)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if not tpu:
        raise ValueError("--strategy=tpu needs --tpu=<name or address>.")
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


class KerasDistribution:
    """The part of a tf.distribute strategy the trainers use, for a
    `keras.distribution` set for the whole process (JAX)."""

    def __init__(self, num_replicas_in_sync):
        self.num_replicas_in_sync = num_replicas_in_sync

    def scope(self):
        return contextlib.nullcontext()


def _keras_distribution(name):
    backend = keras.backend.backend()
    if name == "default":
        return KerasDistribution(1)
    if backend == "torch":
        raise ValueError(
            f"--strategy={name} needs several devices, which the trainers "
            "reach through tf.distribute or keras.distribution; Keras' "
            f"{backend} backend has neither. Run --strategy=default (one "
            "device) or use KERAS_BACKEND=jax or tensorflow."
        )
    if name in ("multi_worker", "tpu"):
        raise ValueError(
            f"--strategy={name} is a tf.distribute strategy; on the "
            f"{backend} backend use --strategy=mirrored (keras.distribution."
            "DataParallel over this host's devices) or run with "
            "KERAS_BACKEND=tensorflow."
        )
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    return KerasDistribution(len(devices))
