"""What the tests need per Keras backend: markers and reference gradients.

`make test` runs the suite once per installed backend (one pytest process
each, since the backend is fixed per process). Tests that exercise
TensorFlow-only features (`tf.distribute`, `tf.function` custom loops,
the trainers' `tf.data` pipelines) carry `tensorflow_only`.
"""

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()

# conftest.py skips these on other backends; `make test` deselects them.
tensorflow_only = pytest.mark.tensorflow_only

# Keras' PyTorch trainer refuses `steps_per_execution` > 1.
needs_steps_per_execution = pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras' PyTorch trainer requires steps_per_execution=1",
)


def assert_matches_plain_fit(got, want, mode, rtol=0.0, atol=0.0):
    """`got` equals `want` within `rtol`, `atol` (bitwise by default).

    Under `torch.compile` (PyTorch's `jit_compile=True`) only to float32
    rounding: inductor fuses the plain step and the SAM step, two other
    programs, into other kernels.
    """
    if BACKEND == "torch" and mode == "jit":
        rtol, atol = max(rtol, 1e-5), max(atol, 1e-6)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def compiled(fn):
    """`fn` compiled the backend's way: `tf.function` or `jax.jit`.

    On PyTorch `fn` itself: Keras' PyTorch trainer runs eagerly unless
    `jit_compile=True`, and `torch.compile` takes minutes per test here.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if BACKEND == "torch":
        return fn
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
    if BACKEND == "torch":
        import torch

        loss = loss_of_outputs(model(x, training=True))
        grads = torch.autograd.grad(loss, [v.value for v in trainable])
        return [g.detach().numpy() for g in grads]
    import jax

    def loss_at(weights):
        y_pred, _ = model.stateless_call(
            weights, non_trainable, x, training=True
        )
        return loss_of_outputs(y_pred)

    grads = jax.grad(loss_at)([v.value for v in trainable])
    return [keras.ops.convert_to_numpy(g) for g in grads]


def train_by_hand_sam(model, loss_fn, x, y, batch, rho, lr):
    """SGD at `lr` on SAM gradients (ρ = `rho`), batch by batch in order,
    each gradient by the backend's own autodiff (`gradients`). Returns
    `model`, trained in place."""
    variables = model.trainable_variables
    for start in range(0, len(x), batch):
        xb, yb = x[start : start + batch], y[start : start + batch]

        def loss(outputs, yb=yb):
            return loss_fn(yb, outputs)

        w = [keras.ops.convert_to_numpy(v.value) for v in variables]
        g = gradients(model, loss, xb)
        norm = np.sqrt(sum(np.sum(gi**2) for gi in g))
        for v, wi, gi in zip(variables, w, g):
            v.assign(wi + rho * gi / norm)
        g_sam = gradients(model, loss, xb)
        for v, wi, gi in zip(variables, w, g_sam):
            v.assign(wi - lr * gi)
    return model
