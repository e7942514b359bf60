"""What the tests need per Keras backend: markers and reference gradients.

`make test` runs the suite once per installed backend (one pytest process
each, since the backend is fixed per process). Tests that exercise
TensorFlow-only features (`tf.distribute`, `tf.function` custom loops,
the trainers' `tf.data` pipelines) carry `tensorflow_only`.
"""

import keras
import pytest

BACKEND = keras.backend.backend()

# conftest.py skips these on other backends; `make test` deselects them.
tensorflow_only = pytest.mark.tensorflow_only


def compiled(fn):
    """`fn` compiled the backend's way: `tf.function` or `jax.jit`."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    import jax

    return jax.jit(fn)


def gradients(model, loss_of_outputs, x):
    """∇ of `loss_of_outputs(model(x, training=True))` at the model's
    current trainable weights, by the backend's own autodiff."""
    trainable = model.trainable_variables
    non_trainable = [v.value for v in model.non_trainable_variables]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_of_outputs(model(x, training=True))
        return [
            keras.ops.convert_to_numpy(g)
            for g in tape.gradient(loss, trainable)
        ]
    import jax

    def loss_at(weights):
        y_pred, _ = model.stateless_call(
            weights, non_trainable, x, training=True
        )
        return loss_of_outputs(y_pred)

    grads = jax.grad(loss_at)([v.value for v in trainable])
    return [keras.ops.convert_to_numpy(g) for g in grads]
