"""What a backend does unless its module says otherwise: run the step
eagerly on one replica (JAX too: Keras does not divide its losses by the
devices), with dense gradients and random draws through Keras' seed
variables, which the step hands to both passes; a backend's module defines
only the names of `keras_sam.backend.INTERFACE` where it differs.
`run_stateless` serves the stateless conventions on every backend.
"""

import keras
from keras import ops


def run_stateless(fn, groups, values):
    """`fn()` with the variables of `groups` holding `values`, statelessly.

    `groups` and `values` are aligned lists of lists. `fn` runs inside a
    `keras.StatelessScope` that maps each variable to its value, so it
    writes no variable; returns `fn()`'s output and, for each group, the
    values its variables hold when `fn` returns.
    """
    mapping = [
        (variable, value)
        for variables, group_values in zip(groups, values)
        for variable, value in zip(variables, group_values)
    ]
    with keras.StatelessScope(state_mapping=mapping) as scope:
        output = fn()
    new_values = [
        [scope.get_current_value(v) for v in variables] for variables in groups
    ]
    return output, new_values


def function(fn):
    return fn


def cond(predicate, true_fn, false_fn):
    return true_fn() if bool(predicate) else false_fn()


def replica_count():
    return 1


def all_reduce(tensors, op="sum"):
    del op
    return list(tensors)


def in_strategy():
    return False


def data_parallel_shards():
    # A tf.distribute step runs once per replica, on its own shard.
    return 1


map_shards = None


def check_per_replica_call(name):
    del name


def is_symbolic(tensor):
    del tensor
    return False


def read_live(variable):
    # An eager step or a tf.function reads a variable when it runs.
    return ops.cast(variable.value, "float32")


def is_multi_worker(strategy=None):
    del strategy
    return False


def first_local_batch(strategy, iterator):
    del strategy, iterator
    return None


def sum_duplicate_rows(tensors):
    return list(tensors)


def to_dense(tensors):
    return list(tensors)


def random_state():
    return None


def set_random_state(state):
    del state
