"""`RhoFollowingLearningRate` against values computed by hand."""

import math

import keras
import numpy as np
import pytest

import keras_sam

SCHEDULES = keras.optimizers.schedules


def warmup_cosine():
    # 0.04 → 0.4 linearly over 10 steps, then a cosine from 0.4 to 0 over
    # 100 steps.
    return SCHEDULES.CosineDecay(
        0.04, decay_steps=100, warmup_target=0.4, warmup_steps=10
    )


def hand_learning_rate(step):
    if step < 10:
        return 0.04 + (0.4 - 0.04) * step / 10
    t = min(step - 10, 100)
    return 0.4 * 0.5 * (1 + math.cos(math.pi * t / 100))


def test_hand_learning_rate_is_keras_cosine_decay_with_warmup():
    schedule = warmup_cosine()
    for step in (0, 5, 10, 60, 110, 200):
        np.testing.assert_allclose(
            float(schedule(step)), hand_learning_rate(step), atol=1e-7
        )


def test_warmup_peak_is_rho_max_not_the_first_learning_rate():
    rho = keras_sam.schedules.RhoFollowingLearningRate(
        warmup_cosine(), rho_max=0.1, rho_min=0.01
    )
    assert rho.lr_max == pytest.approx(0.4)
    # ρ_t = 0.01 + 0.09 · lr_t / 0.4
    want = {0: 0.019, 5: 0.0595, 10: 0.1, 60: 0.055, 110: 0.01, 200: 0.01}
    for step, value in want.items():
        np.testing.assert_allclose(float(rho(step)), value, atol=1e-6)
    values = [float(rho(step)) for step in range(0, 130)]
    assert max(values) == pytest.approx(0.1)
    assert min(values) == pytest.approx(0.01)


def test_rho_is_clamped_to_its_range_when_lr_max_and_lr_min_cut_inside():
    rho = keras_sam.schedules.RhoFollowingLearningRate(
        warmup_cosine(), rho_max=0.1, rho_min=0.01, lr_max=0.2, lr_min=0.1
    )
    # Unclamped: 0.01 + 0.09 · (lr − 0.1) / 0.1, i.e. 0.28 at the peak and
    # −0.08 at the end.
    np.testing.assert_allclose(float(rho(10)), 0.1, atol=1e-7)
    np.testing.assert_allclose(float(rho(110)), 0.01, atol=1e-7)
    np.testing.assert_allclose(float(rho(5)), 0.1, atol=1e-7)  # lr = 0.22
    np.testing.assert_allclose(
        float(rho(0)), 0.01, atol=1e-7
    )  # lr = 0.04 < lr_min


@pytest.mark.parametrize(
    "schedule, peak",
    [
        (SCHEDULES.CosineDecay(0.3, 50, alpha=0.1), 0.3),
        (SCHEDULES.PolynomialDecay(0.1, 10, end_learning_rate=0.5), 0.5),
        (SCHEDULES.PiecewiseConstantDecay([10, 20], [0.1, 0.3, 0.05]), 0.3),
        (SCHEDULES.ExponentialDecay(0.2, 10, decay_rate=0.5), 0.2),
        (SCHEDULES.InverseTimeDecay(0.2, 10, decay_rate=0.5), 0.2),
        (SCHEDULES.CosineDecayRestarts(0.2, 10), 0.2),
    ],
)
def test_the_peak_of_keras_schedules_is_read_from_their_arguments(
    schedule, peak
):
    rho = keras_sam.schedules.RhoFollowingLearningRate(schedule, 0.1, 0.01)
    assert rho.lr_max == pytest.approx(peak)
    values = [float(rho(step)) for step in range(0, 60)]
    assert max(values) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "schedule",
    [
        lambda step: 0.1,
        SCHEDULES.ExponentialDecay(0.1, 10, decay_rate=1.5),
        SCHEDULES.CosineDecayRestarts(0.1, 10, m_mul=2.0),
    ],
)
def test_a_schedule_without_a_known_peak_needs_lr_max(schedule):
    with pytest.raises(ValueError, match="`lr_max` is required.*lr_max=None"):
        keras_sam.schedules.RhoFollowingLearningRate(schedule, 0.1)
    rho = keras_sam.schedules.RhoFollowingLearningRate(
        schedule, 0.1, lr_max=0.1
    )
    np.testing.assert_allclose(float(rho(0)), 0.1, atol=1e-7)


def test_warmup_schedule_round_trips_through_get_config():
    rho = keras_sam.schedules.RhoFollowingLearningRate(
        warmup_cosine(), rho_max=0.1, rho_min=0.01
    )
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(rho)
    )
    assert clone.get_config() == rho.get_config()
    for step in (0, 5, 10, 60):
        assert float(clone(step)) == pytest.approx(float(rho(step)))


@pytest.mark.parametrize(
    "optimizer_rate, refused",
    [
        (0.1, True),  # ρ would decay while the rate stays
        (lambda: SCHEDULES.CosineDecay(0.1, 4, alpha=0.5), True),
        (lambda: SCHEDULES.CosineDecay(0.1, 4), False),  # equal, not same
    ],
)
def test_rho_must_follow_the_schedule_the_optimizer_applies(
    optimizer_rate, refused
):
    # A schedule other than the optimizer's had been followed silently.
    rho = keras_sam.schedules.RhoFollowingLearningRate(
        SCHEDULES.CosineDecay(0.1, 4), rho_max=0.1, rho_min=0.01
    )
    rate = optimizer_rate() if callable(optimizer_rate) else optimizer_rate
    model = keras_sam.SAMModel(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]), rho=rho
    )
    model.compile(optimizer=keras.optimizers.SGD(rate), loss="mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 1), "float32")
    if not refused:
        model.fit(x, y, epochs=2, verbose=0)
        return
    with pytest.raises(ValueError, match="the optimizer does not apply"):
        model.fit(x, y, verbose=0)


@pytest.mark.skipif(
    not hasattr(keras.optimizers, "MultiOptimizer"),
    reason="keras.optimizers.MultiOptimizer is new in Keras 3.15",
)
def test_rho_follows_the_schedule_of_every_optimizer_in_a_multi_optimizer():
    # A MultiOptimizer's own rate is 0: ρ had been refused as following a
    # schedule the optimizer does not apply, though each inner one did.
    def fitted(make_optimizer):
        keras.utils.set_random_seed(3)
        rho = keras_sam.schedules.RhoFollowingLearningRate(
            SCHEDULES.CosineDecay(0.1, 4), rho_max=0.1, rho_min=0.01
        )
        base = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)]
        )
        model = keras_sam.SAMModel(base, rho=rho)
        model.compile(optimizer=make_optimizer(), loss="mse")
        x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
        model.fit(x, x[:, :1] ** 2, batch_size=4, epochs=2, verbose=0)
        return base.get_weights()

    def multi(default_rate):
        optimizers = keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(default_rate),
            {".*dense/kernel": keras.optimizers.SGD(cosine())},
        )
        return keras.optimizers.MultiOptimizer(optimizers)

    def cosine():
        return SCHEDULES.CosineDecay(0.1, 4)

    # Four steps: ρ decays with the rate of both inner optimizers, so the
    # run is a single SGD's.
    for a, b in zip(
        fitted(lambda: multi(cosine())),
        fitted(lambda: keras.optimizers.SGD(cosine())),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="the optimizer 'sgd.*'s constant"):
        fitted(lambda: multi(0.1))
