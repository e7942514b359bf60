"""Where keras_sam reads Keras internals, with why and the versions checked.

Each function here depends on private Keras behaviour; each has a test in
`tests/compat_test.py` that fails when Keras changes it. Checked against
Keras 3.15.1.
"""


def schedule_step(optimizer):
    """The step at which `optimizer` evaluates its learning-rate schedule.

    Keras evaluates a `LearningRateSchedule` at the count of calls to
    `apply` (`optimizer._iterations`), while `optimizer.iterations` counts
    updates: the two differ under `gradient_accumulation_steps=k`, where
    `iterations` is the calls // k. A ρ schedule is evaluated at this step,
    so that `RhoFollowingLearningRate` follows the rate the optimizer
    applies. A `LossScaleOptimizer` evaluates its inner optimizer's.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner._iterations
