"""Seeded fuzzing of the SAM step: random small models, batches and data.

The property: SAM never makes the weights non-finite where the base
optimizer's own step (ρ = 0, the same model, data and seed) keeps them
finite; a non-finite SAM gradient under loss scaling is skipped, as Keras
skips any overflowing step; and every refusal is a clear error.
"""

import re

import keras
import numpy as np
import pytest

import keras_sam
from tests import oracle
from tests.mixed_precision_test import mixed_float16  # noqa: F401
from tests.sam_model_test import BATCH
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression
from tests.sam_model_test import xent
from tests.sparse_gradients_test import DenseLookup

CASES = 8


def random_case(seed):
    rng = np.random.RandomState(seed)
    image = rng.rand() < 0.4
    layers = []
    if image:
        shape = (4, 4, 1)
        layers.append(keras.layers.Conv2D(rng.randint(1, 3), 3, padding="same"))
        if rng.rand() < 0.5:
            layers.append(keras.layers.BatchNormalization())
        layers.append(keras.layers.Flatten())
    else:
        shape = (5,)
    layers.append(keras.layers.Dense(rng.randint(1, 5), activation="relu"))
    if rng.rand() < 0.5:
        layers.append(keras.layers.BatchNormalization())
    if rng.rand() < 0.5:
        layers.append(keras.layers.Dropout(rng.uniform(0.1, 0.6)))
    layers.append(keras.layers.Dense(3))
    batch = int(rng.choice([1, 2, 3, 5, 8]))
    n = 2 * batch + rng.randint(0, batch)  # often a partial last batch
    x_scale = float(rng.choice([0.0, 1.0, 1e4]))
    weights = rng.choice(["none", "random", "zeros"])
    sample_weight = {
        "none": None,
        "random": rng.uniform(0, 2, n),
        "zeros": np.zeros(n),
    }[weights]
    return dict(
        shape=shape,
        layers=layers,
        batch=batch,
        x=(x_scale * rng.randn(n, *shape)).astype("float32"),
        y=rng.randint(0, 3, n),
        sample_weight=sample_weight,
        rho=float(rng.choice([0.05, 2.0])),
        adaptive=bool(rng.rand() < 0.5),
        model_seed=seed,
    )


def base_model(case):
    """A fresh copy of `case`'s model, initialized from its seed."""
    keras.utils.set_random_seed(case["model_seed"])
    return keras.Sequential(
        [keras.Input(case["shape"])]
        + [
            keras.layers.deserialize(keras.layers.serialize(layer))
            for layer in case["layers"]
        ]
    )


def fit_case(model, case, **compile_kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss=xent(), **compile_kwargs
    )
    model.fit(
        case["x"],
        case["y"],
        sample_weight=case["sample_weight"],
        batch_size=case["batch"],
        shuffle=False,
        verbose=0,
    )


def train(case, rho):
    base = base_model(case)
    before = [v.numpy() for v in base.trainable_variables]
    model = keras_sam.SAMModel(base, rho=rho, adaptive=case["adaptive"])
    fit_case(model, case, run_eagerly=True)
    return before, base


def finite(model):
    return all(
        np.all(np.isfinite(v.numpy()))
        for v in model.variables
        if "float" in v.dtype
    )


def test_sam_keeps_weights_finite_wherever_the_base_step_does():
    checked = 0
    for seed in range(CASES):
        case = random_case(seed)
        _, plain = train(case, rho=0.0)
        before, sam = train(case, rho=case["rho"])
        if not finite(plain):
            continue
        checked += 1
        assert finite(sam), f"seed {seed}: {case}"
        if (
            case["sample_weight"] is not None
            and not case["sample_weight"].any()
        ):
            # No example counts: g = 0, ε = 0 and the SAM gradient is 0.
            for want, got in zip(before, sam.trainable_variables):
                np.testing.assert_array_equal(got.numpy(), want)
    assert checked >= CASES - 2


def test_huge_finite_gradients_keep_the_sam_direction():
    # ‖g‖² overflows float32 (g ~ 1e21) though ‖g‖ does not: ε must still
    # be ρ g / ‖g‖, not zero.
    x, y, w0, b0 = softmax_data()
    x = (1e21 * x).astype("float32")
    _, got = keras_sam.sam_gradients(
        softmax_regression(w0, b0), x, y, xent(), rho=0.5
    )
    x64 = x.astype("float64")
    with np.errstate(divide="ignore"):  # the loss is infinite, not needed
        _, want = oracle.sam_gradient(w0, b0, x64, y, 0.5)
        _, clean = oracle.softmax_regression_loss_and_grad(w0, b0, x64, y)
    scale = np.abs(want[0]).max()
    np.testing.assert_allclose(got[0], want[0], atol=1e-5 * scale)
    assert np.abs(clean[0] - want[0]).max() > 1e-2 * scale


def test_an_overflow_in_the_perturbed_pass_alone_skips_the_step(
    mixed_float16,  # noqa: F811
):
    x, y, w0, b0 = softmax_data()
    x, y = x[:BATCH], y[:BATCH]
    # Clean logits up to 3e4, finite in float16 (max 65504); a ρ of 5 moves
    # them past it, so only the perturbed pass overflows.
    x = (3e4 / np.abs(x @ w0).max() * x).astype("float32")
    model = keras_sam.SAMModel(softmax_regression(w0, b0), rho=5.0)
    model.compile(optimizer=keras.optimizers.SGD(1e-9), loss=xent())
    clean = softmax_regression(w0, b0)(x.astype("float16"))
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(clean)))
    scale = model.optimizer.initial_scale
    model.fit(x, y, batch_size=BATCH, verbose=0)
    got_w, got_b = model.base.get_weights()
    np.testing.assert_array_equal(got_w, w0)
    np.testing.assert_array_equal(got_b, b0)
    assert float(model.optimizer.dynamic_scale) == scale / 2


@pytest.mark.parametrize("seed", range(4))
def test_random_bad_arguments_are_refused_naming_the_value(seed):
    rng = np.random.RandomState(seed)
    bad = [
        ("rho", -rng.uniform(0.01, 10)),
        ("rho", float("nan")),
        ("rho", str(rng.uniform())),
        ("eta", -rng.uniform()),
        ("micro_batches", -rng.randint(0, 5)),
        ("micro_batches", 1.5),
        ("adaptive", rng.choice(["yes", "no", "1"])),
        ("sync_perturbations", int(rng.randint(0, 2))),
        ("gsam_alpha", -rng.uniform()),
        ("looksam_alpha", -rng.uniform()),
    ]
    for name, value in bad:
        base = softmax_regression(*softmax_data()[2:])
        with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
            keras_sam.SAMModel(base, **{name: value})


def random_text_case(seed):
    rng = np.random.RandomState(100 + seed)
    vocabulary = int(rng.randint(2, 12))
    width = int(rng.randint(1, 5))
    length = int(rng.randint(1, 8))
    batch = int(rng.choice([1, 3, 8]))
    n = 2 * batch + rng.randint(0, batch)
    # Tokens from a few ids, so most lookups repeat within a batch.
    tokens = rng.randint(0, min(vocabulary, 3), (n, length)).astype("int32")
    variant = rng.choice(["sam", "asam", "gsam", "micro", "looksam"])
    options = {
        "sam": {},
        "asam": {"adaptive": True},
        "gsam": {"gsam_alpha": float(rng.uniform(0, 1))},
        "micro": {"micro_batches": int(rng.randint(2, 4))},
        "looksam": {
            "switching": keras_sam.switching.Periodic(2),
            "looksam_alpha": 0.7,
        },
    }[variant]
    return dict(
        vocabulary=vocabulary,
        width=width,
        length=length,
        batch=batch,
        tokens=tokens,
        y=rng.randint(0, 3, n),
        hidden=bool(rng.rand() < 0.5),
        rho=float(rng.choice([0.05, 2.0])),
        options=options,
        jit_compile=bool(rng.rand() < 0.5)
        and keras.backend.backend() != "torch",
        weights_seed=seed,
    )


def train_text(case, lookup):
    layers = [keras.Input((case["length"],), dtype="int32"), lookup]
    layers.append(keras.layers.GlobalAveragePooling1D())
    if case["hidden"]:
        layers.append(keras.layers.Dense(4, activation="tanh"))
    layers.append(keras.layers.Dense(3))
    base = keras.Sequential(layers)
    rng = np.random.RandomState(case["weights_seed"])
    base.set_weights(
        [rng.randn(*w.shape).astype("float32") for w in base.get_weights()]
    )
    options = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(case["options"])
    )
    model = keras_sam.SAMModel(base, rho=case["rho"], **options)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=xent(),
        jit_compile=case["jit_compile"],
    )
    model.fit(
        case["tokens"],
        case["y"],
        batch_size=case["batch"],
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    return base.get_weights()


@pytest.mark.parametrize("seed", range(6))
def test_an_embedding_steps_as_its_dense_equivalent(seed):
    case = random_text_case(seed)
    sizes = (case["vocabulary"], case["width"])
    sparse = train_text(case, keras.layers.Embedding(*sizes))
    dense = train_text(case, DenseLookup(*sizes))
    for got, want in zip(sparse, dense):
        np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}: {case}"
        )


def fit_on_devices(case, devices, **sam_kwargs):
    """`case`'s model after one epoch, on `devices` JAX devices with
    DataParallel (None: no distribution); a plain fit without
    `sam_kwargs`."""
    distribution = None
    if devices:
        distribution = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices("cpu")[:devices]
        )
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        base = base_model(case)
        model = keras_sam.SAMModel(base, **sam_kwargs) if sam_kwargs else base
        fit_case(model, case)
        return [v.numpy() for v in base.variables]
    finally:
        keras.distribution.set_distribution(previous)


def seeds_with_batchnorm(count):
    def has_batchnorm(seed):
        return any(
            isinstance(layer, keras.layers.BatchNormalization)
            for layer in random_case(seed)["layers"]
        )

    return [seed for seed in range(100) if has_batchnorm(seed)][:count]


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution runs on the JAX backend",
)
@pytest.mark.parametrize("seed", seeds_with_batchnorm(4))
def test_data_parallel_steps_as_keras_and_as_per_device_parts(seed):
    case = random_case(seed)
    # Each device's shard draws its own dropout masks, which one device's
    # micro-batches cannot (tests/jax_distribution_test.py checks them).
    case["layers"] = [
        layer
        for layer in case["layers"]
        if not isinstance(layer, keras.layers.Dropout)
    ]
    # Two devices take equal halves: even batches, no partial last batch.
    case["batch"] = 2 * case["batch"]
    n = 2 * case["batch"]
    for key in ("x", "y", "sample_weight"):
        if case[key] is not None:
            case[key] = np.resize(case[key], (n,) + case[key].shape[1:])
    plain = fit_on_devices(case, 2)
    rho_zero = fit_on_devices(case, 2, rho=0.0, adaptive=case["adaptive"])
    for want, got in zip(plain, rho_zero):
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    sam = fit_on_devices(case, 2, rho=case["rho"], adaptive=case["adaptive"])
    parts = fit_on_devices(
        case, None, rho=case["rho"], adaptive=case["adaptive"], micro_batches=2
    )
    # Inputs up to 1e4 and one-example BatchNorm amplify float32 rounding:
    # the two programs order their sums differently.
    for got, want in zip(sam, parts):
        np.testing.assert_allclose(
            got, want, rtol=1e-3, atol=1e-4, err_msg=f"seed {seed}: {case}"
        )


@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="torch.compile is PyTorch's jit_compile",
)
@pytest.mark.parametrize("seed", seeds_with_batchnorm(4))
def test_torch_compile_steps_as_eager_execution(seed):
    # Random models with BatchNorm (two with dropout, one convolutional):
    # the compiled SAM step gives the eager step's numbers to float32
    # rounding.
    case = random_case(seed)
    trained = []
    for compile_kwargs in ({"run_eagerly": True}, {"jit_compile": True}):
        base = base_model(case)
        model = keras_sam.SAMModel(
            base, rho=case["rho"], adaptive=case["adaptive"]
        )
        fit_case(model, case, **compile_kwargs)
        trained.append([v.numpy() for v in base.variables])
    for eager, compiled in zip(*trained):
        np.testing.assert_allclose(
            compiled, eager, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}"
        )
