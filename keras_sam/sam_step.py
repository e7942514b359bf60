"""One SAM step as a function: the loss and the SAM gradients of a batch.

`compute_sam_gradients` is the step behind `SAMModel.train_step` and the
custom loops' `sam_gradients` (`keras_sam.custom_loops`), so all share one
implementation.

Both passes, backward included, run in a `keras.StatelessScope`: the weights
and the non-trainable state (BatchNorm statistics, seeds) are handed in as
tensors, so no pass writes to a variable. The clean pass's state is written
back once; the perturbed pass's is dropped, with its float8 scaling state
(Keras returns it as gradients: `selection.split_assigned`) and what it
wrote to a torch module's buffers (`selection.module_buffers_kept`). It
starts from the clean pass's seeds: dropout draws the same masks in both.
"""

import collections

from keras import ops

from keras_sam import backend
from keras_sam import batch_parts
from keras_sam import compat
from keras_sam import options as options_lib
from keras_sam import perturbations
from keras_sam import selection
from keras_sam import switching

SAMResult = collections.namedtuple(
    "SAMResult",
    "loss y_pred gradients sharpness grad_norm perturbed sam_step",
    defaults=(None, None, None, None),
)
SAMResult.__doc__ = """What one SAM step computed.

Quantities "averaged over micro-batches" are weighted by each micro-batch's
share of the examples (see `compute_sam_gradients`).

Attributes:
    loss: the loss at the current weights w (the clean pass), averaged over
        micro-batches, as returned by the loss function (not loss-scaled).
    y_pred: the clean pass's predictions for the whole batch.
    gradients: ∇L(w + ε), one per trainable variable (`None` where the loss
        does not depend on it; float8 scaling state: as the first pass left it),
        times the optimizer's loss scale if any; averaged over micro-batches.
    sharpness: L(w + ε) − L(w), the perturbed pass's loss minus the clean
        pass's, averaged over micro-batches; `0` when the perturbed pass did
        not run.
    grad_norm: ‖∇L(w)‖₂ of each micro-batch's clean gradient over the
        trainable variables (not float8 scaling state), averaged over
        micro-batches, times the loss scale like `gradients`; with
        `sync_perturbations`, that of the replicas' mean clean gradient.
    perturbed: a boolean scalar, whether the perturbed pass ran (false when
        ρ = 0 or when the `switching` policy declined).
    sam_step: a boolean scalar, the `switching` policy's decision (true
        without a policy).
"""


def compute_sam_gradients(
    model,
    compute_loss,
    x,
    y,
    sample_weight=None,
    options=None,
    *,
    rho=None,
    scale_loss=None,
    perturbed_mask=None,
    step=None,
    looksam_directions=None,
    momentums=None,
    friendly_averages=None,
    epsilon=perturbations.DEFAULT_EPSILON,
):
    """The SAM step behind `sam_gradients` and `SAMModel.train_step`.

    `compute_loss(x, y, y_pred, sample_weight)` must return the total loss,
    including `model.losses`; it is called inside the pass's stateless scope,
    so regularizers see the weights of that pass. Metric variables that it
    updates during the clean pass keep their updates; those of the perturbed
    pass are dropped. The state (BatchNorm statistics, seeds, float8
    scaling state) is the clean pass's.

    **Micro-batches.** With `micro_batches=k` and `n` examples, the batch is
    cut into `k` consecutive parts, the first `n mod k` of ⌈n/k⌉ examples
    and the others of ⌊n/k⌋ (as `np.array_split`; parts left empty when
    `n < k` contribute nothing). Each part `B_i` of `n_i` examples gets its
    own ε from its own clean gradient, and the step returns

    ```
    Σ_i (n_i / n) ∇L_{B_i}(w + ε_i)
    ```

    the mean over parts weighted by their share of the examples (the plain
    mean when `k` divides `n`). The loss, the sharpness, the clean gradient
    norm and BatchNorm's moving statistics are averaged with the same
    weights; BatchNorm normalizes each part with its own batch statistics.

    **Across devices.** Under `tf.distribute` this function runs in each
    replica, on its shard. Under `keras.distribution` on JAX it runs once on
    the global batch, and in a SAM step each device's shard (consecutive
    rows, as Keras shards a batch) is split into `micro_batches` parts, so
    the numbers are those of a `tf.distribute` replica's step, BatchNorm
    normalizing over each shard. Equal shards (without LookSAM) run as one
    computation vmapped over them (`batch_parts.map_shards`), which keeps
    each shard's passes, ε and `w + ε` on the devices that hold its rows;
    each shard draws its own random numbers (its seeds folded with its
    index), the same in both its passes, and the seeds advance as in one
    step. `sync_perturbations=True` computes one ε from the gradient of the
    global batch, over which BatchNorm then normalizes (the global batch
    with a per-shard ε would need it evaluated at every shard's `w + ε`).

    **When the perturbed pass runs.** Only when ρ ≠ 0 (checked at run time
    for a tensor ρ, which `schedules.current_rho` makes NaN where it is
    negative) and, given a `switching` policy, when the policy says
    so. Otherwise the step is the base optimizer's step: one clean pass on
    the whole batch, whatever the parts of a SAM step would be (exactly
    Keras' own step, BatchNorm normalizing over the whole batch), and it
    returns the clean gradient, or LookSAM's `g + α (‖g‖/‖g_v‖) g_v` on the
    steps that the policy declined. A SAM step with several parts runs their
    clean passes instead of the whole batch's; a policy that decides from
    the gradient norm (AE-SAM) needs the whole batch's clean pass first, so
    its SAM steps with several parts cost one pass more.

    The variants of `SAMModel`, each visible in the code below:

    - `adaptive`, `eta`, `adaptive_variables`: ASAM's ε (see
      `selection.adaptive_variables_mask`).
    - `perturbed_mask`: booleans aligned with the trainable variables; ε is
      computed from, and added to, the selected variables only (SAM-ON).
    - `gsam_alpha`: GSAM's α; the perturbed gradient of each micro-batch is
      combined with its clean gradient by `perturbations.gsam_gradients`.
    - `switching`, `step`: a `keras_sam.switching.SwitchingPolicy`, asked
      once per step with `step` and ‖∇L(w)‖² of the global batch (unscaled
      by loss scaling). It decides the same on every replica.
    - `looksam_alpha`, `looksam_directions`: LookSAM's α and the variables
      holding its direction `g_v`, which SAM steps overwrite (keeping the
      old one when the new one is not finite).
    - `perturbation="momentum"`, `momentums`: Momentum-SAM (Becker et al.,
      2024), no clean pass; ε = ρ m/‖m‖₂ along the optimizer's momentum `m`
      (Keras' SGD: `m ← μ m − lr g`, `w ← w + m`; the authors' PyTorch
      `w − ρ v/‖v‖` is the same point at a constant learning rate), and the
      gradient is ∇L(w + ε), the only pass. Its loss, BatchNorm statistics
      and `grad_norm` are those of that pass, `sharpness` is 0, and the
      first step (`m = 0`) has ε = 0. `perturbed_mask` applies; the options
      that need a clean gradient or several ε do not.
    - `perturbation="friendly"`, `friendly_averages`: F-SAM (Li et al.,
      CVPR 2024), ε along `d = g − σ m` (`perturbations.friendly_direction`)
      with `m` the moving average of the earlier clean gradients, updated
      after `d` is formed, on every step, as in the authors' code
      (`perturbations.friendly_average`); σ = 0 is SAM. `g` is the gradient
      ε would be computed from, divided by the loss scale.

    Returns:
        A `SAMResult`.
    """
    options = options or options_lib.SAMOptions()
    selection.check_layers_read_variables(model)
    rho = options.rho if rho is None else rho
    scale_loss = scale_loss or (lambda loss: loss)
    trainable = model.trainable_variables
    non_trainable = compat.stateful_variables(model)
    weights = [ops.convert_to_tensor(v.value) for v in trainable]
    initial_state = [ops.convert_to_tensor(v.value) for v in non_trainable]
    adaptive_mask = (
        selection.adaptive_variables_mask(trainable, options.adaptive_variables)
        if options.adaptive
        else None
    )

    metrics = model.metrics_variables
    initial_metrics = [ops.convert_to_tensor(v.value) for v in metrics]
    # Each device's shard gets its own ε ("Across devices" above).
    shards = batch_parts.shard_count(options)
    parts_count = options.micro_batches * shards
    batch_parts.check_one_epsilon(options)
    old_directions = None
    if looksam_directions is not None:
        old_directions = [d.value for d in looksam_directions]

    def perturbed_only(tensors):
        """`tensors` with `None` for the variables ε leaves alone (SAM-ON)."""
        if perturbed_mask is None:
            return tensors
        return [t if on else None for t, on in zip(tensors, perturbed_mask)]

    def clean_passes(count, data=(x, y, sample_weight), state=initial_state):
        """The clean pass at w on each of `count` parts of `data`."""
        parts, metric_state = [], initial_metrics
        for fraction, batch in batch_parts.split(data, count):
            rng = backend.random_state()
            clean = _forward_and_gradients(
                model,
                compute_loss,
                weights,
                state,
                metric_state,
                compat.unshared_inputs(batch),  # may be changed in place
                scale_loss,
            )
            gradients, replicas = clean.gradients, 1
            if options.sync_perturbations:
                # The global batch's gradient (Keras divides each replica's
                # loss by their count), for ε and the logged ‖g‖, outside
                # the conditionals (one part: see below): tf.distribute
                # cannot all-reduce inside a cond.
                gradients = backend.all_reduce(gradients, "sum")
                replicas = backend.replica_count()
            for_epsilon = perturbed_only(gradients)
            # In a replica's units, as the norm of a replica's gradient.
            norm = perturbations.global_norm(gradients) / replicas
            parts.append(
                _Part(fraction, batch, state, rng, clean, for_epsilon, norm)
            )
            state = batch_parts.advance_counters(state, clean.state)
            metric_state = batch_parts.threaded(metric_state, clean.metrics)
        return _Clean(parts, state, metric_state, backend.random_state())

    def sam_step(clean):
        """The perturbed pass of each part, at its own w + ε."""
        perturbed_gradients, sharpness, directions = [], [], old_directions
        with selection.module_buffers_kept(model):
            for part in clean.parts:
                if options.adaptive:
                    epsilons = perturbations.asam_perturbation(
                        part.for_epsilon,
                        weights,
                        rho,
                        options.eta,
                        epsilon,
                        adaptive_mask=adaptive_mask,
                    )
                else:
                    epsilons = perturbations.sam_perturbation(
                        part.for_epsilon, rho, epsilon
                    )
                perturbed_weights = [
                    w if e is None else w + e for w, e in zip(weights, epsilons)
                ]
                backend.set_random_state(part.random_state)
                # Maps (and drops) the metrics: PyTorch compiles one program.
                perturbed = _forward_and_gradients(
                    model,
                    compute_loss,
                    perturbed_weights,
                    part.state,
                    initial_metrics,
                    part.batch,
                    scale_loss,
                )
                gradients = perturbed.gradients
                if options.looksam_alpha is not None:
                    new = perturbations.looksam_direction(
                        part.clean.gradients, gradients
                    )
                    finite = ops.isfinite(perturbations.global_norm(new))
                    directions = [
                        old if d is None else ops.where(finite, d, old)
                        for d, old in zip(new, old_directions)
                    ]
                if options.gsam_alpha:
                    gradients = perturbations.gsam_gradients(
                        part.clean.gradients, gradients, options.gsam_alpha
                    )
                perturbed_gradients.append(gradients)
                sharpness.append(perturbed.loss - part.clean.loss)
        backend.set_random_state(clean.random_state_after)
        fractions = [part.fraction for part in clean.parts]
        return _outcome(
            clean,
            batch_parts.weighted_gradients(perturbed_gradients, fractions),
            ops.cast(
                batch_parts.weighted_mean(sharpness, fractions), "float32"
            ),
            directions,
        )

    def parts_step():
        """The SAM step of every part: the data shards' as one computation
        where the backend can (`batch_parts.map_shards`; not with LookSAM's
        shard directions), otherwise each part's in turn."""
        if shards > 1 and options.looksam_alpha is None:
            outcome = batch_parts.map_shards(
                lambda data, state: sam_step(
                    clean_passes(options.micro_batches, data, state)
                ),
                (x, y, sample_weight),
                initial_state,
                initial_metrics,
                shards,
            )
            if outcome is not None:
                return outcome
        return sam_step(clean_passes(parts_count))

    def base_step(clean):
        """The base optimizer's step (LookSAM's on the declined steps)."""
        clean_gradients = batch_parts.weighted_gradients(
            [part.clean.gradients for part in clean.parts],
            [part.fraction for part in clean.parts],
        )
        zero = ops.zeros((), "float32")
        if options.looksam_alpha is None:
            return _outcome(clean, clean_gradients, zero, old_directions)

        def reuse_direction():
            return perturbations.looksam_gradients(
                clean_gradients, old_directions, options.looksam_alpha
            )

        # LookSAM reuses g_v on the steps the policy declined; a SAM step
        # with ρ = 0 is the base step.
        gradients = backend.cond(
            take_sam, lambda: clean_gradients, reuse_direction
        )
        return _outcome(clean, gradients, zero, old_directions)

    def friendly(clean):
        """F-SAM: the whole batch's ε along g − σ m, and m's update."""
        if friendly_averages is None:
            raise ValueError(
                "`perturbation='friendly'` needs `friendly_averages`, as "
                "`SAMModel` passes. Received: friendly_averages=None"
            )
        (part,) = clean.parts
        unit = ops.cast(scale_loss(ops.ones(())), "float32")
        gradients = [
            None if g is None else g / ops.cast(unit, g.dtype)
            for g in backend.to_dense(part.for_epsilon)
        ]
        averages = [ops.convert_to_tensor(m.value) for m in friendly_averages]
        direction = perturbations.friendly_direction(
            gradients, averages, options.friendly_sigma
        )
        part = part._replace(for_epsilon=direction)
        return clean._replace(parts=[part]), perturbations.friendly_average(
            gradients, averages, options.friendly_decay
        )

    def momentum_step():
        """Momentum-SAM's one pass, at w moved along the momentum."""
        directions = perturbed_only(selection.values(momentums))
        epsilons = perturbations.sam_perturbation(directions, rho, epsilon)
        perturbed = _forward_and_gradients(
            model,
            compute_loss,
            [
                w if e is None else w + ops.cast(e, w.dtype)
                for w, e in zip(weights, epsilons)
            ],
            initial_state,
            initial_metrics,
            (x, y, sample_weight),
            scale_loss,
        )
        return _Outcome(
            loss=perturbed.loss,
            y_pred=perturbed.y_pred,
            gradients=perturbed.gradients,
            assigned=perturbed.assigned,
            sharpness=ops.zeros((), "float32"),
            grad_norm=perturbations.global_norm(perturbed.gradients),
            directions=old_directions,
            state=perturbed.state,
            metrics=perturbed.metrics,
        )

    if options.perturbation == "momentum":
        take_sam = True
        run_perturbed = ops.not_equal(rho, 0)
        outcome = momentum_step()
    else:
        # The whole batch's clean pass comes first only where both branches
        # use it (one part) or the policy needs its gradient (AE-SAM); see
        # "When the perturbed pass runs" above.
        whole = None
        needs_norm = (
            options.switching is not None
            and options.switching.needs_gradient_norm
        )
        if parts_count == 1 or needs_norm:
            whole = clean_passes(1)
        if options.perturbation == "friendly":
            whole, new_averages = friendly(whole)
        take_sam = True
        if options.switching is not None:
            squared_norm = None
            if needs_norm:
                squared_norm = switching.squared_gradient_norm(
                    whole.parts[0], scale_loss, options.sync_perturbations
                )
            take_sam = options.switching(step, squared_norm)
        if isinstance(rho, (int, float)):
            run_perturbed = take_sam if rho > 0 else False
        else:
            run_perturbed = ops.logical_and(take_sam, ops.not_equal(rho, 0))

        outcome = backend.cond(
            run_perturbed,
            (lambda: sam_step(whole)) if parts_count == 1 else parts_step,
            lambda: base_step(clean_passes(1) if whole is None else whole),
            run_both=selection.all_reduces_in_passes(model),
        )

    if looksam_directions is not None:
        _assign(looksam_directions, outcome.directions)
    if options.perturbation == "friendly":
        _assign(friendly_averages, new_averages)
    _assign(non_trainable, outcome.state)
    _assign(metrics, outcome.metrics)
    return SAMResult(
        loss=outcome.loss,
        y_pred=outcome.y_pred,
        gradients=selection.with_assigned(outcome.gradients, outcome.assigned),
        sharpness=outcome.sharpness,
        grad_norm=outcome.grad_norm,
        perturbed=ops.convert_to_tensor(run_perturbed),
        sam_step=ops.convert_to_tensor(take_sam),
    )


def _outcome(clean, gradients, sharpness, directions):
    """What a step leaves: its clean passes' results and its gradients."""
    return _Outcome(
        gradients=gradients,
        sharpness=sharpness,
        directions=directions,
        metrics=clean.metrics,
        **batch_parts.merge_parts(clean.parts, clean.state),
    )


_Part = collections.namedtuple(
    "_Part", "fraction batch state random_state clean for_epsilon clean_norm"
)
_Pass = collections.namedtuple(
    "_Pass", "loss y_pred gradients state metrics assigned"
)
_Clean = collections.namedtuple(
    "_Clean", ["parts", "state", "metrics", "random_state_after"]
)
_Outcome = collections.namedtuple(
    "_Outcome",
    "loss y_pred gradients assigned sharpness grad_norm directions state "
    "metrics",
)


def _forward_and_gradients(
    model, compute_loss, weights, state, metric_state, batch, scale_loss
):
    """Loss, predictions, gradients and new state of one pass at `weights`.

    The new state has one entry per non-trainable variable: its updated
    value, or `None` where the pass left it unchanged; so do the metrics
    that the loss updates (`model.metrics_variables`, at `metric_state`).
    """
    x, y, sample_weight = batch
    non_trainable = compat.stateful_variables(model)
    metrics = model.metrics_variables

    def scope_at(weights):
        mapping = list(zip(model.trainable_variables, weights))
        mapping.extend(zip(non_trainable, state))
        mapping.extend(zip(metrics, metric_state))
        return compat.stateless_scope(mapping)

    def objective(weights):
        with scope_at(weights) as scope:
            before = [scope.get_current_value(v) for v in non_trainable]
            metrics_before = [scope.get_current_value(v) for v in metrics]
            y_pred = model(x, training=True)
            loss = compute_loss(x, y, y_pred, sample_weight)
            scaled_loss = scale_loss(loss)
        new_state = _changed(before, scope, non_trainable)
        new_metrics = _changed(metrics_before, scope, metrics)
        return scaled_loss, (loss, y_pred, new_state, new_metrics)

    # PyTorch's checkpoint reruns a rematerialized layer in backward.
    with scope_at(weights):
        (loss, y_pred, new_state, new_metrics), gradients = (
            backend.value_and_gradients(objective, weights)
        )
    gradients, assigned = selection.split_assigned(
        model.trainable_variables, list(gradients)
    )
    return _Pass(loss, y_pred, gradients, new_state, new_metrics, assigned)


def _changed(before, scope, variables):
    """The variables' values in `scope`, `None` where still `before`."""
    after = [scope.get_current_value(v) for v in variables]
    return [None if new is old else new for old, new in zip(before, after)]


def _assign(variables, values):
    for variable, value in zip(variables, values):
        if value is not None:
            variable.assign(value)
