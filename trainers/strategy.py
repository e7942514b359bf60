"""One factory for every tf.distribute strategy the trainers support."""

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def get_strategy(name, tpu=None):
    """The strategy named by `--strategy`.

    `multi_worker` reads the cluster from the `TF_CONFIG` environment
    variable; `tpu` resolves `tpu` (a name or a grpc:// address) through the
    standard cluster resolver.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        if not tpu:
            raise ValueError("--strategy=tpu needs --tpu=<name or address>.")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(
        f"Unknown strategy {name!r}; expected one of {list(STRATEGIES)}."
    )
