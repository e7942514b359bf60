"""SAM for custom training loops: `sam_gradients` and its stateless twin.

Both compute one step with `sam_step.compute_sam_gradients`, the function
behind `SAMModel.train_step`, from a model and a loss given as in
`compile(loss=...)`; they apply nothing.
"""

import functools
import inspect

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_sam import backend
from keras_sam import batch_parts
from keras_sam import compat
from keras_sam import options as options_lib
from keras_sam import sam_step
from keras_sam import schedules
from keras_sam.backend import common


def sam_gradients(
    model, x, y, loss_fn, sample_weight=None, *, optimizer=None, **options
):
    """The loss and the SAM gradients of `model` on one batch.

    For custom training loops. With `g = ∇L(w)` on the batch:

    ```
    ε = ρ · g / ‖g‖₂                       # SAM
    ε = ρ · T_w² g / ‖T_w g‖₂, T_w = |w|+η  # ASAM (adaptive=True)
    gradients = ∇L(w + ε)
    ```

    ASAM's `T_w` applies to the weights (kernels, normalization scales) and
    `T = 1` to biases and normalization offsets, as in `SAMModel`'s default
    `adaptive_variables="weights"`.

    `L` is the loss of `loss_fn` plus `model.losses` (weight regularizers
    and `add_loss` terms), all evaluated at the weights of the pass they
    belong to, so regularizers are evaluated at `w + ε` in the second pass.
    The model is called with `training=True` in both passes and its
    non-trainable state (BatchNorm moving statistics, seeds) is updated
    once, from the clean pass. No trainable variable is modified: apply the
    gradients yourself. On TensorFlow, in a `tf.function`, apply them under
    a control dependency on the gradients, as below: the executor runs the
    ops of an update that need no gradient (SGD's m · μ) when the step
    starts and would hold them through both passes, one more copy of the
    parameters at the step's peak (`SAMModel` does this itself).

    Under a `tf.distribute` strategy, call it in each replica, inside
    `strategy.run`: each replica computes ε from its own share of the batch
    (see `sync_perturbations`), and, as in Keras' `fit`, its loss and
    `model.losses` are divided by the number of replicas, so that the
    optimizer's sum of the replicas' gradients is the gradient of the mean,
    and the sum of the replicas' losses is the loss of the global batch.
    Called outside `strategy.run` with more than one replica, it raises.

    Given a built `model`, an `optimizer` and a `dataset` of `(x, y)`
    batches created under `strategy.scope()` (with no strategy:
    `strategy = tf.distribute.get_strategy()`):

    ```python
    with strategy.scope():
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


    @tf.function
    def train_step(x, y):
        def step(x, y):
            loss, grads = keras_sam.sam_gradients(
                model, x, y, loss_fn, rho=0.05, optimizer=optimizer
            )
            with tf.control_dependencies([g for g in grads if g is not None]):
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        losses = strategy.run(step, args=(x, y))
        return strategy.reduce("SUM", losses, axis=None)


    for x, y in strategy.experimental_distribute_dataset(dataset):
        loss = train_step(x, y)
    ```

    Args:
        model: a built Keras model.
        x: the inputs of the batch.
        y: the targets of the batch.
        loss_fn: the loss, as in `compile(loss=...)`: a `keras.losses.Loss`
            (or its class), a name such as
            `"sparse_categorical_crossentropy"`, or a function
            `fn(y_true, y_pred)` of per-example losses (e.g.
            `keras.losses.sparse_categorical_crossentropy`), which is
            weighted by `sample_weight` and averaged over the batch as
            Keras does. A function whose third parameter is required or
            named `sample_weight` is called as
            `loss_fn(y_true, y_pred, sample_weight)` (by keyword where it
            is keyword-only), must return a scalar, and is used as is
            (under a strategy, divide it by the number of replicas, as
            Keras' losses do).
        sample_weight: optional per-example weights, split with the batch
            (by `micro_batches`, replicas). Weights bound into `loss_fn`
            (`functools.partial`) are kept when this is None, and are the
            whole batch's: with `micro_batches` > 1, pass them here.
        optimizer: the Keras optimizer that applies the gradients: its
            `scale_loss` is applied before differentiating (a
            `LossScaleOptimizer`'s, which its `apply` undoes), and a
            schedule `rho` follows its learning-rate step. Optional, except
            under the `"mixed_float16"` policy.
        **options: the options of `keras_sam.options.SAMOptions` that need
            no state of their own: `rho` (a number, a float
            `keras.Variable`, or a schedule, evaluated at the step at which
            the optimizer evaluates its learning rate), `adaptive`, `eta`,
            `adaptive_variables`, `micro_batches`, `sync_perturbations`
            (inside `tf.distribute`, one ε for the global batch) and
            `gsam_alpha`, with their defaults there (which are SAM).

    Returns:
        `(loss, gradients)`: the clean loss (scalar; under a strategy, this
        replica's share, see above) and a list of gradients aligned with
        `model.trainable_variables`.
    """
    _check_not_traced_statefully(model)
    return _sam_gradients(
        model, x, y, loss_fn, sample_weight, optimizer, options
    )


def _sam_gradients(model, x, y, loss_fn, sample_weight, optimizer, options):
    options = _stateless_options(options)
    _check_model_and_optimizer(model, optimizer, sample_weight)
    backend.check_per_replica_call("sam_gradients")
    if not backend.is_symbolic(x) and backend.replica_count() == 1:
        # Eager: made here, as `fit` makes it before its first step; made
        # inside the first pass, its first advance was dropped. (A traced
        # loop traces again once a pass has made it; under tf.distribute
        # each replica thread would make its own.)
        compat.stateful_variables(model, create=True)
    loss_fn = _loss_function(loss_fn)
    batch_parts.check_loss_reductions(
        loss_fn, options, weighted=sample_weight is not None
    )
    x, y, sample_weight = tree.map_structure(_as_tensor, (x, y, sample_weight))

    def compute_loss(x, y, y_pred, sample_weight):
        del x
        total = ops.cast(loss_fn(y, y_pred, sample_weight), "float32")
        if len(total.shape):
            raise ValueError(
                "`loss_fn(y_true, y_pred, sample_weight)` must return a "
                f"scalar; it returned shape {tuple(total.shape)}. Received: "
                f"loss_fn={loss_fn!r}"
            )
        if model.losses:
            extra = ops.sum([ops.cast(t, "float32") for t in model.losses])
            total = total + _scale_loss_for_replicas(extra)
        return total

    listed = len(model.trainable_variables)
    result = sam_step.compute_sam_gradients(
        model,
        compute_loss,
        x,
        y,
        sample_weight,
        options,
        rho=schedules.current_rho(options.rho, optimizer),
        scale_loss=None if optimizer is None else optimizer.scale_loss,
    )
    if len(model.trainable_variables) != listed:
        # A layer built lazily made its weights in the clean pass, after
        # the step had listed the variables: they got no gradient.
        raise ValueError(_UNBUILT.format(name=model.name))
    return result.loss, result.gradients


_UNBUILT = (
    "`model` must be built, all its layers: give it an `Input`, or call it "
    "on a batch first; weights made inside the SAM step get no gradient. "
    "Received: model={name!r}, not built"
)


def _check_model_and_optimizer(model, optimizer, sample_weight):
    # Without weights, refused before a backend fails on none (a model
    # that makes them in `__init__` may never be marked built; one that
    # makes some later is refused after the step).
    if (
        isinstance(model, keras.Layer)
        and not model.built
        and not model.variables
    ):
        raise ValueError(_UNBUILT.format(name=model.name))
    if isinstance(sample_weight, keras.optimizers.Optimizer):
        raise TypeError(
            "`optimizer` is keyword-only: `sam_gradients(model, x, y, "
            "loss_fn, optimizer=optimizer)`. Received: "
            f"sample_weight={sample_weight!r}"
        )
    if optimizer is not None and not isinstance(
        optimizer, keras.optimizers.Optimizer
    ):
        raise TypeError(
            "`optimizer` must be a Keras optimizer instance or None. "
            f"Received: optimizer={optimizer!r}"
        )
    policy = getattr(model, "dtype_policy", None)
    if optimizer is None and getattr(policy, "name", None) == "mixed_float16":
        # A `LossScaleOptimizer` applying these gradients divides them by
        # its scale: unscaled, they would come out that many times too
        # small, with no error. `compile` wraps one in for the same policy.
        raise ValueError(
            "Under the 'mixed_float16' policy pass `optimizer=`, the "
            "`keras.optimizers.LossScaleOptimizer` that applies the "
            "gradients, so that its `scale_loss` scales the loss before "
            "the float16 gradients (a plain optimizer, to train unscaled). "
            f"Received: optimizer=None for model {model.name!r}"
        )


def _check_not_traced_statefully(model):
    # Traced by `jax.jit` with the variables outside (not in the stateless
    # twin's scope), the step read the weights once, as constants (every
    # call returned the first step's gradients), and wrote traced values
    # into the BatchNorm statistics. A new tensor, not the batch, tells a
    # trace: a jitted function may close over a concrete batch.
    weights = model.trainable_variables[:1]
    if (
        weights
        and backend.is_symbolic(ops.zeros(()))
        and not backend.is_symbolic(weights[0].value)
    ):
        raise ValueError(
            "`sam_gradients` was traced (by `jax.jit`) with the model's "
            "variables outside it, which a trace reads once, as "
            "constants: use `stateless_sam_gradients` with the variables' "
            f"values, as `model.stateless_call`. Received: model="
            f"{model.name!r}, its variables not traced"
        )


_STATELESS_OPTIONS = (
    "rho",
    "adaptive",
    "eta",
    "adaptive_variables",
    "micro_batches",
    "sync_perturbations",
    "gsam_alpha",
)


def _as_tensor(value):
    """A NumPy array or a tensor as the backend's tensor, floats as
    `floatx`, as `fit` gives a batch to the loss (PyTorch's operators
    refuse NumPy arrays, and a float64 `sample_weight` times a float32
    loss fails)."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        value = ops.convert_to_tensor(value)
    elif not ops.is_tensor(value):
        return value  # strings, for a model that takes text, stay as given
    dtype = str(value.dtype)
    if "float" in dtype and keras.backend.floatx() not in dtype:
        return ops.cast(value, keras.backend.floatx())
    return value


def _stateless_options(options):
    """`SAMOptions` of the options `sam_gradients` takes."""
    others = sorted(set(options) - set(_STATELESS_OPTIONS))
    if others:
        raise TypeError(
            f"`sam_gradients` takes the options {list(_STATELESS_OPTIONS)}; "
            f"{others} keep state across steps or select variables: use "
            f"`SAMModel`. Received: {others[0]}={options[others[0]]!r}"
        )
    return options_lib.SAMOptions(**options)


def stateless_sam_gradients(
    model,
    trainable_variables,
    non_trainable_variables,
    x,
    y,
    loss_fn,
    sample_weight=None,
    *,
    optimizer=None,
    optimizer_variables=None,
    **options,
):
    """`sam_gradients` as a pure function of the variables' values.

    For stateless training loops, e.g. under `jax.jit` on the JAX backend,
    in the style of `model.stateless_call` and `optimizer.stateless_apply`:
    the values of `model.trainable_variables` and
    `model.non_trainable_variables` are passed in, and the new values of
    the non-trainable ones (BatchNorm statistics and seeds, updated once
    from the clean pass) come back. No variable is read or written (off
    JAX, Keras' global seed generator, which unseeded random ops draw
    from, is read, and its advance dropped).

    ```python
    @jax.jit
    def train_step(trainable, non_trainable, optimizer_variables, x, y):
        loss, grads, non_trainable = keras_sam.stateless_sam_gradients(
            model, trainable, non_trainable, x, y, loss_fn, rho=0.05
        )
        trainable, optimizer_variables = optimizer.stateless_apply(
            optimizer_variables, grads, trainable
        )
        return loss, trainable, non_trainable, optimizer_variables
    ```

    Args:
        model: a built Keras model.
        trainable_variables: the values of `model.trainable_variables`.
        non_trainable_variables: the values of
            `model.non_trainable_variables`.
        x, y, loss_fn, sample_weight, **options: as in `sam_gradients`.
        optimizer: as in `sam_gradients`: its `scale_loss` is applied (a
            `LossScaleOptimizer`'s) and a schedule `rho` follows its
            `iterations`. Optional, except under `"mixed_float16"`.
        optimizer_variables: the values of `optimizer.variables`, needed
            (and checked) with an `optimizer` inside a compiled function.

    Returns:
        `(loss, gradients, non_trainable_variables)`: the clean loss, the
        SAM gradients aligned with `trainable_variables`, and the new
        values of the non-trainable variables.
    """
    compiled = any(backend.is_symbolic(v) for v in trainable_variables[:1])
    if optimizer is not None and optimizer_variables is None and compiled:
        # JAX would read the optimizer's step and loss scale once, at trace.
        raise ValueError(
            "Inside a compiled function, `stateless_sam_gradients` needs the "
            "values of `optimizer.variables` as `optimizer_variables`, as "
            "`optimizer.stateless_apply` does. Received: "
            f"optimizer={optimizer.name!r}, optimizer_variables=None"
        )
    groups = [model.trainable_variables, model.non_trainable_variables]
    values = [trainable_variables, non_trainable_variables]
    names = ["trainable_variables", "non_trainable_variables"]
    if optimizer is not None and optimizer_variables is not None:
        groups.append(optimizer.variables)
        values.append(optimizer_variables)
        names.append("optimizer_variables")
    for group, given, name in zip(groups, values, names):
        if len(given) != len(group):
            # A short list had left the rest to the variables, which
            # `jax.jit` reads once, as constants.
            raise ValueError(
                f"`{name}` must hold one value per variable, "
                f"{len(group)}. Received: {name} of length {len(given)}"
            )
    (loss, gradients), new_values = common.run_stateless(
        lambda: _sam_gradients(
            model, x, y, loss_fn, sample_weight, optimizer, options
        ),
        groups,
        values,
    )
    return loss, gradients, new_values[1]


def _loss_function(loss_fn):
    """`loss_fn` as `f(y_true, y_pred, sample_weight)` giving a scalar."""
    if isinstance(loss_fn, (str, dict, type)):
        try:  # A class is made, as `compile(loss=cls)` makes it.
            loss_fn = keras.losses.get(loss_fn)
        except ValueError as error:
            raise ValueError(
                "`loss_fn` is not a Keras loss identifier. Received: "
                f"loss_fn={loss_fn!r}"
            ) from error
    if isinstance(loss_fn, keras.losses.Loss):
        return loss_fn
    if not callable(loss_fn):
        raise TypeError(
            "`loss_fn` must be a `keras.losses.Loss`, a loss name or a "
            f"function. Received: loss_fn={loss_fn!r}"
        )
    way = _sample_weight_argument(loss_fn)
    if way == "keyword":
        parameter = inspect.signature(loss_fn).parameters["sample_weight"]
        keeps_default = parameter.default is not inspect.Parameter.empty

        @functools.wraps(loss_fn)
        def weighted_loss(y_true, y_pred, sample_weight):
            if sample_weight is None and keeps_default:
                # A value bound by `functools.partial` stays.
                return loss_fn(y_true, y_pred)
            return loss_fn(y_true, y_pred, sample_weight=sample_weight)

        return weighted_loss
    if way == "positional":
        return loss_fn
    return _PerExampleLoss(loss_fn)


def _sample_weight_argument(fn):
    """How `fn` takes `sample_weight`: "positional" (a third positional
    parameter, required or so named, or `*args`), "keyword" (keyword-only)
    or None (Keras' reduction weights its values)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "positional"
    if any(
        p.name == "sample_weight" and p.kind == p.KEYWORD_ONLY
        for p in parameters
    ):
        return "keyword"  # also after `*args`, which would take it unused
    positional = []
    for p in parameters:
        if p.name == "sample_weight" or p.kind == p.VAR_POSITIONAL:
            return "positional"
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p)
    required = inspect.Parameter.empty
    if len(positional) >= 3 and positional[2].default is required:
        return "positional"
    return None


class _PerExampleLoss(keras.losses.Loss):
    """A function `fn(y_true, y_pred)` reduced as Keras' losses are.

    `keras.losses.Loss` weights the per-example values by `sample_weight`,
    averages them over the batch and divides by the number of replicas.
    Keras' own wrapper of a loss function, `LossFunctionWrapper` (what
    `compile(loss=fn)` uses), is not exported by `keras.losses` (Keras
    3.15.1), and `model.compute_loss` needs a model compiled with the loss,
    which `sam_gradients` does not ask for.
    """

    def __init__(self, fn):
        # Named: TensorFlow refuses the class's name, "__per_example_loss",
        # as a root name scope in a `tf.function`.
        super().__init__(name="per_example_loss")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _scale_loss_for_replicas(loss):
    # As Keras' losses and `compute_loss` do under tf.distribute: summing
    # the replicas' gradients then averages them.
    replicas = backend.replica_count()
    if replicas > 1:
        loss = loss / replicas
    return loss
