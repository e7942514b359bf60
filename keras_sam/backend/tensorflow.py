"""The TensorFlow backend: gradient tapes, `tf.cond` and `tf.distribute`."""

import tensorflow as tf
from keras import tree

from keras_sam import compat


def value_and_gradients(fn, weights):
    weights = [tf.convert_to_tensor(w) for w in weights]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(weights)
        objective, aux = fn(weights)
    # `None` where the objective does not depend on a weight, as Keras'
    # TensorFlow trainer leaves it.
    return aux, tape.gradient(objective, weights)


def hessian_vector_product(fn, weights, vector):
    """`∇²fn(weights) · vector` by double backpropagation."""
    weights = [tf.convert_to_tensor(w) for w in weights]
    with tf.GradientTape() as outer:
        outer.watch(weights)
        with tf.GradientTape() as inner:
            inner.watch(weights)
            objective = fn(weights)
        grads = _zeros_for_none(inner.gradient(objective, weights), weights)
        grad_dot_vector = tf.add_n(
            [tf.reduce_sum(g * v) for g, v in zip(grads, vector)]
        )
    return _zeros_for_none(outer.gradient(grad_dot_vector, weights), weights)


def _zeros_for_none(grads, weights):
    return [
        tf.zeros_like(w) if g is None else g for g, w in zip(grads, weights)
    ]


def sum_duplicate_rows(tensors):
    """`tensors`, each `tf.IndexedSlices` with one row per index.

    The gradient of a lookup has one row per lookup, so an index looked up
    k times appears k times; its dense gradient is the sum of those rows.
    Keras' sparse ops (`ops.square`, `ops.multiply`, ...) act on the rows as
    stored, so norms and products need the sum first. The result stays
    sparse: no dense copy of an embedding table is made.
    """
    return [
        _summed_rows(t) if isinstance(t, tf.IndexedSlices) else t
        for t in tensors
    ]


def _summed_rows(slices):
    indices, positions = tf.unique(slices.indices)
    values = tf.math.unsorted_segment_sum(
        slices.values, positions, tf.shape(indices)[0]
    )
    return tf.IndexedSlices(values, indices, slices.dense_shape)


def to_dense(tensors):
    return [
        tf.convert_to_tensor(t) if isinstance(t, tf.IndexedSlices) else t
        for t in tensors
    ]


def function(fn):
    """`fn` compiled into a graph."""
    return tf.function(fn)


def cond(predicate, true_fn, false_fn):
    return tf.cond(predicate, true_fn, false_fn)


def replica_count():
    # Keras' losses divide by this under tf.distribute, so that the sum of
    # the replicas' gradients is the gradient of the mean.
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_reduce(tensors, op="sum"):
    """`op` ("sum" or "mean") of each tensor across the replicas."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(tensors)
    reduce_op = {"sum": tf.distribute.ReduceOp.SUM}.get(
        op, tf.distribute.ReduceOp.MEAN
    )
    return list(context.all_reduce(reduce_op, list(tensors)))


def data_parallel_shards():
    # tf.distribute runs the step once per replica, on its own shard.
    return 1


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


def is_symbolic(tensor):
    del tensor
    return not tf.executing_eagerly()


def train_step(model, step, data):
    return compat.logs_for_workers(step(data))


def apply_gradients(optimizer, gradients, variables, after_gradients=False):
    """`optimizer.apply_gradients`; with `after_gradients`, none of its ops
    runs before every gradient is computed.

    In graph mode the executor runs an op as soon as its inputs are ready,
    and the ops of an update that need no gradient (SGD's m · μ, one
    parameter-sized tensor per variable) are ready when the step starts:
    in a two-pass step they were held through both passes (ResNet-20:
    SAM's peak 3.9 parameter copies above SGD's; with the order, below it).
    """
    if not after_gradients:
        optimizer.apply_gradients(zip(gradients, variables))
        return
    # Its variables are made first: a tf.function cannot lift variable
    # creations out of a control-dependency scope.
    if not optimizer.built:
        optimizer.build(variables)
    with tf.control_dependencies([g for g in gradients if g is not None]):
        optimizer.apply_gradients(zip(gradients, variables))


def read_live(variable):
    # A tf.function reads a variable when it runs.
    return tf.cast(variable.value, tf.float32)


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


def random_state():
    # Every random layer draws through Keras' seed variables here, which
    # the step hands to both passes.
    return None


def set_random_state(state):
    del state
