"""Each reading of Keras internals in `keras_sam.compat` still holds."""

import keras
import numpy as np

from keras_sam import compat


def test_keras_evaluates_a_learning_rate_schedule_at_the_calls():
    # Under accumulation `iterations` counts updates; the rate follows the
    # calls to `apply`, which `schedule_step` returns.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [0, 1, 2], [1.0, 2.0, 3.0, 4.0]
    )
    optimizer = keras.optimizers.SGD(schedule, gradient_accumulation_steps=2)
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer.build([variable])
    for _ in range(3):
        optimizer.apply([keras.ops.ones(2)], [variable])
    assert int(optimizer.iterations) == 1
    assert int(compat.schedule_step(optimizer)) == 3
    assert float(optimizer.learning_rate) == float(schedule(3)) == 4.0


def test_a_loss_scale_optimizer_steps_with_its_inner_optimizer():
    schedule = keras.optimizers.schedules.CosineDecay(1.0, 10)
    inner = keras.optimizers.SGD(schedule)
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    # The inner optimizer owns the rate and its step.
    assert compat.schedule_step(optimizer) is inner._iterations
    assert optimizer.learning_rate is not None
    assert float(optimizer.learning_rate) == float(schedule(0))
