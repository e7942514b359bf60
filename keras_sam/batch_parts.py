"""The parts of a batch that each get their own ε, and their merged results.

A SAM step with `micro_batches=k` (and, under `keras.distribution` on JAX,
each device's shard) cuts the batch into consecutive parts, runs each part's
passes on its own, and merges what they computed: gradients, losses and
BatchNorm statistics weighted by each part's share of the examples, seeds
threaded from one part to the next. Where the backend can, the data shards
run as one computation instead (`map_shards`). See
`sam_step.compute_sam_gradients`.
"""

import keras
from keras import ops
from keras import tree

from keras_sam import backend


def shard_count(options):
    """The data shards that each get their own ε: a device's rows under
    `keras.distribution` (JAX) without `sync_perturbations`, else 1."""
    if options.sync_perturbations:
        return 1
    return backend.data_parallel_shards()


def check_one_epsilon(options):
    """Refuses LookSAM and F-SAM where a step has several ε.

    Each keeps one state (LookSAM's direction, F-SAM's moving average)
    that one ε per step updates, which each data shard (`shard_count`)
    would update in turn. The options refuse several micro-batches; under
    `tf.distribute` each replica runs its own step, with its own copy.
    """
    name = "looksam_alpha" if options.looksam_alpha is not None else None
    if options.perturbation == "friendly":
        name = "perturbation='friendly'"
    shards = shard_count(options)
    if name and shards > 1:
        raise ValueError(
            f"`{name}` keeps one state that one ε per step updates, and "
            "`keras.distribution` gives each data shard its own ε: pass "
            f"`sync_perturbations=True`. Received: {shards} data shards"
        )


def check_loss_reductions(loss, options, weighted):
    """Refuses losses whose parts' weighted mean is not the batch's loss.

    A SAM step in parts (`options.micro_batches`, and `shard_count`)
    weights each part's loss by its share of the examples: the batch's
    loss for a mean over examples (Keras' default reduction), not for a
    "sum" (k parts would take 1/k of the step) or, given sample weights
    (`weighted`), a "mean_with_sample_weight".
    """
    shards = shard_count(options)
    # Without two passes (ρ = 0, Momentum-SAM), one pass on the whole batch.
    if options.micro_batches * shards == 1 or not options.takes_two_passes:
        return
    refused = {"sum", "mean_with_sample_weight"} if weighted else {"sum"}
    for function in tree.flatten(loss):
        reduction = getattr(function, "reduction", None)
        if reduction in refused:
            raise ValueError(
                "A SAM step in parts weights each part's loss by its share "
                "of the examples, which changes a loss reduced with "
                f"{reduction!r}: pass `reduction='sum_over_batch_size'`, or "
                "one part (`micro_batches=1`, and `sync_perturbations=True` "
                "under `keras.distribution`). Received: micro_batches="
                f"{options.micro_batches} on {shards} data shard(s), loss="
                f"{function!r}"
            )


def threaded(values, updates):
    """`values` with each non-`None` entry of `updates` taken instead."""
    return [old if new is None else new for old, new in zip(values, updates)]


def split(data, parts):
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
        n = ops.shape(first)[0]
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
            start = i * size + ops.minimum(i, extra)
            length = size + ops.cast(i < extra, n.dtype)
            fraction = ops.cast(length, "float32") / ops.cast(n, "float32")
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


def weighted_mean(values, fractions):
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


def weighted_gradients(gradient_lists, fractions):
    if len(gradient_lists) == 1:
        return gradient_lists[0]
    # Sparse gradients of different micro-batches cover different rows.
    gradient_lists = [backend.to_dense(g) for g in gradient_lists]
    return [
        None
        if any(g is None for g in grads)
        else weighted_mean(grads, fractions)
        for grads in zip(*gradient_lists)
    ]


def advance_counters(state, new_state):
    """Threads integer state (seeds) from one micro-batch to the next.

    Floating-point state (moving statistics) restarts from its initial value
    for every micro-batch; `merge_states` averages those updates.
    """
    return [
        old if new is None or _is_floating(old) else new
        for old, new in zip(state, new_state)
    ]


def merge_states(initial_state, threaded_state, updates, fractions):
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
            merged.append(old + weighted_mean(deltas, fractions))
    return merged


def merge_parts(parts, threaded_state):
    """What the parts' clean passes leave, merged: the loss and ‖∇L(w)‖
    averaged with the parts' shares, the predictions concatenated, the
    state as `merge_states` merges it, and the float8 scaling state
    (`selection.split_assigned`) as the parts' elementwise maximum, as
    Keras' gradient accumulation combines it."""
    fractions = [part.fraction for part in parts]
    y_pred = parts[0].clean.y_pred
    if len(parts) > 1:
        y_pred = tree.map_structure(
            lambda *t: ops.concatenate(t, axis=0),
            *[part.clean.y_pred for part in parts],
        )
    return dict(
        loss=weighted_mean([part.clean.loss for part in parts], fractions),
        y_pred=y_pred,
        grad_norm=weighted_mean([p.clean_norm for p in parts], fractions),
        assigned=[
            None if a[0] is None else ops.max(ops.stack(a), 0)
            for a in zip(*[part.clean.assigned for part in parts])
        ],
        state=merge_states(
            parts[0].state,
            threaded_state,
            [part.clean.state for part in parts],
            fractions,
        ),
    )


def map_shards(step, data, state, metric_state, shards):
    """`step(shard, state)` of each of `shards` data shards, merged.

    Where the backend maps over the shards (`backend.map_shards`: JAX under
    `keras.distribution`), the shards' steps run as one computation that
    keeps each on the devices holding its rows. `step` returns a SAM
    step's outcome; the merged one averages the loss, gradients, sharpness,
    gradient norm and BatchNorm statistics' updates over the shards (equal
    shares, as `merge_states`), takes the float8 scaling state's maximum
    (as `merge_parts`), concatenates the predictions, takes the
    seeds from the first shard (a step's advance) and adds up the shards'
    metric updates, as if threaded. Returns `None` where the backend does
    not map or the batch does not split into equal shards.
    """
    first = next(t for t in tree.flatten(data) if t is not None)
    n = first.shape[0]
    if backend.map_shards is None or n is None or n % shards:
        return None
    out = backend.map_shards(step, data, state, shards)

    def mean(t):
        return None if t is None else ops.mean(t, axis=0)

    def merged_state(new):
        return (
            new[0] if new is not None and not _is_floating(new) else mean(new)
        )

    return out._replace(
        loss=mean(out.loss),
        y_pred=tree.map_structure(
            lambda t: ops.reshape(t, (n, *t.shape[2:])), out.y_pred
        ),
        gradients=[mean(g) for g in out.gradients],
        assigned=[None if a is None else ops.max(a, 0) for a in out.assigned],
        sharpness=mean(out.sharpness),
        grad_norm=mean(out.grad_norm),
        state=[merged_state(new) for new in out.state],
        metrics=[
            old + ops.sum(new - old, axis=0)
            for old, new in zip(metric_state, out.metrics)
        ],
    )


def _is_floating(tensor):
    return keras.backend.is_float_dtype(tensor.dtype)
