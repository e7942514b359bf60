"""The JAX backend: `jax.value_and_grad`, `lax.cond`, stateless train steps."""

import jax
import jax.experimental
import keras
import numpy as np

from keras_sam.backend import common


def value_and_gradients(fn, weights):
    (_, aux), gradients = jax.value_and_grad(fn, has_aux=True)(list(weights))
    return aux, gradients


def hessian_vector_product(fn, weights, vector):
    """`∇²fn(weights) · vector`, forward-over-reverse."""
    return jax.jvp(jax.grad(fn), (list(weights),), (list(vector),))[1]


def function(fn):
    """`fn` compiled with `jax.jit`."""
    return jax.jit(fn)


def cond(predicate, true_fn, false_fn):
    return jax.lax.cond(predicate, true_fn, false_fn)


def data_parallel_shards():
    """The number of shards of the batch under `keras.distribution`.

    Keras' JAX trainer splits each batch along its first axis over this
    many devices and differentiates the mean over the global batch; the
    SAM step perturbs each shard with its own ε, as a `tf.distribute`
    replica does.
    """
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if mesh is None or batch_axis not in mesh.axis_names:
        return 1
    return mesh.shape[mesh.axis_names.index(batch_axis)]


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
    logs, new_state = common.run_stateless(lambda: step(data), groups, state)
    return logs, tuple(new_state)


def apply_gradients(optimizer, gradients, variables, after_gradients=False):
    """`optimizer.apply_gradients`, inside `train_step`'s stateless scope.

    Through `stateless_apply`: the stateful `apply` of some optimizers
    (`LossScaleOptimizer`) assigns variables inside `lax.cond` branches,
    which a traced step cannot do. XLA orders the update itself:
    `after_gradients` has no effect.
    """
    del after_gradients
    variables = list(variables)
    new_values = optimizer.stateless_apply(
        [v.value for v in optimizer.variables],
        list(gradients),
        [v.value for v in variables],
    )
    for group, values in zip((variables, optimizer.variables), new_values):
        for variable, value in zip(group, values):
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
