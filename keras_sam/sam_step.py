"""One SAM step as a function: the loss and the SAM gradients of a batch.

`sam_gradients` is the entry point for custom training loops; `SAMModel`
calls the same `compute_sam_gradients` from its `train_step`, so both share
one implementation.

Both passes run inside a `keras.StatelessScope`: the weights and the
non-trainable state (BatchNorm statistics, random-number seeds) are handed in
as tensors, so neither pass writes to a variable. After the passes, the
non-trainable state of the clean pass is written back once; the perturbed
pass's state is dropped. Because the perturbed pass starts from the same
seed state as the clean pass, dropout draws the same masks in both.
"""

import collections
import inspect
import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from keras import tree

from keras_sam import perturbations

SAMResult = collections.namedtuple(
    "SAMResult",
    ["loss", "y_pred", "gradients", "sharpness", "grad_norm", "perturbed"],
    defaults=(None, None, None),
)
SAMResult.__doc__ = """What one SAM step computed.

Quantities "averaged over micro-batches" are weighted by each micro-batch's
share of the examples (see `compute_sam_gradients`).

Attributes:
    loss: the loss at the current weights w (the clean pass), averaged over
        micro-batches, as returned by the loss function (not loss-scaled).
    y_pred: the clean pass's predictions for the whole batch.
    gradients: ∇L(w + ε), one per trainable variable (`None` where the loss
        does not depend on it), multiplied by the optimizer's loss scale when
        one is in use; averaged over micro-batches.
    sharpness: L(w + ε) − L(w), the perturbed pass's loss minus the clean
        pass's, averaged over micro-batches; `0` when the perturbed pass did
        not run.
    grad_norm: ‖∇L(w)‖₂ of each micro-batch's clean gradient over all
        trainable variables, averaged over micro-batches, multiplied by the
        loss scale like `gradients`.
    perturbed: a boolean scalar, whether the perturbed pass ran (false when
        ρ = 0 or when `should_perturb` declined).
"""


def validate_sam_arguments(
    rho, eta, micro_batches, sync_perturbations, adaptive=False
):
    """Raises `ValueError` naming the argument and the value when invalid.

    `rho` may be a number (Python or NumPy), a scalar float `keras.Variable`
    (read at every step) or a schedule (a callable of the step).
    """
    if isinstance(rho, keras.Variable):
        if tuple(rho.shape) != () or "float" not in str(rho.dtype):
            raise ValueError(
                "A `keras.Variable` `rho` must be a float scalar. Received: "
                f"rho={rho!r} of shape {tuple(rho.shape)} and dtype "
                f"{rho.dtype}"
            )
        if tf.executing_eagerly() and not rho.numpy() >= 0:
            raise ValueError(f"`rho` must be >= 0. Received: rho={rho!r}")
    elif callable(rho):
        pass
    elif not _is_real(rho):
        raise ValueError(
            "`rho` must be a number >= 0, a float `keras.Variable` or a "
            f"schedule. Received: rho={rho!r}"
        )
    elif not rho >= 0:
        raise ValueError(f"`rho` must be >= 0. Received: rho={rho}")
    elif not math.isfinite(rho):
        raise ValueError(f"`rho` must be finite. Received: rho={rho}")
    if not _is_real(eta):
        raise ValueError(f"`eta` must be a number > 0. Received: eta={eta!r}")
    if not eta > 0:
        raise ValueError(f"`eta` must be > 0. Received: eta={eta}")
    if not math.isfinite(eta):
        raise ValueError(f"`eta` must be finite. Received: eta={eta}")
    if (
        not isinstance(micro_batches, numbers.Integral)
        or isinstance(micro_batches, (bool, np.bool_))
        or micro_batches < 1
    ):
        raise ValueError(
            "`micro_batches` must be an integer >= 1. "
            f"Received: micro_batches={micro_batches!r}"
        )
    for name, value in (
        ("adaptive", adaptive),
        ("sync_perturbations", sync_perturbations),
    ):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(
                f"`{name}` must be True or False. Received: {name}={value!r}"
            )
    if sync_perturbations and micro_batches > 1:
        raise ValueError(
            "`sync_perturbations=True` computes one ε for the whole global "
            "batch, so it cannot be combined with `micro_batches` > 1. "
            f"Received: micro_batches={micro_batches}"
        )


def _is_real(value):
    """A Python or NumPy real number, not a boolean."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )


def sam_gradients(
    model,
    x,
    y,
    loss_fn,
    sample_weight=None,
    rho=0.05,
    adaptive=False,
    eta=0.01,
    micro_batches=1,
    sync_perturbations=False,
    optimizer=None,
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
    gradients yourself.

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
            instance, a name such as `"sparse_categorical_crossentropy"`,
            or a function `fn(y_true, y_pred)` of per-example losses (e.g.
            `keras.losses.sparse_categorical_crossentropy`), which is
            weighted by `sample_weight` and averaged over the batch as
            Keras does. A function whose third parameter is required or
            named `sample_weight` is called as
            `loss_fn(y_true, y_pred, sample_weight)`, must return a scalar,
            and is used as is (under a strategy, divide it by the number
            of replicas, as Keras' losses do).
        sample_weight: optional per-example weights.
        rho: the neighbourhood radius ρ ≥ 0: a number, a float
            `keras.Variable`, or a schedule of `optimizer.iterations`.
            `0` gives the plain gradient. Defaults to `0.05`.
        adaptive: use ASAM's scale-invariant ε. Defaults to `False`.
        eta: ASAM's η > 0. Defaults to `0.01`.
        micro_batches: split the batch into this many parts, each with
            its own ε, and average their gradients (m-sharpness with
            m = batch size / micro_batches; unequal parts are weighted by
            their size, see `compute_sam_gradients`). Defaults to `1`.
        sync_perturbations: inside `tf.distribute`, all-reduce the clean
            gradient before computing ε, so every replica uses the ε of the
            global batch. Defaults to `False` (each replica uses its own).
        optimizer: optional Keras optimizer whose `scale_loss` is applied
            before differentiating (needed for a `LossScaleOptimizer`).

    Returns:
        `(loss, gradients)`: the clean loss (scalar; under a strategy, this
        replica's share, see above) and a list of gradients aligned with
        `model.trainable_variables`.
    """
    validate_sam_arguments(
        rho, eta, micro_batches, sync_perturbations, adaptive
    )
    strategy = tf.distribute.get_strategy()
    if (
        strategy.num_replicas_in_sync > 1
        and tf.distribute.in_cross_replica_context()
    ):
        raise ValueError(
            "`sam_gradients` must be called in each replica, inside "
            "`strategy.run(...)`: in the cross-replica context of "
            f"{type(strategy).__name__} with "
            f"{strategy.num_replicas_in_sync} replicas, the gradients would "
            "not be averaged across replicas."
        )
    if isinstance(rho, keras.Variable):
        rho = ops.cast(rho.value, "float32")
    elif callable(rho):
        if optimizer is None:
            raise ValueError(
                "A schedule `rho` is a function of the step: pass the "
                "`optimizer` whose `iterations` it follows. Received: "
                f"rho={rho!r}, optimizer=None"
            )
        rho = ops.cast(rho(optimizer.iterations), "float32")
    loss_fn = _loss_function(loss_fn)

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

    result = compute_sam_gradients(
        model,
        compute_loss,
        x,
        y,
        sample_weight,
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        micro_batches=micro_batches,
        sync_perturbations=sync_perturbations,
        scale_loss=None if optimizer is None else optimizer.scale_loss,
    )
    return result.loss, result.gradients


def _loss_function(loss_fn):
    """`loss_fn` as `f(y_true, y_pred, sample_weight)` giving a scalar."""
    if isinstance(loss_fn, (str, dict)):
        try:
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
    if _takes_sample_weight(loss_fn):
        return loss_fn
    return _PerExampleLoss(loss_fn)


def _takes_sample_weight(fn):
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = []
    for p in parameters:
        if p.name == "sample_weight" or p.kind == p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p)
    required = inspect.Parameter.empty
    return len(positional) >= 3 and positional[2].default is required


class _PerExampleLoss(keras.losses.Loss):
    """A function `fn(y_true, y_pred)` reduced as Keras' losses are.

    `keras.losses.Loss` weights the per-example values by `sample_weight`,
    averages them over the batch and divides by the number of replicas.
    """

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _scale_loss_for_replicas(loss):
    # As Keras' losses and `compute_loss` do under tf.distribute: summing
    # the replicas' gradients then averages them.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss / replicas
    return loss


def compute_sam_gradients(
    model,
    compute_loss,
    x,
    y,
    sample_weight=None,
    rho=0.05,
    adaptive=False,
    eta=0.01,
    micro_batches=1,
    sync_perturbations=False,
    scale_loss=None,
    epsilon=perturbations.DEFAULT_EPSILON,
    perturbed_mask=None,
    should_perturb=None,
    combine=None,
    fallback=None,
    adaptive_variables="weights",
):
    """The SAM step behind `sam_gradients` and `SAMModel.train_step`.

    `compute_loss(x, y, y_pred, sample_weight)` must return the total loss,
    including `model.losses`; it is called inside the pass's stateless scope,
    so regularizers see the weights of that pass. Metric variables that it
    updates during the clean pass keep their updates; those of the perturbed
    pass are dropped.

    **Micro-batches.** With `micro_batches=k` and `n` examples, the batch is
    cut into `k` consecutive parts, the first `n mod k` of ⌈n/k⌉ examples
    and the others of ⌊n/k⌋ (as `np.array_split`; parts left empty when
    `n < k` contribute nothing). Each part `B_i` of `n_i` examples gets its
    own ε from its own clean gradient, and the step returns

    ```
    Σ_i (n_i / n) ∇L_{B_i}(w + ε_i)
    ```

    the mean over parts weighted by their share of the examples: the plain
    mean when `k` divides `n`, and the full-batch gradient when ρ = 0. The
    loss, the sharpness, the clean gradient norm and the updates of
    BatchNorm moving statistics are averaged with the same weights. The
    same numbers come out in eager, graph and XLA execution.

    **ρ = 0.** The perturbed pass is not computed: when `rho` is `0`, or at
    run time when a tensor `rho` is `0` (a schedule that reaches 0), the
    step returns the clean gradients, without calling `combine`.

    The variants of `SAMModel` enter through four optional hooks:

    - `perturbed_mask`: booleans aligned with the trainable variables; ε is
      computed from, and added to, the selected variables only (SAM-ON).
    - `should_perturb(clean_gradients)`: a boolean scalar, asked once per
      step with the clean gradients of the whole batch (the weighted mean
      over micro-batches); when false the perturbed passes are skipped (not
      computed) and the step uses `fallback(clean_gradients)`, by default
      the clean gradients. It must decide the same on every replica.
    - `combine(clean_gradients, sam_gradients)`: the gradients of a SAM
      step, by default `sam_gradients` (GSAM, LookSAM); applied to each
      micro-batch.

    `adaptive_variables` chooses, with `adaptive=True`, the variables whose
    ε is scaled by `T_w = |w| + η`: `"weights"`, every variable except
    biases and normalization offsets (variables named `bias` or `beta`),
    which get `T = 1`, as in the ASAM authors' code; or `"all"`.

    Returns:
        A `SAMResult`.
    """
    scale_loss = scale_loss or (lambda loss: loss)
    trainable = model.trainable_variables
    non_trainable = model.non_trainable_variables
    weights = [tf.convert_to_tensor(v.value) for v in trainable]
    initial_state = [tf.convert_to_tensor(v.value) for v in non_trainable]
    adaptive_mask = (
        adaptive_variables_mask(trainable, adaptive_variables)
        if adaptive
        else None
    )

    parts = []
    state = initial_state
    for fraction, (xs, ys, sws) in _split_batch(
        (x, y, sample_weight), micro_batches
    ):
        loss, y_pred, grads, new_state = _forward_and_gradients(
            model,
            compute_loss,
            weights,
            state,
            xs,
            ys,
            sws,
            scale_loss,
            keep_metric_updates=True,
        )
        selected = grads
        if perturbed_mask is not None:
            selected = [
                g if on else None for g, on in zip(grads, perturbed_mask)
            ]
        if sync_perturbations:
            # Outside the conditionals: tf.distribute cannot all-reduce
            # inside a cond, so the all-reduce runs on every step.
            selected = all_reduce_sum(selected)
        parts.append(
            _Part(
                fraction,
                (xs, ys, sws),
                state,
                loss,
                y_pred,
                grads,
                selected,
                new_state,
            )
        )
        state = _advance_counters(state, new_state)

    fractions = [part.fraction for part in parts]
    clean = _weighted_gradients([part.grads for part in parts], fractions)

    def perturbed_step():
        step_grads, sharpness = [], []
        for part in parts:
            if adaptive:
                eps = perturbations.asam_perturbation(
                    part.selected,
                    weights,
                    rho,
                    eta,
                    epsilon,
                    adaptive_mask=adaptive_mask,
                )
            else:
                eps = perturbations.sam_perturbation(
                    part.selected, rho, epsilon
                )
            perturbed = [
                w if e is None else w + e for w, e in zip(weights, eps)
            ]
            perturbed_loss, _, sam_grads, _ = _forward_and_gradients(
                model,
                compute_loss,
                perturbed,
                part.state,
                *part.data,
                scale_loss,
                keep_metric_updates=False,
            )
            if combine is not None:
                sam_grads = combine(part.grads, sam_grads)
            step_grads.append(sam_grads)
            sharpness.append(perturbed_loss - part.loss)
        return (
            _weighted_gradients(step_grads, fractions),
            _weighted_mean(sharpness, fractions),
        )

    def clean_step():
        return clean, ops.zeros((), "float32")

    def base_step():
        return (fallback or (lambda g: g))(clean), ops.zeros((), "float32")

    if isinstance(rho, (int, float)):
        sam_step = perturbed_step if rho > 0 else clean_step
        ran = ops.convert_to_tensor(rho > 0)
    else:
        ran = ops.greater(rho, 0)

        def sam_step():
            return _cond(ran, perturbed_step, clean_step, clean)

    if should_perturb is None:
        grads, sharpness = sam_step()
    else:
        decision = should_perturb(clean)
        ran = ops.logical_and(decision, ran)
        grads, sharpness = _cond(decision, sam_step, base_step, clean)

    _assign(
        non_trainable,
        _merge_states(
            initial_state,
            state,
            [part.new_state for part in parts],
            fractions,
        ),
    )
    y_pred = parts[0].y_pred
    if len(parts) > 1:
        y_pred = tree.map_structure(
            lambda *t: ops.concatenate(t, axis=0),
            *[part.y_pred for part in parts],
        )
    return SAMResult(
        loss=_weighted_mean([part.loss for part in parts], fractions),
        y_pred=y_pred,
        gradients=grads,
        sharpness=ops.cast(sharpness, "float32"),
        grad_norm=_weighted_mean(
            [perturbations.global_norm(part.grads) for part in parts],
            fractions,
        ),
        perturbed=ran,
    )


_Part = collections.namedtuple(
    "_Part",
    ["fraction", "data", "state", "loss", "y_pred", "grads", "selected"]
    + ["new_state"],
)


def adaptive_variables_mask(variables, adaptive_variables="weights"):
    """ASAM's `adaptive_mask` for `variables`, or `None` for all of them.

    `"weights"`: `True` for every variable except biases and normalization
    offsets (named `bias` or `beta`), as in the ASAM authors' code; `"all"`:
    `None`, every variable.
    """
    if adaptive_variables == "all":
        return None
    if adaptive_variables != "weights":
        raise ValueError(
            "`adaptive_variables` must be 'weights' or 'all'. Received: "
            f"adaptive_variables={adaptive_variables!r}"
        )
    return [v.name not in _OFFSET_NAMES for v in variables]


_OFFSET_NAMES = ("bias", "beta")


def _forward_and_gradients(
    model,
    compute_loss,
    weights,
    state,
    x,
    y,
    sample_weight,
    scale_loss,
    keep_metric_updates,
):
    """Loss, predictions, gradients and new state of one pass at `weights`.

    The new state has one entry per non-trainable variable: its updated
    value, or `None` where the pass left it unchanged.
    """
    non_trainable = model.non_trainable_variables
    mapping = list(zip(model.trainable_variables, weights))
    mapping.extend(zip(non_trainable, state))
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(weights)
        with _stateless_scope(mapping) as scope:
            before = [scope.get_current_value(v) for v in non_trainable]
            y_pred = model(x, training=True)
            loss = compute_loss(x, y, y_pred, sample_weight)
        scaled_loss = scale_loss(loss)
    gradients = tape.gradient(scaled_loss, weights)
    after = [scope.get_current_value(v) for v in non_trainable]
    new_state = [
        new if new is not old else None for old, new in zip(before, after)
    ]
    if keep_metric_updates:
        for v in model.metrics_variables:
            value = scope.get_current_value(v)
            if value is not None:
                v.assign(value)
    return loss, y_pred, gradients, new_state


def _cond(predicate, true_fn, false_fn, like):
    """`tf.cond` over `(gradients, scalar)` pairs whose gradient lists may
    hold `None` entries, where `like` has them."""
    present = [i for i, g in enumerate(like) if g is not None]

    def branch(fn):
        def run():
            gradients, scalar = fn()
            return [gradients[i] for i in present], scalar

        return run

    chosen, scalar = tf.cond(predicate, branch(true_fn), branch(false_fn))
    result = [None] * len(like)
    for i, g in zip(present, chosen):
        result[i] = g
    return result, scalar


def _stateless_scope(mapping):
    # Imported here: StatelessScope is exported by keras but its
    # `collect_losses` is how `add_loss` terms stay visible inside it.
    from keras import StatelessScope

    return StatelessScope(state_mapping=mapping, collect_losses=True)


def _split_batch(data, parts):
    """`(fraction, part)` for `parts` consecutive slices of a nested batch.

    With `n` examples, the first `n % parts` slices hold `n // parts + 1`
    examples and the others `n // parts`, as `np.array_split` cuts; each
    slice comes with its share `n_i / n` of the examples. When `n` is known
    while tracing, empty slices (`n < parts`) are left out; otherwise they
    come with the share 0.
    """
    if parts == 1:
        return [(1.0, data)]
    first = next(t for t in tree.flatten(data) if t is not None)
    n = first.shape[0]
    if n is None:
        n = tf.shape(first)[0]
    size, extra = n // parts, n % parts
    slices = []
    for i in range(parts):
        if isinstance(n, int):
            start = i * size + min(i, extra)
            length = size + (1 if i < extra else 0)
            if length == 0:
                continue
            fraction = length / n
        else:
            start = i * size + tf.minimum(i, extra)
            length = size + tf.cast(i < extra, n.dtype)
            fraction = tf.cast(length, "float32") / tf.cast(n, "float32")
        slices.append(
            (
                fraction,
                tree.map_structure(
                    lambda t, a=start, b=start + length: (
                        None if t is None else t[a:b]
                    ),
                    data,
                ),
            )
        )
    return slices


def _weighted_mean(values, fractions):
    """`Σ_i f_i v_i`; a part with `f_i = 0` (an empty slice) adds 0."""
    if len(values) == 1:
        return values[0]
    total = None
    for value, fraction in zip(values, fractions):
        term = value * ops.cast(fraction, value.dtype)
        if not isinstance(fraction, float):
            term = ops.where(fraction > 0, term, ops.zeros_like(term))
        total = term if total is None else total + term
    return total


def _weighted_gradients(gradient_lists, fractions):
    if len(gradient_lists) == 1:
        return gradient_lists[0]
    return [
        None
        if any(g is None for g in grads)
        else _weighted_mean(grads, fractions)
        for grads in zip(*gradient_lists)
    ]


def _advance_counters(state, new_state):
    """Threads integer state (seeds) from one micro-batch to the next.

    Floating-point state (moving statistics) restarts from its initial value
    for every micro-batch; `_merge_states` averages those updates.
    """
    return [
        old if new is None or _is_floating(old) else new
        for old, new in zip(state, new_state)
    ]


def _merge_states(initial_state, threaded_state, updates, fractions):
    """The state to write back after all micro-batches, `None` if unchanged.

    Float state gets the mean of the micro-batches' updates weighted by
    their share of the examples, the way tf.distribute averages a BatchNorm
    update across replicas; integer state (seeds) takes the value threaded
    through the micro-batches.
    """
    merged = []
    for i, old in enumerate(initial_state):
        values = [u[i] for u in updates]
        if all(v is None for v in values):
            merged.append(None)
        elif not _is_floating(old):
            merged.append(threaded_state[i])
        elif len(values) == 1:
            merged.append(values[0])
        else:
            deltas = [
                ops.zeros_like(old) if v is None else v - old for v in values
            ]
            merged.append(old + _weighted_mean(deltas, fractions))
    return merged


def _assign(variables, values):
    for variable, value in zip(variables, values):
        if value is not None:
            variable.assign(value)


def _is_floating(tensor):
    return tf.as_dtype(tensor.dtype).is_floating


def all_reduce_sum(tensors):
    """Sums `tensors` over the replicas of the current tf.distribute context."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors
    present = [t for t in tensors if t is not None]
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if t is None else next(reduced) for t in tensors]
