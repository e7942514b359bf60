"""GSAM, SAM-ON, switching and LookSAM against NumPy oracles and their
reductions to SAM and to the base optimizer."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from keras_sam import switching
from tests import backends
from tests import oracle
from tests.distribute_test import mirrored
from tests.sam_model_test import BATCH
from tests.sam_model_test import LR
from tests.sam_model_test import MODES
from tests.sam_model_test import MOMENTUM
from tests.sam_model_test import RHO
from tests.sam_model_test import C
from tests.sam_model_test import D
from tests.sam_model_test import batches
from tests.sam_model_test import bn_dropout_model
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent

EPOCHS = 2  # 6 steps of 8 examples.


def fit_softmax(mode="graph", optimizer=None, strategy=None, **sam_kwargs):
    x, y, w0, b0 = softmax_data()
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        policy = sam_kwargs.get("switching")
        if strategy and policy:  # made in the scope, as its variables must
            sam_kwargs["switching"] = policy.from_config(policy.get_config())
        model = keras_sam.SAMModel(softmax_regression(w0, b0), **sam_kwargs)
        model.compile(optimizer=optimizer or sgd(), loss=xent(), **MODES[mode])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model.fit(dataset, epochs=EPOCHS, shuffle=False, verbose=0)
    return model


def oracle_weights(gradient_fn, lr=LR, **kwargs):
    x, y, w0, b0 = softmax_data()
    w, b, _ = oracle.train_sgd_momentum(
        w0,
        b0,
        batches(x, y) * EPOCHS,
        RHO,
        lr,
        MOMENTUM,
        gradient_fn=gradient_fn,
        **kwargs,
    )
    return [w, b]


def assert_weights(model, want, rtol=1e-5, atol=1e-6):
    for got, expected in zip(model.base.get_weights(), want):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def assert_weights_differ(first, second):
    assert max(np.abs(a - b).max() for a, b in zip(first, second)) > 1e-3


def sam_weights():
    return oracle_weights(oracle.sam_gradient)


# -- pure functions ----------------------------------------------------------


def test_gsam_gradients_match_numpy_and_keep_the_sam_component():
    rng = np.random.RandomState(0)
    clean = [rng.randn(3, 2), rng.randn(2)]
    sam = [rng.randn(3, 2), rng.randn(2)]
    got = keras_sam.gsam_gradients(
        [tf.constant(g, tf.float32) for g in clean] + [None],
        [tf.constant(g, tf.float32) for g in sam] + [None],
        alpha=0.3,
    )
    got = [None if g is None else keras.ops.convert_to_numpy(g) for g in got]
    dot = sum(np.sum(g * s) for g, s in zip(clean, sam))
    squared = sum(np.sum(s * s) for s in sam)
    for g, s, out in zip(clean, sam, got):
        np.testing.assert_allclose(
            out, s - 0.3 * (g - dot / squared * s), rtol=1e-5, atol=1e-6
        )
    assert got[2] is None
    # The subtracted part is orthogonal to the SAM gradient.
    assert abs(sum(np.sum((o - s) * s) for o, s in zip(got, sam))) < 1e-4


def test_looksam_direction_is_per_tensor_orthogonal_and_reused_scaled():
    rng = np.random.RandomState(1)
    clean = [rng.randn(4, 3), rng.randn(3)]
    sam = [rng.randn(4, 3), rng.randn(3)]
    directions = keras_sam.looksam_direction(
        [tf.constant(g, tf.float32) for g in clean],
        [tf.constant(s, tf.float32) for s in sam],
    )
    for g, s, v in zip(clean, sam, directions):
        np.testing.assert_allclose(
            v, s - np.sum(g * s) / np.sum(g * g) * g, rtol=1e-5, atol=1e-6
        )
        assert abs(np.sum(np.asarray(v) * g)) < 1e-4
    new_clean = [rng.randn(4, 3), rng.randn(3)]
    reused = keras_sam.looksam_gradients(
        [tf.constant(g, tf.float32) for g in new_clean], directions, 0.7
    )
    for g, v, out in zip(new_clean, directions, reused):
        v = np.asarray(v)
        want = g + 0.7 * np.linalg.norm(g) / np.linalg.norm(v) * v
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    zero = keras_sam.looksam_gradients(
        [tf.constant(new_clean[1], tf.float32)], [tf.zeros(3)], 0.7
    )
    np.testing.assert_allclose(zero[0], new_clean[1], rtol=1e-6)


def test_rho_following_learning_rate_is_linear_in_the_learning_rate():
    lr = keras.optimizers.schedules.CosineDecay(0.1, 100, alpha=0.1)
    rho = keras_sam.schedules.RhoFollowingLearningRate(
        lr, rho_max=0.2, rho_min=0.02, lr_min=0.01
    )
    for step in (0, 30, 60, 100, 150):
        lr_t = float(lr(step))
        want = 0.02 + 0.18 * (lr_t - 0.01) / (0.1 - 0.01)
        np.testing.assert_allclose(float(rho(step)), want, rtol=1e-5)
    np.testing.assert_allclose(float(rho(0)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(rho(100)), 0.02, rtol=1e-5)


def test_step_draws_are_numpy_uint32_murmur_mixes():
    def numpy_draw(seed, step):
        with np.errstate(over="ignore"):
            x = np.uint32(step) + np.uint32(seed * 0x9E3779B9 & 0xFFFFFFFF)
            for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
                x ^= x >> np.uint32(shift)
                x *= np.uint32(multiplier)
            x ^= x >> np.uint32(16)
        return np.float32(x) / np.float32(2.0**32)

    for seed in (0, 5, 123456):
        for step in (0, 1, 7, 99_999, 2**31 - 1):
            got = switching.uniform_from_step(
                seed, keras.ops.convert_to_tensor(step, "int32")
            )
            assert float(got) == numpy_draw(seed, step), (seed, step)


def test_switching_policies_decide_as_documented():
    steps = tf.range(12, dtype=tf.int64)
    periodic = switching.Periodic(3)
    assert [bool(periodic(s)) for s in steps] == [i % 3 == 0 for i in range(12)]
    always = switching.Randomized(1.0)
    never = switching.Randomized(0.0)
    assert all(bool(always(s)) for s in steps)
    assert not any(bool(never(s)) for s in steps)
    half = switching.Randomized(0.3, seed=5)
    draws = [bool(half(s)) for s in tf.range(2000, dtype=tf.int64)]
    assert 0.26 < np.mean(draws) < 0.34
    # Keyed by the step: the same step draws the same, whatever came before.
    assert [bool(half(s)) for s in steps] == draws[:12]


def test_gradient_norm_outlier_tracks_the_ae_sam_statistics():
    policy = switching.GradientNormOutlier(
        decay=0.8, c_start=-0.5, c_end=1.0, decay_steps=10
    )
    want = oracle.gradient_norm_outlier(0.8, -0.5, 1.0, 10)
    norms = np.random.RandomState(2).lognormal(0.0, 0.5, 30)
    got = [
        bool(policy(tf.constant(t, tf.int64), n)) for t, n in enumerate(norms)
    ]
    assert got == [want(t, n) for t, n in enumerate(norms)]
    assert 0 < sum(got) < len(got)


# -- SAMModel against oracles -------------------------------------------------


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_gsam_matches_the_numpy_oracle(mode):
    model = fit_softmax(mode, rho=RHO, gsam_alpha=0.4)
    want = oracle_weights(oracle.gsam_gradient, alpha=0.4)
    assert_weights(model, want)
    assert_weights_differ(want, sam_weights())


def test_gsam_rho_follows_the_learning_rate_schedule():
    lr = keras.optimizers.schedules.PolynomialDecay(LR, 6, end_learning_rate=0)
    rho = keras_sam.schedules.RhoFollowingLearningRate(lr, RHO, 0.1)
    model = fit_softmax(
        rho=rho,
        gsam_alpha=0.4,
        optimizer=keras.optimizers.SGD(lr, momentum=MOMENTUM),
    )
    rates = [float(lr(t)) for t in range(6)]
    rhos = iter([0.1 + (RHO - 0.1) * r / LR for r in rates])

    def gradient(w, b, x, y, rho, sample_weight=None):
        return oracle.gsam_gradient(w, b, x, y, next(rhos), 0.4)

    assert_weights(model, oracle_weights(gradient, lr=lambda t: rates[t]))


def test_gsam_with_alpha_zero_and_constant_rho_is_sam():
    lr = keras.optimizers.schedules.PolynomialDecay(LR, 6, end_learning_rate=LR)
    constant = keras_sam.schedules.RhoFollowingLearningRate(
        keras.optimizers.schedules.PolynomialDecay(1.0, 6, 1.0 - 1e-9),
        rho_max=RHO,
        rho_min=RHO,
    )
    model = fit_softmax(
        rho=constant,
        gsam_alpha=0.0,
        optimizer=keras.optimizers.SGD(lr, momentum=MOMENTUM),
    )
    assert_weights(model, sam_weights())


def test_perturbing_only_the_bias_matches_the_masked_oracle():
    model = fit_softmax(rho=RHO, perturbed_variables=["bias"])
    want = oracle_weights(oracle.masked_sam_gradient, mask=(False, True))
    assert_weights(model, want)
    assert_weights_differ(want, sam_weights())


def test_perturbing_every_variable_by_pattern_is_sam():
    assert_weights(
        fit_softmax(rho=RHO, perturbed_variables=[".*"]), sam_weights()
    )


def test_normalization_selects_exactly_the_batchnorm_weights():
    model = keras_sam.SAMModel(
        bn_dropout_model(), perturbed_variables="normalization"
    )
    mask = keras_sam.selection.perturbed_mask(model, "normalization")
    chosen = [v.path for v, m in zip(model.trainable_variables, mask) if m]
    assert chosen and all("batch_normalization" in p for p in chosen)
    assert sorted(p.rsplit("/", 1)[1] for p in chosen) == ["beta", "gamma"]


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_periodic_switching_matches_the_oracle(mode):
    model = fit_softmax(mode, rho=RHO, switching=switching.Periodic(2))
    want = oracle_weights(oracle.Switching(lambda t, _: t % 2 == 0))
    assert_weights(model, want)
    assert_weights_differ(want, sam_weights())


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_looksam_matches_the_oracle(mode):
    model = fit_softmax(
        mode, rho=RHO, switching=switching.Periodic(3), looksam_alpha=0.7
    )
    looksam = oracle.Switching(lambda t, _: t % 3 == 0, looksam_alpha=0.7)
    want = oracle_weights(looksam)
    assert_weights(model, want)
    periodic = oracle_weights(oracle.Switching(lambda t, _: t % 3 == 0))
    assert_weights_differ(want, periodic)


def test_ae_sam_matches_the_oracle():
    policy = switching.GradientNormOutlier(
        decay=0.5, c_start=-0.2, c_end=0.5, decay_steps=4
    )
    model = fit_softmax(rho=RHO, switching=policy)
    decisions = oracle.Switching(
        oracle.gradient_norm_outlier(0.5, -0.2, 0.5, 4)
    )
    assert_weights(model, oracle_weights(decisions))
    assert 0 < sum(decisions.decisions) < len(decisions.decisions)


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_randomized_switching_matches_its_eager_draws(mode):
    policy = switching.Randomized(0.5, seed=3)
    draws = [bool(policy(tf.constant(t, tf.int64))) for t in range(6)]
    assert 0 < sum(draws) < 6
    model = fit_softmax(
        mode, rho=RHO, switching=switching.Randomized(0.5, seed=3)
    )
    assert_weights(
        model, oracle_weights(oracle.Switching(lambda t, _: draws[t]))
    )


@pytest.mark.parametrize(
    "policy",
    [
        switching.Periodic(1),
        switching.Randomized(1.0),
        switching.GradientNormOutlier(c_start=-1e9),
    ],
    ids=["periodic_1", "probability_1", "ae_sam_threshold_low"],
)
@pytest.mark.parametrize("looksam_alpha", [None, 0.7])
def test_switching_that_always_chooses_sam_is_sam(policy, looksam_alpha):
    model = fit_softmax(rho=RHO, switching=policy, looksam_alpha=looksam_alpha)
    assert_weights(model, sam_weights())


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_switching_that_never_chooses_sam_is_the_base_fit(mode):
    x, y, _, _ = softmax_data()
    trained = []
    never = switching.Randomized(0.0)
    for wrap in (
        lambda m: m,
        lambda m: keras_sam.SAMModel(m, rho=RHO, switching=never),
    ):
        base = bn_dropout_model()
        model = wrap(base)
        model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        trained.append([v.numpy() for v in base.variables])
    for plain, never_sam in zip(*trained):
        backends.assert_matches_plain_fit(
            never_sam, plain, mode, rtol=1e-6, atol=1e-7
        )


# -- distribution, saving, arguments ------------------------------------------


@backends.tensorflow_only
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(switching=switching.Periodic(2)),
        dict(switching=switching.Randomized(0.5, seed=3)),
        dict(switching=switching.Periodic(3), looksam_alpha=0.7),
    ],
    ids=["periodic", "randomized", "looksam"],
)
def test_synced_switching_under_mirrored_strategy_equals_one_device(kwargs):
    one = fit_softmax(rho=RHO, **kwargs)
    two = fit_softmax(
        rho=RHO, strategy=mirrored(), sync_perturbations=True, **kwargs
    )
    if "looksam_alpha" in kwargs:
        # Between SAM steps each replica rescales g_v to its own ‖g‖, so
        # only the SAM steps are the one-device computation.
        assert np.all(np.isfinite(two.base.get_weights()[0]))
        return
    assert_weights(two, one.base.get_weights())


@backends.tensorflow_only
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gsam_alpha=0.4),
        dict(perturbed_variables=["bias"]),
        dict(switching=switching.GradientNormOutlier()),
    ],
    ids=["gsam", "sam_on", "ae_sam"],
)
def test_variants_train_under_mirrored_strategy(kwargs):
    model = fit_softmax(rho=RHO, strategy=mirrored(), **kwargs)
    weights = model.base.get_weights()
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert_weights_differ(weights, softmax_data()[2:])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(switching=switching.Periodic(3), looksam_alpha=0.7),
        dict(switching=switching.GradientNormOutlier(decay=0.5, c_start=0.0)),
        dict(switching=switching.Randomized(0.5, seed=4)),
    ],
    ids=["looksam", "ae_sam", "randomized"],
)
def test_variant_state_survives_a_keras_file_round_trip(tmp_path, kwargs):
    x, y, w0, b0 = softmax_data()

    def make(**kw):
        model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=RHO, **kw)
        model.compile(optimizer=sgd(), loss=xent())
        return model

    whole = make(**kwargs)
    whole.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    first = make(
        **{
            k: (v.from_config(v.get_config()) if k == "switching" else v)
            for k, v in kwargs.items()
        }
    )
    first.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    state = [v.numpy() for v in first.non_trainable_variables]
    first.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for got, want in zip(loaded.non_trainable_variables, state):
        np.testing.assert_array_equal(got.numpy(), want)
    if not isinstance(kwargs["switching"], switching.Randomized):
        assert any(np.any(s != 0) for s in state)
    # Randomized keeps no state of its own: its draws are keyed by the
    # optimizer's step counter, which the file also restores.
    loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert_weights(loaded, whole.base.get_weights(), rtol=1e-6, atol=1e-7)


def test_variant_arguments_round_trip_through_get_config():
    lr = keras.optimizers.schedules.CosineDecay(0.1, 100)
    model = keras_sam.SAMModel(
        softmax_regression(*softmax_data()[2:]),
        rho=keras_sam.schedules.RhoFollowingLearningRate(lr, 0.1, 0.01),
        gsam_alpha=0.3,
        perturbed_variables=["bias", "kernel"],
        switching=switching.GradientNormOutlier(0.8, -1.0, 2.0, 50),
        looksam_alpha=0.5,
    )
    clone = keras_sam.SAMModel.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert clone.gsam_alpha == 0.3 and clone.looksam_alpha == 0.5
    assert clone.perturbed_variables == ["bias", "kernel"]
    assert clone.switching.get_config() == model.switching.get_config()
    assert float(clone.rho(50)) == pytest.approx(float(model.rho(50)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gsam_alpha=-0.1), "gsam_alpha=-0.1"),
        (dict(perturbed_variables="norms"), "perturbed_variables='norms'"),
        (dict(perturbed_variables=[]), "perturbed_variables=[]"),
        (dict(switching="periodic"), "switching='periodic'"),
        (dict(looksam_alpha=0.7), "switching=None"),
        (
            dict(
                looksam_alpha=0.7,
                switching=switching.Periodic(2),
                micro_batches=2,
            ),
            "micro_batches=2",
        ),
        (dict(rho="0.05"), "rho='0.05'"),
    ],
)
def test_bad_variant_arguments_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        keras_sam.SAMModel(softmax_regression(*softmax_data()[2:]), **kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: switching.Periodic(0), "every=0"),
        (lambda: switching.Randomized(1.5), "probability=1.5"),
        (lambda: switching.GradientNormOutlier(decay=1.0), "decay=1.0"),
        (
            lambda: keras_sam.schedules.RhoFollowingLearningRate(0.1),
            "learning_rate=0.1",
        ),
    ],
)
def test_bad_policy_arguments_name_the_argument_and_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_selector_matching_nothing_fails_at_the_first_step():
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0), perturbed_variables=["no_such_weight"]
    )
    model.compile(optimizer=sgd(), loss=xent())
    with pytest.raises(ValueError, match="selects none"):
        model.fit(x, y, batch_size=BATCH, verbose=0)


VARIANT_SETTINGS = {
    "gsam": lambda: dict(gsam_alpha=0.3),
    "sam_on": lambda: dict(perturbed_variables=["bias"]),
    "periodic": lambda: dict(switching=switching.Periodic(2)),
    "randomized": lambda: dict(switching=switching.Randomized(0.5, seed=1)),
    "ae_sam": lambda: dict(switching=switching.GradientNormOutlier(0.5)),
    "looksam": lambda: dict(switching=switching.Periodic(3), looksam_alpha=0.7),
    "msam": lambda: dict(perturbation="momentum"),
}


@pytest.mark.parametrize("variant", VARIANT_SETTINGS)
def test_every_variant_trains_the_same_with_xla(variant):
    graph = fit_softmax("graph", rho=RHO, **VARIANT_SETTINGS[variant]())
    jit = fit_softmax("jit", rho=RHO, **VARIANT_SETTINGS[variant]())
    assert_weights(jit, graph.base.get_weights())
    assert_weights_differ(graph.base.get_weights(), softmax_data()[2:])


def test_the_fraction_of_sam_steps_is_logged_per_epoch():
    x, y, w0, b0 = softmax_data()
    model = keras_sam.SAMModel(
        softmax_regression(w0, b0), rho=RHO, switching=switching.Periodic(2)
    )
    model.compile(optimizer=sgd(), loss=xent())
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    # Steps 0, 1, 2 then 3, 4, 5: SAM on 0 and 2, then on 4.
    np.testing.assert_allclose(history.history["sam_fraction"], [2 / 3, 1 / 3])
    assert "sam_fraction" not in model.evaluate(
        x, y, verbose=0, return_dict=True
    )


def _three_layers(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", name="h0"),
            keras.layers.Dense(3, activation="tanh", name="h"),
            keras.layers.Dense(2, name="out"),
        ]
    )


VARIANT_STATE = {
    "looksam": (
        dict(switching=switching.Periodic(2), looksam_alpha=0.7),
        "_looksam_directions",
    ),
    "friendly": (dict(perturbation="friendly"), "_friendly_averages"),
}


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("variant", sorted(VARIANT_STATE))
def test_a_layer_frozen_after_build_keeps_each_variables_state(variant, mode):
    # The state is per variable: freezing `h` once the state is made must
    # train as freezing it first does (with `out`'s state copied over),
    # and leave `h`'s state alone. Picked by position, `out`'s kernel took
    # `h`'s state.
    options, attribute = VARIANT_STATE[variant]
    rng = np.random.RandomState(0)
    x = rng.randn(24, 4).astype("float32")
    y = rng.randint(0, 2, 24).astype("int32")

    def compiled(base):
        model = keras_sam.SAMModel(base, rho=0.5, **options)
        model.compile(optimizer=sgd(), loss=xent(), **MODES[mode])
        return model

    def fit(model, rows):
        model.fit(x[rows], y[rows], batch_size=8, shuffle=False, verbose=0)

    late = compiled(_three_layers(1))
    fit(late, slice(0, 8))  # makes the state, every slot non-zero
    state = getattr(late, attribute)
    h_state = [s.numpy().copy() for s in state[2:4]]
    assert all(np.abs(s.numpy()).max() > 0 for s in state)
    late.base.get_layer("h").trainable = False
    late.compile(optimizer=sgd(), loss=xent(), **MODES[mode])

    first = _three_layers(1)
    first.set_weights(late.base.get_weights())
    first.get_layer("h").trainable = False
    early = compiled(first)
    for mine, theirs in zip(getattr(early, attribute), state[:2] + state[4:]):
        mine.assign(theirs)

    fit(late, slice(8, 24))
    fit(early, slice(8, 24))
    for got, want in zip(late.base.get_weights(), early.base.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for kept, before in zip(state[2:4], h_state):
        np.testing.assert_array_equal(kept.numpy(), before)


@pytest.mark.parametrize("variant", sorted(VARIANT_STATE))
def test_a_layer_unfrozen_after_build_is_refused_until_a_new_sam_model(
    variant,
):
    options, _ = VARIANT_STATE[variant]
    x = np.ones((8, 4), "float32")
    y = np.zeros(8, "int32")
    base = _three_layers(1)
    base.get_layer("h").trainable = False
    model = keras_sam.SAMModel(base, rho=0.5, **options)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=8, verbose=0)
    base.get_layer("h").trainable = True
    model.compile(optimizer=sgd(), loss=xent())
    with pytest.raises(ValueError, match=r"subclass\): \['.*h/kernel'"):
        model.fit(x, y, batch_size=8, verbose=0)
    model = keras_sam.SAMModel(base, **model.options.as_kwargs())
    model.compile(optimizer=sgd(), loss=xent())
    h_kernel = base.get_layer("h").kernel.numpy().copy()
    model.fit(x, y, batch_size=8, verbose=0)
    assert np.abs(base.get_layer("h").kernel.numpy() - h_kernel).max() > 0


def bn_model(seed=5):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(6),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(C),
        ]
    )


def looksam_by_hand(model, x, y, rho, alpha, every, lr, epochs):
    """LookSAM written out with a tape and plain SGD: the clean pass alone
    moves BatchNorm's statistics; every `every`-th step (from the first)
    takes SAM's gradient and keeps its part orthogonal to the clean one,
    per weight; the other steps add that part at α times the weight's
    clean gradient norm."""
    weights, stats = model.trainable_variables, model.non_trainable_variables
    loss_fn = xent()

    def gradients(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return [g.numpy() for g in tape.gradient(loss, weights)]

    directions = [np.zeros(w.shape, np.float32) for w in weights]
    for step, (x_t, y_t, _) in enumerate(batches(x, y) * epochs):
        clean = gradients(x_t, y_t)
        if step % every == 0:
            at_w = [w.numpy() for w in weights]
            kept = [s.numpy() for s in stats]
            norm = np.sqrt(sum(np.sum(g * g) for g in clean))
            for w, g in zip(weights, clean):
                w.assign_add(rho * g / norm)
            update = gradients(x_t, y_t)
            for v, value in zip(weights + stats, at_w + kept):
                v.assign(value)
            directions = [
                s - np.sum(g * s) / np.sum(g * g) * g
                for g, s in zip(clean, update)
            ]
        else:
            update = [
                g + alpha * np.linalg.norm(g) / np.linalg.norm(v) * v
                for g, v in zip(clean, directions)
            ]
        for w, u in zip(weights, update):
            w.assign_sub(lr * u)
    return model.get_weights()


@backends.tensorflow_only
def test_looksam_with_batchnorm_matches_a_hand_written_loop():
    # The CNN study's LookSAM trained far below SGD; its two passes and
    # BatchNorm's statistics here follow the loop above, step by step.
    x, y, _, _ = softmax_data()
    kwargs = dict(rho=RHO, alpha=0.7, every=3, lr=0.1, epochs=EPOCHS)
    want = looksam_by_hand(bn_model(), x, y, **kwargs)
    models = {}
    for alpha in (kwargs["alpha"], None):
        model = keras_sam.SAMModel(
            bn_model(),
            rho=kwargs["rho"],
            switching=switching.Periodic(kwargs["every"]),
            looksam_alpha=alpha,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(kwargs["lr"]),
            loss=xent(),
        )
        model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0
        )
        models[alpha] = model
    assert_weights(models[kwargs["alpha"]], want)
    assert_weights_differ(want, models[None].base.get_weights())
