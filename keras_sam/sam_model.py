"""`SAMModel`: wrap any Keras model to train it with SAM or ASAM."""

import warnings

import keras
from keras import ops
from keras import tree

from keras_sam import backend
from keras_sam import batch_parts
from keras_sam import compat
from keras_sam import options as options_lib
from keras_sam import sam_step
from keras_sam import schedules
from keras_sam import selection
from keras_sam import wrapper


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(wrapper.BaseWrapper, keras.Model):
    """Trains a Keras model with Sharpness-Aware Minimization.

    `SAMModel(base)` is a model whose `fit` minimizes the SAM objective of
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization" (ICLR 2021, arXiv 2010.01412). Each training step, on
    the batch `B` and the weights `w`:

    ```
    g     = ∇L_B(w)                                 # clean pass
    ε     = ρ · g / (‖g‖₂ + 1e-12)                  # SAM
    ε     = ρ · T_w² g / (‖T_w g‖₂ + 1e-12),        # ASAM (adaptive=True),
            T_w = |w| + η on weights, 1 on biases   # Kwon et al., 2021
    g_SAM = ∇L_B(w)|_{w + ε}                        # perturbed pass
    w     ← optimizer.apply_gradients(g_SAM at w)
    ```

    `L_B` is the compiled loss plus the model's regularization and
    `add_loss` terms, computed by `compute_loss`, so weight regularizers are
    evaluated at `w + ε` in the perturbed pass. When `base` overrides
    `compute_loss` (a custom objective), `base.compute_loss` is `L_B` in
    both passes and in `evaluate`; a call to `super().compute_loss` inside
    it computes the loss given to `SAMModel.compile` (or the base's own if
    the base was compiled: `fit` warns if the two differ). Both passes call
    the model with `training=True` (BatchNorm normalizes with batch
    statistics) on the same batch with the same random state (the same
    dropout masks). The moving statistics of BatchNorm and the seeds are
    updated once per step (the seeds once per micro-batch), from the clean
    pass. The perturbed pass writes no variable: it is evaluated statelessly
    at `w + ε`. The optimizer then applies `g_SAM` at `w` as usual
    (momentum, weight decay, clipping, gradient accumulation, loss scaling).

    **Logged loss and metrics** are those of the clean pass at `w`, as in a
    plain `fit`, so they compare directly with a model trained without SAM.
    Two more metrics show what SAM does (`fit` only, not `evaluate`):

    - `sharpness`: `L_B(w + ε) − L_B(w)`, the perturbed pass's loss minus
      the clean loss, averaged over the steps that ran the perturbed pass
      (steps left to the base optimizer by `switching`, or with ρ = 0, are
      not counted; an epoch without any logs 0).
    - `grad_norm`: `‖∇L_B(w)‖₂` of the clean gradient, unscaled by loss
      scaling, averaged over the steps.

    Both are computed per part of the batch that has its own ε (a
    replica's share, a micro-batch) and averaged over the parts, so across
    replicas they are the mean of the per-replica values (one ε for the
    global batch with `sync_perturbations=True`: its ‖g‖). A step whose
    values are not finite (a mixed-precision overflow, which the
    loss-scale optimizer skips) is left out. With `rho=0` (a number) the
    step is exactly the base optimizer's, at its cost, and `fit` logs what
    the base model's `fit` does; a schedule or Variable ρ at 0 skips the
    perturbed pass at run time.

    **Across replicas** (`tf.distribute`), each replica computes ε from the
    gradient of its own share of the batch (the paper's default; m-sharpness
    with `m` = per-replica batch size) and only the perturbed gradients are
    aggregated. `sync_perturbations=True` all-reduces the clean gradient
    first, so every replica uses the ε of the whole global batch (m = global
    batch size). `micro_batches=k` splits each replica's batch into `k`
    parts, each with its own ε, and averages their perturbed gradients:
    m = global batch size / (replicas · k). A batch that `k` does not
    divide (a partial last batch) is cut as `np.array_split` cuts it, and
    the parts are averaged weighted by their number of examples, so every
    example counts the same. Under `keras.distribution.DataParallel` (JAX)
    each device's shard is a replica's share in the same way.

    **BatchNorm** normalizes over the examples that share an ε: in a SAM
    step, each part (a replica's or a device's shard, a micro-batch) with
    its own batch statistics, as in the paper's code, and the moving
    statistics take the parts' mean update; with `sync_perturbations=True`,
    the global batch under `keras.distribution` (a `tf.distribute` replica
    normalizes its own share, as in a plain `fit`). A step without SAM
    (ρ = 0, or a step that `switching` declines) is the base step on the
    whole batch, so it equals a plain `fit`'s step, BatchNorm included.

    **Variants** (each an option of this one step; their defaults give
    exact SAM):

    - ρ schedule: `rho` may be a schedule of the step, e.g.
      `keras_sam.schedules.RhoFollowingLearningRate` (GSAM's ρ_t).
    - GSAM (Zhuang et al., ICLR 2022), `gsam_alpha=α > 0`: apply
      `g_SAM − α (g − (g·g_SAM/‖g_SAM‖²) g_SAM)`, with `g` the clean
      gradient: the clean gradient's component orthogonal to the SAM
      gradient is subtracted (`keras_sam.perturbations.gsam_gradients`).
    - SAM-ON (Mueller et al., NeurIPS 2023), `perturbed_variables=
      "normalization"`: ε is computed from and added to the weights of
      normalization layers only; other values: `"all"` (default) or a list
      of regular expressions searched in each variable's `path`.
    - Switching, `switching=policy` (see `keras_sam.switching`): the policy
      decides after the clean pass whether this step is a SAM step
      (`Periodic(k)`, `Randomized(p)`, `GradientNormOutlier()` for AE-SAM);
      otherwise the perturbed pass is skipped and the clean gradient is
      applied, as by the base optimizer. The policy is asked once per step,
      with the clean gradient of the whole batch (with micro-batches, their
      weighted mean). The fraction of SAM steps is logged as the metric
      `sam_fraction`.
    - LookSAM (Liu et al., CVPR 2022), `looksam_alpha=α` with a switching
      policy (the paper's is `Periodic(k)`, α = 0.7): each SAM step stores,
      per variable, the SAM gradient's component orthogonal to the clean
      gradient, `g_v = g_SAM − (g·g_SAM/‖g‖²) g`; the other steps apply
      `g + α (‖g‖/‖g_v‖) g_v` instead of `g`. Across replicas, each keeps
      the direction of its own SAM gradient, as it keeps its own ε. A SAM
      step whose direction is not finite (a mixed-precision overflow) keeps
      the previous direction.
    - Momentum-SAM (Becker et al., 2024), `perturbation="momentum"`: one
      pass, at `w + ρ m/‖m‖` with `m` the momentum of `SGD(momentum=μ)`
      (required), at about one SGD step's cost; the logged loss is
      `L(w + ε)`, without `sharpness`/`grad_norm`. The authors use a ρ
      several times SAM's (e.g. 0.3–3).
    - F-SAM (Li et al., CVPR 2024), `perturbation="friendly"`: ε along
      `g − σ m`, `m` a moving average of the clean gradients (model state,
      saved with the model); σ = 0 is SAM.

    `evaluate`, `predict` and `export` are the wrapped model's (a
    subclass's own `call`'s); a bare base loads `save_weights` files.

    Example:

    ```python
    model = SAMModel(base, rho=0.05)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(dataset, epochs=10)
    ```

    Args:
        base: the Keras model to train. It is used as is, not copied.
        <options>
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    # ρ may come positionally (`SAMModel(base, 0.05)`); options' default.
    def __init__(self, base, rho=options_lib.SAMOptions.rho, **kwargs):
        kwargs["rho"] = rho
        wrapper.check_base(base)
        sam_options = options_lib.SAMOptions(
            **{k: kwargs.pop(k) for k in options_lib.NAMES if k in kwargs}
        )
        super().__init__(**kwargs)
        self.base = base
        # Mirrored as attributes, read-only once `options` is set: Keras
        # tracks (and saves) the switching policy's state under `switching`.
        for name in options_lib.NAMES:
            value = getattr(sam_options, name)
            if isinstance(value, keras.Variable):
                # Read at every step, and not a weight of the model: saved
                # by `save_own_variables`, not tracked.
                compat.set_untracked_attribute(self, name, value)
            else:
                setattr(self, name, value)
        self.options = sam_options
        self._looksam_directions = self._friendly_averages = None
        compat.set_untracked_attribute(self, "_state_owners", None)
        if self.switching is not None:
            self.sam_fraction_tracker = keras.metrics.Mean(name="sam_fraction")
        self.sharpness_tracker = self.grad_norm_tracker = None
        if self.options.takes_two_passes:
            self.sharpness_tracker = keras.metrics.Mean(name="sharpness")
            self.grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        self._build_if_base_built()

    def __setattr__(self, name, value):
        if name in options_lib.GUARDED and "options" in self.__dict__:
            raise AttributeError(options_lib.fixed_option_message(name, value))
        super().__setattr__(name, value)

    def _build_variant_state(self):
        variables = self.base.trainable_variables
        if self._state_owners is None:  # held: their ids stay theirs
            compat.set_untracked_attribute(self, "_state_owners", variables)
        if self.perturbation == "friendly" and self._friendly_averages is None:
            self._friendly_averages = selection.replica_state(
                variables, "friendly_average"
            )
        if self.looksam_alpha is not None and self._looksam_directions is None:
            self._looksam_directions = selection.replica_state(
                variables, "looksam_direction"
            )

    # Called with `(data)`, or `(state, data)` by JAX's stateless trainer.
    @backend.stateful_train_step
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if not self.built:
            self._build_from_batch(x)
        batch_parts.check_loss_reductions(
            self.loss, self.options, weighted=sample_weight is not None
        )
        if not self.trainable_weights:
            warnings.warn(
                "The model does not have any trainable weights.", stacklevel=2
            )
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            self._track_loss(loss, x)
            return self.compute_metrics(x, y, y_pred, sample_weight)

        result = sam_step.compute_sam_gradients(
            self,
            self.compute_loss,  # with training=True
            x,
            y,
            sample_weight,
            self.options,
            rho=schedules.current_rho(self.rho, self.optimizer),
            scale_loss=self.optimizer.scale_loss,
            perturbed_mask=selection.perturbed_mask(
                self, self.perturbed_variables
            ),
            step=self.optimizer.iterations,
            looksam_directions=self._variant_state(
                self._looksam_directions, "looksam_alpha"
            ),
            friendly_averages=self._variant_state(
                self._friendly_averages, "perturbation='friendly'"
            ),
            momentums=(
                selection.momentum_variables(
                    self.optimizer, self.trainable_variables
                )
                if self.perturbation == "momentum"
                else None
            ),
        )
        if self.switching is not None:
            self.sam_fraction_tracker.update_state(
                ops.cast(result.sam_step, "float32")
            )
        self._track_sharpness(result)
        self._track_loss(result.loss, x)
        backend.apply_gradients(
            self.optimizer,
            result.gradients,
            self.trainable_weights,
            after_gradients=self.options.takes_two_passes,
        )
        return self.compute_metrics(
            x, y, result.y_pred, sample_weight=sample_weight
        )

    def _variant_state(self, state, option):
        return selection.state_of(
            self.trainable_variables, state, self._state_owners, option
        )

    def _track_loss(self, loss, x):
        """Logs the replica's loss as Keras does, weighted by its batch."""
        compat.loss_tracker(self).update_state(
            _unscale_loss_for_distribution(loss),
            sample_weight=ops.shape(
                next(t for t in tree.flatten(x) if t is not None)
            )[0],
        )

    def _track_sharpness(self, result):
        """Logs the replica's sharpness and unscaled ‖g‖, if finite."""
        if self.sharpness_tracker is None:
            return
        scale = ops.cast(self.optimizer.scale_loss(ops.ones(())), "float32")
        grad_norm = result.grad_norm * backend.replica_count() / scale
        sharpness = _unscale_loss_for_distribution(result.sharpness)
        finite = ops.logical_and(
            ops.isfinite(grad_norm), ops.isfinite(sharpness)
        )
        self.grad_norm_tracker.update_state(
            ops.where(finite, grad_norm, 0.0),
            sample_weight=ops.cast(finite, "float32"),
        )
        self.sharpness_tracker.update_state(
            ops.where(finite, sharpness, 0.0),
            sample_weight=ops.cast(
                ops.logical_and(finite, result.perturbed), "float32"
            ),
        )

    def test_step(self, *args):
        output = super().test_step(*args)
        # `logs` on TensorFlow, `(logs, state)` on JAX. Evaluation takes no
        # SAM steps; these training metrics mean nothing here.
        logs = output[0] if isinstance(output, tuple) else output
        for name in ("sam_fraction", "sharpness", "grad_norm"):
            logs.pop(name, None)
        return compat.logs_for_workers(output)

    def save_own_variables(self, store):
        super().save_own_variables(store)
        selection.save_state_owners(store, self.base, self._state_owners)
        options_lib.save_rho(self.rho, store)

    def load_own_variables(self, store):
        load_state = selection.state_loader(
            self.base, self._state_owners, super().load_own_variables
        )
        options_lib.load_rho(self.rho, store, load_state)

    def get_config(self):
        config = super().get_config()
        config["base"] = keras.saving.serialize_keras_object(self.base)
        config.update(self.options.get_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        base = keras.saving.deserialize_keras_object(
            config.pop("base"), custom_objects=custom_objects
        )
        sam_options = options_lib.SAMOptions.from_config(
            {k: config.pop(k) for k in options_lib.NAMES if k in config},
            custom_objects=custom_objects,
        )
        return cls(base, **sam_options.as_kwargs(), **config)


SAMModel.__doc__ = SAMModel.__doc__.replace(
    "        <options>", options_lib.args_doc(indent=8)
)


def _unscale_loss_for_distribution(loss):
    # `compute_loss` divides by the replica count so that summing gradients
    # across replicas averages them; the logged loss must not be divided.
    replicas = backend.replica_count()
    if replicas > 1:
        loss = loss * ops.cast(replicas, loss.dtype)
    return loss
