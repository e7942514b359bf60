"""The TensorFlow backend's replicas under a `tf.distribute` strategy: their
count and all-reduce, the checks that a per-replica function runs in a
replica and that the switching policy's variables are the strategy's, and,
for `compat`'s multi-worker workarounds (keras-team/keras#20585), whether a
strategy spans workers and one replica's share of a batch.
"""

import tensorflow as tf
from keras import tree

from keras_sam import compat


def replica_count():
    # Keras' losses divide by this under tf.distribute, so that the sum of
    # the replicas' gradients is the gradient of the mean.
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_reduce(tensors, op="sum"):
    """`op` ("sum" or "mean") of each tensor across the replicas."""
    context = tf.distribute.get_replica_context()
    if context is None:
        raise ValueError(
            "An all-reduce across replicas must run in each replica, inside "
            "`strategy.run(...)`, not in the cross-replica context."
        )
    if context.num_replicas_in_sync == 1:
        return list(tensors)
    reduce_op = {"sum": tf.distribute.ReduceOp.SUM}.get(
        op, tf.distribute.ReduceOp.MEAN
    )
    return list(context.all_reduce(reduce_op, list(tensors)))


def in_strategy():
    # Even with one replica: a strategy's all-reduce cannot run in tf.cond.
    return tf.distribute.has_strategy()


def check_per_replica_call(name):
    strategy = tf.distribute.get_strategy()
    if (
        strategy.num_replicas_in_sync > 1
        and tf.distribute.in_cross_replica_context()
    ):
        raise ValueError(
            f"`{name}` must be called in each replica, inside "
            "`strategy.run(...)`: in the cross-replica context of "
            f"{type(strategy).__name__} with "
            f"{strategy.num_replicas_in_sync} replicas, the gradients would "
            "not be averaged across replicas."
        )


def train_step(model, step, data):
    _check_policy_in_scope(model)
    return compat.logs_for_workers(step(data))


def _check_policy_in_scope(model):
    # A policy made outside the strategy's scope keeps plain variables,
    # which every replica would update in turn.
    strategy = tf.distribute.get_strategy()
    policy = getattr(model, "switching", None)
    if policy is None or strategy.num_replicas_in_sync == 1:
        return
    for variable in policy.weights:
        if not strategy.extended.variable_created_in_scope(variable.value):
            raise ValueError(
                "Create the switching policy inside the strategy's scope, as "
                f"the model: {type(strategy).__name__} does not hold its "
                f"variable {variable.path!r}. Received: switching={policy!r}"
            )


def is_multi_worker(strategy=None):
    """Whether `strategy` (the current one by default) spans workers.

    `tf.distribute` answers this only through the private
    `strategy.extended._in_multi_worker_mode()` (TensorFlow 2.21).
    """
    strategy = strategy or tf.distribute.get_strategy()
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def first_local_batch(strategy, iterator):
    """One replica's share of the first batch of Keras' epoch `iterator`."""

    def first_local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    for _, _, it in iterator:
        return tree.map_structure(first_local, next(it))
    return None
