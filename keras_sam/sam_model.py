"""`SAMModel`: wrap any Keras model to train it with SAM or ASAM."""

import warnings

import keras
import tensorflow as tf
from keras import ops
from keras import tree

from keras_sam import perturbations
from keras_sam import sam_step


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(keras.Model):
    """Trains a Keras model with Sharpness-Aware Minimization.

    `SAMModel(base)` is a model whose `fit` minimizes the SAM objective of
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization" (ICLR 2021, arXiv 2010.01412). Each training step, on
    the batch `B` and the weights `w`:

    ```
    g     = ∇L_B(w)                                 # clean pass
    ε     = ρ · g / (‖g‖₂ + 1e-12)                  # SAM
    ε     = ρ · T_w² g / (‖T_w g‖₂ + 1e-12),        # ASAM (adaptive=True),
            T_w = |w| + η                           # Kwon et al., 2021
    g_SAM = ∇L_B(w)|_{w + ε}                        # perturbed pass
    w     ← optimizer.apply_gradients(g_SAM at w)
    ```

    `L_B` is the compiled loss plus the model's regularization and
    `add_loss` terms, computed by `compute_loss`, so weight regularizers are
    evaluated at `w + ε` in the perturbed pass. Both passes call the model
    with `training=True` (BatchNorm normalizes with batch statistics) on the
    same batch with the same random state (the same dropout masks). The
    moving statistics of BatchNorm and the seeds are updated once per step,
    from the clean pass. No variable is written by the perturbed pass: it is
    evaluated statelessly at `w + ε`, so there is no assign-and-subtract
    drift. The optimizer then applies `g_SAM` at `w` as usual (momentum,
    weight decay, clipping, gradient accumulation, loss scaling).

    With `rho=0` the step is exactly the base optimizer's step.

    **Logged loss and metrics** are those of the clean pass at `w`, as in a
    plain `fit`, so they compare directly with a model trained without SAM.

    **Across replicas** (`tf.distribute`), each replica computes ε from the
    gradient of its own share of the batch (the paper's default; m-sharpness
    with `m` = per-replica batch size) and only the perturbed gradients are
    aggregated. `sync_perturbations=True` all-reduces the clean gradient
    first, so every replica uses the ε of the whole global batch (m = global
    batch size). `micro_batches=k` splits each replica's batch into `k`
    parts, each with its own ε, and averages their perturbed gradients:
    m = global batch size / (replicas · k).

    `evaluate`, `predict` and `base` are those of the wrapped model; save and
    export `model.base` for inference.

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
        rho: the neighbourhood radius ρ ≥ 0. `0` reproduces the base
            optimizer. ASAM typically wants a ρ about 10x larger than SAM.
            Defaults to `0.05`.
        adaptive: use ASAM's scale-invariant ε. Defaults to `False`.
        eta: ASAM's η > 0, added to `|w|`. Defaults to `0.01`.
        sync_perturbations: all-reduce the clean gradient across replicas
            before computing ε. Defaults to `False`.
        micro_batches: the number of equal parts, each with its own ε, into
            which each replica's batch is split. It must divide the
            per-replica batch size. Defaults to `1`.
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    def __init__(
        self,
        base,
        rho=0.05,
        adaptive=False,
        eta=0.01,
        sync_perturbations=False,
        micro_batches=1,
        **kwargs,
    ):
        if not isinstance(base, keras.Model):
            raise ValueError(
                "`base` must be a Keras model (an instance of `keras.Model`). "
                f"Received: base={base!r} of type {type(base).__name__}"
            )
        sam_step.validate_sam_arguments(
            rho, eta, micro_batches, sync_perturbations
        )
        super().__init__(**kwargs)
        self.base = base
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.sync_perturbations = bool(sync_perturbations)
        self.micro_batches = int(micro_batches)
        if base.built:
            self.built = True

    def call(self, inputs, training=None):
        return self.base(inputs, training=training)

    def build(self, input_shape=None):
        if not self.base.built:
            self.base.build(input_shape)
        self.built = True

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if not self.trainable_weights:
            warnings.warn(
                "The model does not have any trainable weights.", stacklevel=2
            )
            y_pred = self(x, training=True)
            return self.compute_metrics(x, y, y_pred, sample_weight)

        result = sam_step.compute_sam_gradients(
            self,
            self._compute_total_loss,
            x,
            y,
            sample_weight,
            rho=self.rho,
            adaptive=self.adaptive,
            eta=self.eta,
            micro_batches=self.micro_batches,
            sync_perturbations=self.sync_perturbations,
            scale_loss=self.optimizer.scale_loss,
            epsilon=perturbations.DEFAULT_EPSILON,
        )
        self._loss_tracker.update_state(
            _unscale_loss_for_distribution(result.loss),
            sample_weight=ops.shape(
                next(t for t in tree.flatten(x) if t is not None)
            )[0],
        )
        self.optimizer.apply_gradients(
            zip(result.gradients, self.trainable_weights)
        )
        return self.compute_metrics(
            x, y, result.y_pred, sample_weight=sample_weight
        )

    def _compute_total_loss(self, x, y, y_pred, sample_weight):
        return self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "base": keras.saving.serialize_keras_object(self.base),
                "rho": self.rho,
                "adaptive": self.adaptive,
                "eta": self.eta,
                "sync_perturbations": self.sync_perturbations,
                "micro_batches": self.micro_batches,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        base = keras.saving.deserialize_keras_object(
            config.pop("base"), custom_objects=custom_objects
        )
        return cls(base, **config)


def _unscale_loss_for_distribution(loss):
    # `compute_loss` divides by the replica count so that summing gradients
    # across replicas averages them; the logged loss must not be divided.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * ops.cast(replicas, loss.dtype)
    return loss
