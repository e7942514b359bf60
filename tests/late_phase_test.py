"""Late-phase SAM (`switching.LatePhase`) against the NumPy oracle and its
reductions to SAM and to the base optimizer."""

import re

import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from keras_sam import switching
from tests import oracle
from tests.sam_model_test import RHO
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.variants_test import assert_weights
from tests.variants_test import assert_weights_differ
from tests.variants_test import fit_softmax
from tests.variants_test import oracle_weights
from tests.variants_test import sam_weights

STEPS = 6  # fit_softmax: 2 epochs of 3 batches.


def test_late_phase_decides_by_the_step_window():
    steps = tf.range(10, dtype=tf.int64)
    assert [bool(switching.LatePhase(4)(s)) for s in steps] == [
        t >= 4 for t in range(10)
    ]
    window = switching.LatePhase(2, end_step=5)
    assert [bool(window(s)) for s in steps] == [2 <= t < 5 for t in range(10)]


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_late_phase_matches_the_oracle(mode):
    model = fit_softmax(mode, rho=RHO, switching=switching.LatePhase(4))
    want = oracle_weights(oracle.Switching(lambda t, _: t >= 4))
    assert_weights(model, want)
    assert_weights_differ(want, sam_weights())


def test_late_phase_from_step_zero_is_sam():
    model = fit_softmax(rho=RHO, switching=switching.LatePhase(0))
    assert_weights(model, sam_weights())


def test_late_phase_after_the_last_step_is_the_base_optimizer():
    model = fit_softmax(rho=RHO, switching=switching.LatePhase(STEPS))
    assert_weights(model, oracle_weights(oracle.Switching(lambda t, _: False)))
    assert_weights_differ(model.base.get_weights(), sam_weights())


def test_late_phase_round_trips_through_get_config():
    policy = switching.LatePhase(7, end_step=9)
    base = softmax_regression(*softmax_data()[2:])
    model = keras_sam.SAMModel(base, rho=RHO, switching=policy)
    restored = keras_sam.SAMModel.from_config(model.get_config())
    assert restored.switching.start_step == 7
    assert restored.switching.end_step == 9


@pytest.mark.parametrize(
    "policy, kwargs, message",
    [
        (switching.LatePhase, dict(start_step=-1), "start_step=-1"),
        (switching.LatePhase, dict(start_step=1.5), "start_step=1.5"),
        (switching.LatePhase, dict(start_step=4, end_step=4), "end_step=4"),
        (switching.LatePhase, dict(start_step=0, end_step=True), "end_step"),
        (switching.Periodic, dict(every=0), "every=0"),
        (switching.Periodic, dict(every=2.0), "every=2.0"),
        (switching.Randomized, dict(probability=1.5), "probability=1.5"),
        (switching.Randomized, dict(probability=True), "probability=True"),
        (switching.Randomized, dict(seed=2.7), "seed=2.7"),
        (switching.Randomized, dict(seed="3"), "seed='3'"),
        (switching.GradientNormOutlier, dict(decay=1), "decay=1"),
        (switching.GradientNormOutlier, dict(decay="0.5"), "decay='0.5'"),
        (switching.GradientNormOutlier, dict(decay_steps=0), "decay_steps=0"),
        (
            switching.GradientNormOutlier,
            dict(decay_steps="100"),
            "decay_steps='100'",
        ),
        (switching.GradientNormOutlier, dict(c_start=True), "c_start=True"),
        (switching.GradientNormOutlier, dict(c_end="a"), "c_end='a'"),
        (
            switching.GradientNormOutlier,
            dict(c_end=float("nan")),
            "c_end=nan",
        ),
    ],
)
def test_bad_switching_arguments_name_the_argument_and_value(
    policy, kwargs, message
):
    # Each check is the one the SAM options use (`options.checked_*`).
    with pytest.raises(ValueError, match=re.escape(message)):
        policy(**kwargs)


def test_numpy_integers_are_accepted_as_steps():
    window = switching.LatePhase(np.int64(2), end_step=np.int32(5))
    assert (window.start_step, window.end_step) == (2, 5)
    assert type(window.start_step) is int
    assert switching.Periodic(np.int64(3)).every == 3
    assert switching.Randomized(seed=np.int64(4)).seed == 4


def test_trainer_flag_starts_sam_at_the_given_fraction(tmp_path):
    from tests.trainers_run_test import make_flags
    from trainers import config
    from trainers import flags as trainer_flags

    sam = config.TrainingConfig.from_flags(
        make_flags(tmp_path, switching="late_phase", sam_start_fraction=0.75)
    ).sam
    policy = trainer_flags.sam_options(sam, total_steps=200).switching
    assert isinstance(policy, switching.LatePhase)
    assert policy.start_step == 150 and policy.end_step is None
