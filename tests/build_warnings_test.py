"""No false alarms: unbuilt and subclassed bases train silently, and right."""

import re
import warnings

import keras
import numpy as np
import pytest

import keras_sam
from tests import oracle
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MODES
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import C
from tests.sam_model_test import D
from tests.sam_model_test import batches
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import xent

FALSE_ALARMS = re.compile(
    "does not have any trainable weights|unbuilt state|build\\(\\)` was called"
)


def dense(w0, b0):
    return keras.layers.Dense(
        C,
        kernel_initializer=keras.initializers.Constant(w0),
        bias_initializer=keras.initializers.Constant(b0),
    )


class Subclassed(keras.Model):
    def __init__(self, w0, b0, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Identity()
        self.out = dense(w0, b0)

    def call(self, x):
        return self.out(self.hidden(x))


BASES = {
    "sequential_without_input": lambda w0, b0: keras.Sequential(
        [dense(w0, b0)]
    ),
    "subclassed": Subclassed,
}


def assert_no_false_alarm(caught):
    alarms = [
        str(w.message) for w in caught if FALSE_ALARMS.search(str(w.message))
    ]
    assert not alarms


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("base", BASES)
def test_unbuilt_bases_train_without_warnings_and_match_the_oracle(base, mode):
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(BASES[base](w0, b0), rho=RHO)
    assert not model.built
    model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    assert_no_false_alarm(caught)
    want_w, want_b, _ = oracle.train_sgd_momentum(
        w0, b0, batches(x, y), RHO, LR, MOMENTUM
    )
    got_w, got_b = model.base.get_weights()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)


def test_building_a_subclassed_base_by_shape_gives_no_warning():
    _, _, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(Subclassed(w0, b0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.build((None, D))
    assert_no_false_alarm(caught)
    assert model.built and model.base.built
    assert [v.shape for v in model.trainable_variables] == [(D, C), (C,)]
