"""LoRA on a quantized model (`model.quantize`, then `enable_lora`).

Only the LoRA factors and the biases are trainable, so ε covers them only,
and the quantized kernels and their scales stay as they are. The reference
is a hand SAM step over the trainable variables, by the backend's autodiff.
"""

import keras
import numpy as np
import pytest

import keras_sam
from tests import backends
from tests.remat_test import data
from tests.remat_test import xent
from tests.sam_model_test import MODES

RHO, LR, BATCH, RANK = 0.5, 0.5, 8, 2


def make_base(mode):
    keras.utils.set_random_seed(2)
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    base.quantize(mode)
    for layer in base.layers:
        layer.enable_lora(RANK)
    # LoRA's B starts at zero; a random start lets the first step move A.
    for variable in base.trainable_variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(np.full(variable.shape, 0.3, "float32"))
    return base


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_lora_on_a_quantized_model_takes_the_sam_step(quantization, mode):
    base = make_base(quantization)
    frozen = [v.numpy() for v in base.non_trainable_variables]
    model = keras_sam.SAMModel(base, rho=RHO)
    model.compile(keras.optimizers.SGD(LR), loss=xent(), **MODES[mode])
    x, y = data()
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)

    want = backends.train_by_hand_sam(
        make_base(quantization), xent(), x, y, BATCH, RHO, LR
    )
    assert len(base.trainable_variables) == 3 * len(base.layers)
    for got, expected in zip(
        base.trainable_variables, want.trainable_variables
    ):
        assert got.name == expected.name
        backends.assert_matches_plain_fit(
            got.numpy(), expected.numpy(), mode, 1e-5, 1e-6
        )
    for before, after in zip(frozen, base.non_trainable_variables):
        np.testing.assert_array_equal(after.numpy(), before)
