"""When to take a SAM step: policies that switch between SAM and the base step.

A SAM step costs two forward/backward passes; the base optimizer's step
costs one. `SAMModel(..., switching=policy)` asks the policy at every step
(after the clean pass) whether to run the perturbed pass; when it says no,
the clean gradient is applied as is (or LookSAM's reused direction is added,
see `SAMModel`'s `looksam_alpha`). The untaken branch is not computed, so a
policy that takes SAM on a fraction `f` of the steps costs about `1 + f`
base steps.

Every policy decides identically on every replica (from the step counter,
a stateless draw keyed by the step, or the global batch's gradient norm),
so replicas never disagree on which branch to run. Policies are
Keras layers only to own their state: it is saved with the model and
restored by `load_model`, `BackupAndRestore` and the trainers' checkpoints.
Their dtype policy is float32 whatever the global policy (e.g.
`mixed_float16`), so their statistics are float32.
"""

import keras
import numpy as np
from keras import ops

from keras_sam import backend
from keras_sam import options
from keras_sam import perturbations


class SwitchingPolicy(keras.layers.Layer):
    """Base class: `policy(step, squared_gradient_norm)` → a boolean scalar.

    `step` is the optimizer's iteration counter (int64), and
    `squared_gradient_norm` is ‖∇L(w)‖² of the global batch's clean pass,
    unscaled by loss scaling, or `None` when the policy sets
    `needs_gradient_norm = False`.
    """

    needs_gradient_norm = False

    def __init__(self, **kwargs):
        kwargs["trainable"] = False
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.built = True


@keras.saving.register_keras_serializable(package="keras_sam")
class Periodic(SwitchingPolicy):
    """A SAM step every `every` steps, the base step in between.

    SAM runs on the steps `t` with `t % every == 0` (so on the first one).
    `every=1` is exact SAM.

    Args:
        every: the period k ≥ 1. Defaults to `2`.
    """

    def __init__(self, every=2, **kwargs):
        every = options.checked_integer("every", every, 1)
        super().__init__(**kwargs)
        self.every = every

    def call(self, step, squared_gradient_norm=None):
        del squared_gradient_norm
        return ops.equal(ops.mod(step, self.every), 0)

    def get_config(self):
        return {**super().get_config(), "every": self.every}


@keras.saving.register_keras_serializable(package="keras_sam")
class Randomized(SwitchingPolicy):
    """A SAM step with probability p_t, the base step otherwise.

    The randomized sharpness-aware training of Zhao, Zhang and Hu (2022,
    "Randomized Sharpness-Aware Training for Boosting Computational
    Efficiency in Deep Learning"): at step `t` a Bernoulli(p_t) trial picks
    SAM. The draw is stateless, keyed by `(seed, t)`, so it is the same on
    every replica and after a resume. `probability=1` is exact SAM and
    `probability=0` the base optimizer.

    Args:
        probability: p in [0, 1], or a schedule (a callable of the step,
            e.g. a `keras.optimizers.schedules.LearningRateSchedule`) giving
            p_t. Defaults to `0.5`.
        seed: integer seed of the draws. Defaults to `0`.
    """

    def __init__(self, probability=0.5, seed=0, **kwargs):
        if not callable(probability) and not (
            options.is_real(probability) and 0 <= probability <= 1
        ):
            raise ValueError(
                "`probability` must be a number in [0, 1] or a schedule. "
                f"Received: probability={probability!r}"
            )
        super().__init__(**kwargs)
        self.probability = probability
        self.seed = options.checked_integer("seed", seed, 0)

    def call(self, step, squared_gradient_norm=None):
        del squared_gradient_norm
        probability = self.probability
        if callable(probability):
            probability = probability(step)
        draw = uniform_from_step(self.seed, step)
        return draw < ops.cast(probability, "float32")

    def get_config(self):
        probability = self.probability
        if callable(probability):
            probability = keras.saving.serialize_keras_object(probability)
        return {
            **super().get_config(),
            "probability": probability,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["probability"], dict):
            config["probability"] = keras.saving.deserialize_keras_object(
                config["probability"]
            )
        return cls(**config)


_MASK32 = 0xFFFFFFFF


def uniform_from_step(seed, step):
    """A uniform draw in [0, 1) that is a pure function of `(seed, step)`.

    A murmur3-style integer mix of the two in uint32 arithmetic (wrapping
    modulo 2³²). Unlike the backends' stateless random ops, whose XLA
    kernels may draw other numbers than their plain kernels, it gives the
    same draw with and without `jit_compile`, on every device and backend.
    """
    x = _low32(
        ops.cast(step, "uint32") + np.uint32(int(seed) * 0x9E3779B9 & _MASK32)
    )
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = ops.bitwise_xor(x, ops.right_shift(x, np.uint32(shift)))
        x = _low32(x * np.uint32(multiplier))
    x = ops.bitwise_xor(x, ops.right_shift(x, np.uint32(16)))
    return ops.cast(x, "float32") / 2.0**32


def _low32(x):
    # PyTorch promotes uint32 arithmetic to int64, which does not wrap at
    # 2³²; keeping the low 32 bits is a no-op where uint32 does wrap.
    return ops.bitwise_and(x, np.uint32(_MASK32))


@keras.saving.register_keras_serializable(package="keras_sam")
class GradientNormOutlier(SwitchingPolicy):
    """AE-SAM: a SAM step when the gradient norm is unusually large.

    Jiang, Yang, Zhang and Kwok, "An Adaptive Policy to Employ
    Sharpness-Aware Minimization" (ICLR 2023). With `n_t = ‖∇L(w_t)‖²` of
    the clean pass, exponential moving estimates of its mean and variance,

    ```
    μ_t  = δ μ_{t−1} + (1 − δ) n_t
    σ²_t = δ σ²_{t−1} + (1 − δ) (n_t − μ_t)²
    SAM at step t  ⇔  n_t ≥ μ_t + c_t σ_t
    c_t  = c_start + (c_end − c_start) · min(t / decay_steps, 1)
    ```

    The first step initializes `μ = n`, `σ² = 0` and takes SAM. A step
    whose `n_t` is not finite (a mixed-precision overflow, which the
    loss-scale optimizer skips) leaves the statistics unchanged and takes
    no SAM. A lower
    `c` takes SAM more often: if n_t were normal, c = 1 would take SAM on
    about 16 % of the steps and c = −1 on about 84 %. The paper moves c
    linearly from 1 to −1 over training (λ₂ = 1, λ₁ = −1), taking SAM on
    about half of the steps overall and more often late in training; pass
    `decay_steps` = the total number of training steps to get that.
    The statistics are saved with the model.

    Args:
        decay: δ in [0, 1). Defaults to `0.9`.
        c_start: the threshold coefficient at step 0. Defaults to `1.0`.
        c_end: the threshold coefficient from `decay_steps` on. Defaults to
            `-1.0`.
        decay_steps: steps over which c moves from `c_start` to `c_end`;
            `None` keeps `c_start` throughout. Defaults to `None`.
    """

    needs_gradient_norm = True

    def __init__(
        self,
        decay=0.9,
        c_start=1.0,
        c_end=-1.0,
        decay_steps=None,
        **kwargs,
    ):
        if not (options.is_real(decay) and 0 <= decay < 1):
            raise ValueError(
                f"`decay` must lie in [0, 1). Received: decay={decay!r}"
            )
        if decay_steps is not None:
            options.checked_number("decay_steps", decay_steps, 1)
        options.checked_number("c_start", c_start)
        options.checked_number("c_end", c_end)
        super().__init__(**kwargs)
        self.decay = float(decay)
        self.c_start = float(c_start)
        self.c_end = float(c_end)
        self.decay_steps = decay_steps
        self.mean = self._statistic("mean")
        self.variance = self._statistic("variance")
        self.started = self._statistic("started")

    def _statistic(self, name):
        return self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            aggregation="only_first_replica",
            name=name,
        )

    def threshold_coefficient(self, step):
        """c_t at `step`."""
        if self.decay_steps is None:
            return ops.convert_to_tensor(self.c_start, "float32")
        fraction = ops.minimum(
            ops.cast(step, "float32") / float(self.decay_steps), 1.0
        )
        return self.c_start + (self.c_end - self.c_start) * fraction

    def call(self, step, squared_gradient_norm=None):
        n = ops.cast(squared_gradient_norm, "float32")
        finite = ops.isfinite(n)
        n = ops.where(finite, n, 0.0)
        old_mean, old_variance = self.mean.value, self.variance.value
        started = self.started.value
        first = ops.equal(started, 0.0)
        mean = ops.where(first, n, self.decay * old_mean + (1 - self.decay) * n)
        variance = ops.where(
            first,
            0.0,
            self.decay * old_variance + (1 - self.decay) * ops.square(n - mean),
        )
        self.mean.assign(ops.where(finite, mean, old_mean))
        self.variance.assign(ops.where(finite, variance, old_variance))
        self.started.assign(ops.where(finite, 1.0, started))
        threshold = mean + self.threshold_coefficient(step) * ops.sqrt(variance)
        return ops.logical_and(finite, ops.logical_or(first, n >= threshold))

    def get_config(self):
        return {
            **super().get_config(),
            "decay": self.decay,
            "c_start": self.c_start,
            "c_end": self.c_end,
            "decay_steps": self.decay_steps,
        }


@keras.saving.register_keras_serializable(package="keras_sam")
class LatePhase(SwitchingPolicy):
    """SAM only late in training: the base step before `start_step`.

    Zhou, Wang, Zhang and Xu, "Sharpness-Aware Minimization Efficiently
    Selects Flatter Minima Late in Training" (ICLR 2025; code
    zzp1012/SAM-in-Late-Phase) train with SGD and switch to SAM for the
    last epochs (the last 10 of 160 in their CIFAR runs), and find the
    solution about as flat, and as accurate, as with SAM throughout:

    ```
    SAM at step t  ⇔  start_step ≤ t < end_step
    ```

    A late phase of a fraction f of the steps costs about 1 + f base
    steps. `start_step=0` (and no `end_step`) is exact SAM.

    One optimizer serves both phases, so SGD's momentum carries across
    the switch. The authors' code steps a second SGD in the SAM phase,
    whose momentum starts at zero; the two differ for the first tens of
    steps after the switch (about 1/(1 − μ)).

    Args:
        start_step: the first step that takes SAM, ≥ 0.
        end_step: the first step after the SAM phase, or `None` for the
            end of training. Defaults to `None`.
    """

    def __init__(self, start_step, end_step=None, **kwargs):
        start_step = options.checked_integer("start_step", start_step, 0)
        if end_step is not None:
            end_step = options.checked_integer(
                "end_step", end_step, start_step + 1
            )
        super().__init__(**kwargs)
        self.start_step = start_step
        self.end_step = end_step

    def call(self, step, squared_gradient_norm=None):
        del squared_gradient_norm
        late = ops.greater_equal(step, self.start_step)
        if self.end_step is None:
            return late
        return ops.logical_and(late, ops.less(step, self.end_step))

    def get_config(self):
        return {
            **super().get_config(),
            "start_step": self.start_step,
            "end_step": self.end_step,
        }


def squared_gradient_norm(whole_batch, scale_loss, synced):
    """‖∇L‖² of the global batch, without loss scaling: what a policy that
    `needs_gradient_norm` is given. Every replica gets it: the norm of the
    sum of the replicas' gradients (Keras divides each replica's loss by
    their count), as one device, or JAX's step over the global batch,
    computes it.

    `whole_batch` is the step's clean pass on the replica's whole batch
    (`sam_step`'s part, with its gradients and their norm). When `synced`
    (`sync_perturbations`), that norm is already the sum's, divided by the
    replica count, and the gradients are not all-reduced a second time.
    """
    scale = ops.cast(scale_loss(ops.ones(())), "float32")
    if synced:
        norm = whole_batch.clean_norm * backend.replica_count()
    else:
        norm = perturbations.global_norm(
            backend.all_reduce(whole_batch.clean.gradients, "sum")
        )
    return ops.square(norm / scale)
