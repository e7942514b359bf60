"""Schedules for ρ: `SAMModel(rho=...)` takes a number or a schedule."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_sam")
class RhoFollowingLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """ρ_t moving linearly with the learning rate, as in GSAM.

    Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization"
    (ICLR 2022), tie the radius to the learning-rate schedule:

    ```
    ρ_t = ρ_min + (ρ_max − ρ_min) · (lr_t − lr_min) / (lr_max − lr_min)
    ```

    so ρ is `rho_max` at the peak learning rate and `rho_min` at the end of
    a decaying schedule. Use the same schedule object as the optimizer.

    Args:
        learning_rate: the optimizer's learning-rate schedule (a callable
            of the step).
        rho_max: ρ at `lr_max`. Defaults to `0.05`.
        rho_min: ρ at `lr_min`. Defaults to `0.0`.
        lr_max: the peak learning rate. Defaults to `None`: the schedule's
            value at step 0.
        lr_min: the final learning rate. Defaults to `0.0`.
    """

    def __init__(
        self,
        learning_rate,
        rho_max=0.05,
        rho_min=0.0,
        lr_max=None,
        lr_min=0.0,
    ):
        if not callable(learning_rate):
            raise ValueError(
                "`learning_rate` must be a schedule (a callable of the "
                f"step). Received: learning_rate={learning_rate!r}"
            )
        if not 0 <= rho_min <= rho_max:
            raise ValueError(
                "Expected 0 <= rho_min <= rho_max. Received: "
                f"rho_min={rho_min}, rho_max={rho_max}"
            )
        if lr_max is None:
            lr_max = float(ops.convert_to_numpy(learning_rate(0)))
        if not lr_max > lr_min:
            raise ValueError(
                "Expected lr_max > lr_min. Received: "
                f"lr_max={lr_max}, lr_min={lr_min}"
            )
        self.learning_rate = learning_rate
        self.rho_max = float(rho_max)
        self.rho_min = float(rho_min)
        self.lr_max = float(lr_max)
        self.lr_min = float(lr_min)

    def __call__(self, step):
        lr = ops.cast(self.learning_rate(step), "float32")
        fraction = (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho_min + (self.rho_max - self.rho_min) * fraction

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
