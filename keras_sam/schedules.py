"""Schedules for ρ: `SAMModel(rho=...)` takes a number or a schedule.

`current_rho` reads the ρ of a step from a number, a variable or a schedule.
"""

import keras
from keras import ops

from keras_sam import backend
from keras_sam import compat
from keras_sam import options

_SCHEDULES = keras.optimizers.schedules


@keras.saving.register_keras_serializable(package="keras_sam")
class RhoFollowingLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """ρ_t moving linearly with the learning rate, as in GSAM.

    Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization"
    (ICLR 2022), tie the radius to the learning-rate schedule:

    ```
    ρ_t = ρ_min + (ρ_max − ρ_min) · (lr_t − lr_min) / (lr_max − lr_min)
    ρ_t ← min(max(ρ_t, ρ_min), ρ_max)
    ```

    so ρ is `rho_max` at the peak learning rate and `rho_min` at the end of
    a decaying schedule, and never leaves [ρ_min, ρ_max]. During a warm-up
    ρ rises with the learning rate. Use the same schedule object as the
    optimizer (as every optimizer in a `MultiOptimizer`); the first step
    refuses another.

    The peak `lr_max`, when not given, is read from the schedule's
    arguments for Keras' schedules whose peak they determine: `CosineDecay`
    (its `warmup_target` when it warms up, else `initial_learning_rate`),
    `PolynomialDecay`, `PiecewiseConstantDecay`, and `ExponentialDecay`,
    `InverseTimeDecay` and `CosineDecayRestarts` when they do not grow.
    Any other schedule needs `lr_max`.

    Args:
        learning_rate: the optimizer's learning-rate schedule (a callable
            of the step).
        rho_max: ρ at `lr_max`. Defaults to SAM's ρ, `SAMOptions.rho`.
        rho_min: ρ at `lr_min`. Defaults to `0.0`.
        lr_max: the peak learning rate. Defaults to `None`: the maximum of
            the schedule over all steps, read from its arguments.
        lr_min: the learning rate at which ρ is `rho_min`. Defaults to
            `0.0`.
    """

    def __init__(
        self,
        learning_rate,
        rho_max=options.SAMOptions.rho,
        rho_min=0.0,
        lr_max=None,
        lr_min=0.0,
    ):
        if not callable(learning_rate):
            raise ValueError(
                "`learning_rate` must be a schedule (a callable of the "
                f"step). Received: learning_rate={learning_rate!r}"
            )
        rho_max = options.checked_number("rho_max", rho_max, minimum=0)
        rho_min = options.checked_number("rho_min", rho_min, minimum=0)
        lr_min = options.checked_number("lr_min", lr_min)
        if not rho_min <= rho_max:
            raise ValueError(
                "Expected 0 <= rho_min <= rho_max. Received: "
                f"rho_min={rho_min}, rho_max={rho_max}"
            )
        if lr_max is None:
            lr_max = _peak_learning_rate(learning_rate)
            if lr_max is None:
                raise ValueError(
                    "`lr_max` is required for this schedule: its peak "
                    "cannot be read from its arguments. Pass the largest "
                    "learning rate it reaches. Received: lr_max=None, "
                    f"learning_rate={learning_rate!r}"
                )
        lr_max = options.checked_number("lr_max", lr_max)
        if not lr_max > lr_min:
            raise ValueError(
                "Expected lr_max > lr_min. Received: "
                f"lr_max={lr_max}, lr_min={lr_min}"
            )
        self.learning_rate = learning_rate
        self.rho_max = rho_max
        self.rho_min = rho_min
        self.lr_max = lr_max
        self.lr_min = lr_min

    def __call__(self, step):
        lr = ops.cast(self.learning_rate(step), "float32")
        fraction = (lr - self.lr_min) / (self.lr_max - self.lr_min)
        rho = self.rho_min + (self.rho_max - self.rho_min) * fraction
        return ops.clip(rho, self.rho_min, self.rho_max)

    def get_config(self):
        return {
            "learning_rate": keras.saving.serialize_keras_object(
                self.learning_rate
            ),
            "rho_max": self.rho_max,
            "rho_min": self.rho_min,
            "lr_max": self.lr_max,
            "lr_min": self.lr_min,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["learning_rate"] = keras.saving.deserialize_keras_object(
            config["learning_rate"]
        )
        return cls(**config)


def _peak_learning_rate(schedule):
    """The largest value of a Keras schedule over all steps, or `None`.

    `None` when the schedule is not one of Keras' or its arguments let it
    grow without a bound that they state.
    """
    if not isinstance(schedule, _SCHEDULES.LearningRateSchedule):
        return None
    config = schedule.get_config()
    if isinstance(schedule, _SCHEDULES.CosineDecay):
        start = config["initial_learning_rate"]
        top = config["warmup_target"]
        top = start if top is None else top
        return max(start, top, config["alpha"] * top)
    if isinstance(schedule, _SCHEDULES.PolynomialDecay):
        return max(config["initial_learning_rate"], config["end_learning_rate"])
    if isinstance(schedule, _SCHEDULES.PiecewiseConstantDecay):
        return max(float(v) for v in config["values"])
    grows = {
        _SCHEDULES.ExponentialDecay: lambda c: c["decay_rate"] > 1,
        _SCHEDULES.InverseTimeDecay: lambda c: c["decay_rate"] < 0,
        _SCHEDULES.CosineDecayRestarts: lambda c: (
            c["m_mul"] > 1 or c["alpha"] > 1
        ),
    }
    for kind, grows_from in grows.items():
        if isinstance(schedule, kind) and not grows_from(config):
            return config["initial_learning_rate"]
    return None


def current_rho(rho, optimizer):
    """ρ for this step: a number as is, a Variable's value when the step
    runs, a schedule at the step of the optimizer's learning rate; NaN
    where a Variable or schedule gives a negative ρ."""
    if isinstance(rho, keras.Variable):
        return _nan_unless_non_negative(backend.read_live(rho))
    if callable(rho):
        if optimizer is None:
            raise ValueError(
                "A schedule `rho` is a function of the step: pass the "
                "`optimizer` whose steps it follows. Received: "
                f"rho={rho!r}, optimizer=None"
            )
        if isinstance(rho, RhoFollowingLearningRate):
            _check_follows(rho, optimizer)
        step = compat.schedule_step(optimizer)
        return _nan_unless_non_negative(ops.cast(rho(step), "float32"))
    return rho


def _nan_unless_non_negative(rho):
    # A compiled step cannot raise on a value. A NaN ρ makes that step's ε,
    # sharpness and update NaN, which the logs and `TerminateOnNaN` show;
    # skipping the perturbed pass would train without SAM, unseen.
    return ops.where(ops.greater_equal(rho, 0), rho, float("nan"))


def _check_follows(rho, optimizer):
    """Raises unless `rho` follows the schedule `optimizer` applies (each
    optimizer's, inside a `MultiOptimizer`)."""
    if rho.rho_min == rho.rho_max:
        return  # A constant ρ follows nothing.
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for each in getattr(inner, "optimizers", None) or [inner]:
        applied = compat.learning_rate_schedule(each)
        if not _is_schedule(applied, rho.learning_rate):
            owner = "the optimizer"
            if each is not inner:
                owner += f" {each.name!r}"
            raise ValueError(
                "`RhoFollowingLearningRate` follows a learning-rate schedule "
                "that the optimizer does not apply, so ρ would not move with "
                "the rate: give it the optimizer's schedule (each "
                "optimizer's, in a MultiOptimizer). Received: "
                f"rho.learning_rate={rho.learning_rate!r}, "
                + owner
                + (
                    f"'s learning rate {applied!r}"
                    if applied is not None
                    else "'s constant (or variable) learning rate"
                )
            )


def _is_schedule(applied, schedule):
    """Whether `applied` is `schedule` or an equal one (a loaded copy)."""
    if applied is schedule:
        return True
    if applied is None or type(applied) is not type(schedule):
        return False
    configs = [_config_or_none(s) for s in (applied, schedule)]
    return configs[0] is not None and configs[0] == configs[1]


def _config_or_none(schedule):
    try:
        return keras.saving.serialize_keras_object(schedule)
    except (NotImplementedError, TypeError, ValueError):
        return None
