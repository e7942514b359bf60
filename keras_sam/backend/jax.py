"""The JAX backend: `jax.value_and_grad`, `lax.cond`, stateless train steps."""

import jax
import jax.experimental
import keras
import numpy as np


def value_and_gradients(fn, weights):
    (_, aux), gradients = jax.value_and_grad(fn, has_aux=True)(list(weights))
    return aux, gradients


def hessian_vector_product(fn, weights, vector):
    """`∇²fn(weights) · vector`, forward-over-reverse."""
    return jax.jvp(jax.grad(fn), (list(weights),), (list(vector),))[1]


def sum_duplicate_rows(tensors):
    # Gradients here are dense, also those of an embedding table.
    return list(tensors)


def to_dense(tensors):
    return list(tensors)


def function(fn):
    """`fn` compiled with `jax.jit`."""
    return jax.jit(fn)


def cond(predicate, true_fn, false_fn):
    return jax.lax.cond(predicate, true_fn, false_fn)


def replica_count():
    # Keras' losses are not divided by the devices on JAX: a data-parallel
    # step differentiates the mean over the global batch.
    return 1


def all_reduce(tensors, op="sum"):
    del op
    return list(tensors)


def data_parallel_shards():
    """The number of shards of the batch under `keras.distribution`.

    Keras' JAX trainer splits each batch along its first axis over this
    many devices and differentiates the mean over the global batch; the
    SAM step perturbs each shard with its own ε, as a `tf.distribute`
    replica does.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    batch_axis = getattr(distribution, "batch_dim_name", None)
    mesh = distribution.device_mesh
    if batch_axis not in mesh.axis_names:
        return 1
    return mesh.shape[mesh.axis_names.index(batch_axis)]


def check_per_replica_call(name):
    del name


def is_symbolic(tensor):
    return isinstance(tensor, jax.core.Tracer)


def train_step(model, step, state, data):
    """Runs `step(data)`, written statefully, as Keras' stateless JAX step.

    Keras' JAX trainer passes the values of the trainable, non-trainable,
    optimizer and metric variables and expects their new values back. The
    step reads and assigns them inside a `StatelessScope` that maps every
    variable to the value passed in, so nothing is written to a variable
    while `jax.jit` traces it.
    """
    groups = (
        model.trainable_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        model.metrics_variables,
    )
    mapping = [
        (variable, value)
        for variables, values in zip(groups, state)
        for variable, value in zip(variables, values)
    ]
    with keras.StatelessScope(state_mapping=mapping) as scope:
        logs = step(data)
    new_state = tuple(
        [scope.get_current_value(v) for v in variables] for variables in groups
    )
    return logs, new_state


def apply_gradients(optimizer, gradients, variables, after_gradients=False):
    """`optimizer.apply_gradients`, inside `train_step`'s stateless scope.

    Through `stateless_apply`: the stateful `apply` of some optimizers
    (`LossScaleOptimizer`) assigns variables inside `lax.cond` branches,
    which a traced step cannot do. XLA orders the update itself:
    `after_gradients` has no effect.
    """
    del after_gradients
    variables = list(variables)
    new_weights, new_optimizer_values = optimizer.stateless_apply(
        [v.value for v in optimizer.variables],
        list(gradients),
        [v.value for v in variables],
    )
    for variable, value in zip(variables, new_weights):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, new_optimizer_values):
        variable.assign(value)


def read_live(variable):
    """The value `variable` holds when the step runs, as a float32 scalar.

    A compiled step would otherwise read it once, when traced. Through a
    host callback, a value assigned between steps (e.g. by a callback of
    `fit`) takes effect at the next step, as on TensorFlow.
    """
    return jax.experimental.io_callback(
        lambda: np.asarray(variable.numpy(), np.float32),
        jax.ShapeDtypeStruct((), np.float32),
    )


def is_multi_worker(strategy=None):
    # Several processes are one `keras.distribution` mesh here, which
    # Keras' own trainer handles.
    del strategy
    return False


def first_local_batch(strategy, iterator):
    del strategy, iterator
    return None


def random_state():
    # Every random layer draws through Keras' seed variables here, which
    # the step hands to both passes.
    return None


def set_random_state(state):
    del state
