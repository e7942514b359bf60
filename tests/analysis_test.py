"""keras_sam.analysis against analytic Hessians and hand-computed values."""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sam import analysis
from keras_sam import backend
from tests import backends


def least_squares(x, y, w=None, batch=16):
    """Dense(1) without bias and MSE: H = 2 XᵀX / n, whatever w is."""
    model = keras.Sequential(
        [keras.Input((x.shape[1],)), keras.layers.Dense(1, use_bias=False)]
    )
    if w is not None:
        model.set_weights([w])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    return model, dataset


def design_with_spectrum(eigenvalues, n=64, seed=0):
    """X whose least-squares Hessian 2XᵀX/n has exactly `eigenvalues`."""
    rng = np.random.default_rng(seed)
    d = len(eigenvalues)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    singular = np.sqrt(np.asarray(eigenvalues) * n / 2.0)
    return (u * singular) @ v.T


def mse(y, y_pred):
    return keras.losses.mean_squared_error(y, y_pred)


def test_top_eigenvalues_match_the_least_squares_hessian():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 12)).astype("float32")
    y = rng.standard_normal((80, 1)).astype("float32")
    model, dataset = least_squares(x, y)
    want = np.sort(np.linalg.eigvalsh(2 * x.T.astype(np.float64) @ x / 80))
    got = analysis.hessian_top_eigenvalues(model, dataset, mse, k=3)
    np.testing.assert_allclose(got, want[::-1][:3], rtol=1e-2)
    assert got[0] >= got[1] >= got[2]


def test_top_eigenvalues_of_a_known_spectrum():
    spectrum = [24.0, 10.0, 3.0, 1.0, 0.5, 0.1]
    x = design_with_spectrum(spectrum).astype("float32")
    model, dataset = least_squares(x, np.zeros((64, 1), "float32"))
    got = analysis.hessian_top_eigenvalues(model, dataset, mse, k=2)
    np.testing.assert_allclose(got, [24.0, 10.0], rtol=1e-2)


def test_repeated_eigenvalues_come_as_often_as_they_are():
    # One start vector sees each eigenvalue once: this had given
    # [5, 1, 0].
    x = design_with_spectrum([5.0, 5.0, 5.0, 1.0]).astype("float32")
    model, dataset = least_squares(x, np.zeros((64, 1), "float32"))
    got = analysis.hessian_top_eigenvalues(
        model, dataset, mse, k=3, max_iterations=20
    )
    np.testing.assert_allclose(got, [5.0, 5.0, 5.0], rtol=1e-5)


def test_a_repeated_zero_of_an_indefinite_hessian_comes_in_its_place():
    # L = mean((b·(a·x) − y)²) at a = b = 0: H = [[0, c], [cᵀ, 0]] with
    # c = −2 mean(x y), eigenvalues ±‖c‖ and 0 twice. It had given
    # [‖c‖, 0, −‖c‖] for k = 3 and a padded 0 after −‖c‖ for k = 4.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype("float32")
    y = x @ np.array([[1.0], [2.0], [-1.0]], "float32")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    c = np.linalg.norm(2 * (x.astype(np.float64) * y).mean(axis=0))
    got = analysis.hessian_top_eigenvalues(model, dataset, mse, k=4)
    np.testing.assert_allclose(got, [c, 0.0, 0.0, -c], rtol=1e-5, atol=1e-6)


def test_zero_hessian_gives_zeros_not_nan():
    x = np.zeros((32, 4), "float32")
    model, dataset = least_squares(x, np.zeros((32, 1), "float32"))
    got = analysis.hessian_top_eigenvalues(model, dataset, mse, k=2)
    np.testing.assert_array_equal(got, [0.0, 0.0])


def test_spectral_density_puts_its_mass_at_the_eigenvalues():
    spectrum = [8.0, 8.0, 2.0, 2.0]
    x = design_with_spectrum(spectrum).astype("float32")
    model, dataset = least_squares(x, np.zeros((64, 1), "float32"))
    grid, density, nodes, _ = analysis.hessian_spectral_density(
        model, dataset, mse, lanczos_steps=4, num_probes=2, sigma=0.1
    )
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-2)
    np.testing.assert_allclose(
        np.sort(np.unique(np.round(np.concatenate(nodes), 3))),
        [2.0, 8.0],
        rtol=1e-3,
    )
    peak = grid[np.argmax(density)]
    assert abs(peak - 2.0) < 0.1 or abs(peak - 8.0) < 0.1


def test_no_seed_draws_what_another_seed_draws():
    # Probes and directions were drawn with `seed + i`: seed 0's second
    # probe was seed 1's first, and so for the landscape's directions.
    x = design_with_spectrum([8.0, 4.0, 2.0, 1.0]).astype("float32")
    y = np.ones((64, 1), "float32")
    model, dataset = least_squares(x, y, np.ones((4, 1), "float32"))
    weights = [
        analysis.hessian_spectral_density(
            model, dataset, mse, lanczos_steps=4, num_probes=2, seed=seed
        )[3]
        for seed in (0, 1)
    ]
    assert not np.allclose(weights[0][1], weights[1][0])
    second_of_0 = analysis.loss_landscape_2d(model, dataset, mse, [0], [1])
    first_of_1 = analysis.loss_landscape_2d(
        model, dataset, mse, [1], [0], seed=1
    )
    assert abs(second_of_0 - first_of_1) > 1e-3 * abs(first_of_1)


def test_analysis_changes_no_state_of_a_batchnorm_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )
    x = np.random.default_rng(0).standard_normal((16, 4)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(8)
    before = [v.numpy() for v in model.variables]
    # TensorFlow refuses the Hessian through batch statistics.
    analysis.hessian_top_eigenvalues(
        model,
        dataset,
        mse,
        training=backends.BACKEND != "tensorflow",
        max_iterations=5,
    )
    analysis.m_sharpness(model, dataset, mse, rho=0.1, m=4, training=True)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(v.numpy(), b)


def test_m_sharpness_of_least_squares_matches_the_closed_form():
    # For a quadratic, L(w + ε) − L(w) = gᵀε + ½ εᵀHε exactly.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 3))
    y = rng.standard_normal((12, 1))
    w = rng.standard_normal((3, 1))
    model, dataset = least_squares(
        x.astype("float32"), y.astype("float32"), w.astype("float32"), batch=5
    )
    rho, m = 0.3, 4
    want = []
    for i in range(0, 12, m):
        xs, ys = x[i : i + m], y[i : i + m]
        g = 2 * xs.T @ (xs @ w - ys) / m
        h = 2 * xs.T @ xs / m
        eps = rho * g / np.linalg.norm(g)
        want.append((g.T @ eps + 0.5 * eps.T @ h @ eps).item())
    got = analysis.m_sharpness(model, dataset, mse, rho=rho, m=m)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-4)


def test_filter_normalization_keeps_each_filters_norm():
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((3, 3, 2, 5))
    bias = rng.standard_normal(5)
    d_kernel, d_bias = analysis.filter_normalized_direction([kernel, bias])
    np.testing.assert_allclose(
        np.linalg.norm(d_kernel.reshape(-1, 5), axis=0),
        np.linalg.norm(kernel.reshape(-1, 5), axis=0),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(d_bias, np.zeros(5))
    assert not np.allclose(d_kernel, kernel)


def test_landscape_at_the_origin_is_the_models_loss():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 3)).astype("float32")
    y = rng.standard_normal((20, 1)).astype("float32")
    model, dataset = least_squares(x, y)
    model.compile(loss="mse")
    want = model.evaluate(x, y, verbose=0)
    line = analysis.loss_landscape_1d(model, dataset, mse, [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(line[1], want, rtol=1e-5)
    assert line[0] + line[2] > 2 * line[1]  # convex problem
    surface = analysis.loss_landscape_2d(
        model, dataset, mse, [-0.5, 0.0, 0.5], [0.0, 0.5]
    )
    assert surface.shape == (3, 2)
    np.testing.assert_allclose(surface[1, 0], want, rtol=1e-5)


def test_landscapes_are_the_loss_along_their_directions():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 3))
    y = rng.standard_normal((20, 1))
    w, d1, d2 = (rng.standard_normal((3, 1)) for _ in range(3))
    model, dataset = least_squares(x, y, w)

    def loss(a, b=0.0):
        return np.mean((x @ (w + a * d1 + b * d2) - y) ** 2)

    alphas, betas = [-1.0, 0.5], [0.0, 2.0, -0.5]
    line = analysis.loss_landscape_1d(model, dataset, mse, alphas, [d1])
    np.testing.assert_allclose(line, [loss(a) for a in alphas], rtol=1e-5)
    surface = analysis.loss_landscape_2d(
        model, dataset, mse, alphas, betas, ([d1], [d2])
    )
    want = [[loss(a, b) for b in betas] for a in alphas]
    np.testing.assert_allclose(surface, want, rtol=1e-5)


def test_interpolation_ends_at_both_models():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 3)).astype("float32")
    y = rng.standard_normal((20, 1)).astype("float32")
    a, dataset = least_squares(x, y, rng.standard_normal((3, 1)))
    b, _ = least_squares(x, y, rng.standard_normal((3, 1)))
    a.compile(loss="mse")
    b.compile(loss="mse")
    path = analysis.linear_interpolation(a, b, dataset, mse, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(path[0], a.evaluate(x, y, verbose=0), rtol=1e-5)
    np.testing.assert_allclose(path[2], b.evaluate(x, y, verbose=0), rtol=1e-5)


def test_plots_write_png_files(tmp_path):
    alphas = np.linspace(-1, 1, 5)
    analysis.plot_landscape_1d(
        alphas, [alphas**2, 2 * alphas**2], tmp_path / "a.png", ["sgd", "sam"]
    )
    analysis.plot_landscape_2d(
        alphas, alphas, [np.outer(alphas, alphas) ** 2] * 2, tmp_path / "b.png"
    )
    analysis.plot_spectral_density(
        alphas, np.exp(-(alphas**2)), tmp_path / "c.png"
    )
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "Received: k=0"),
        (dict(k=99), "`k=99` exceeds"),
        (dict(k=True), "Received: k=True"),
        (  # it had padded the values it had no steps for with zeros
            dict(k=3, max_iterations=2),
            "`max_iterations` must be an integer >= 3. Received: "
            "max_iterations=2",
        ),
        (dict(max_iterations=0), "Received: max_iterations=0"),
        (dict(tol=float("nan")), "`tol` must be finite"),
        (dict(tol=0.0), "`tol` must be > 0. Received: tol=0.0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    model, dataset = least_squares(np.ones((4, 3), "float32"), np.ones((4, 1)))
    with pytest.raises(ValueError, match=re.escape(message)):
        analysis.hessian_top_eigenvalues(model, dataset, mse, **kwargs)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, d: analysis.hessian_spectral_density(
                m, d, mse, lanczos_steps=0
            ),
            "Received: lanczos_steps=0",
        ),
        (
            lambda m, d: analysis.hessian_spectral_density(
                m, d, mse, num_probes=0
            ),
            "Received: num_probes=0",
        ),
        (
            lambda m, d: analysis.hessian_spectral_density(m, d, mse, sigma=0),
            "`sigma` must be > 0. Received: sigma=0",
        ),
        (
            lambda m, d: analysis.m_sharpness(m, d, mse, rho=0.0, m=2),
            "`rho` must be > 0. Received: rho=0.0",
        ),
        (
            lambda m, d: analysis.m_sharpness(m, d, mse, rho=np.inf, m=2),
            "`rho` must be finite",
        ),
        (
            lambda m, d: analysis.m_sharpness(m, d, mse, rho=0.1, m=True),
            "Received: m=True",
        ),
        (
            lambda m, d: analysis.loss_landscape_1d(
                m, d, mse, [0.0], direction=[]
            ),
            "one array per trainable weight: 1. Received: 0 arrays",
        ),
        (
            lambda m, d: analysis.loss_landscape_1d(
                m, d, mse, [0.0], direction=[np.ones(1)]
            ),
            "`direction[0]` must have its weight's shape (3, 1). Received: "
            "shape (1,)",
        ),
        (
            lambda m, d: analysis.loss_landscape_2d(
                m, d, mse, [0.0], [0.0], directions=[np.ones((3, 1))] * 2
            ),
            "`directions[0]` must hold one array per trainable weight",
        ),
        (
            lambda m, d: analysis.loss_landscape_1d(
                m, (np.ones((4, 3)), np.ones((4, 1))), mse, [0.0]
            ),
            "must be a `tf.data.Dataset` of `(x, y)` batches. Received: a "
            "tuple",
        ),
        (
            lambda m, d: analysis.loss_landscape_1d(
                m, d.map(lambda x, y: (x, y, y)), mse, [0.0]
            ),
            "`dataset` must yield `(x, y)` batches",
        ),
        (
            lambda m, d: analysis.loss_landscape_1d(
                m, d, keras.losses.MeanSquaredError(reduction="sum"), [0.0]
            ),
            "with reduction='sum'",
        ),
        (  # it had been read once, then reported empty
            lambda m, d: analysis.loss_landscape_1d(
                m, (batch for batch in d), mse, [0.0]
            ),
            "so it must iterate again: a `tf.data.Dataset` or a list of "
            "`(x, y)` batches. Received: a generator",
        ),
        (  # it had failed in "has no attribute 'unbatch'"
            lambda m, d: analysis.m_sharpness(m, list(d), mse, 0.1, 2),
            "`dataset` must be a `tf.data.Dataset`. Received: a list",
        ),
        (  # it had failed in "'NoneType' object is not callable"
            lambda m, d: analysis.loss_landscape_1d(m, d, None, [0.0]),
            "`loss_fn` must be a loss function or a loss's name. Received: "
            "loss_fn=None",
        ),
        (  # it had come back flat
            lambda m, d: analysis.loss_landscape_1d(
                m, d, mse, [0.0, 1.0], direction=[np.zeros((3, 1))]
            ),
            "`direction` is zero, so the landscape would be flat",
        ),
        (  # it had failed in NumPy's "iteration over a 0-d array"
            lambda m, d: analysis.loss_landscape_1d(m, d, mse, 0.5),
            "`alphas` must be a 1-D sequence of step sizes. Received: "
            "alphas=0.5",
        ),
        (
            lambda m, d: analysis.loss_landscape_2d(m, d, mse, [0.0], [[0.0]]),
            "`betas` must be a 1-D sequence of step sizes",
        ),
        (
            lambda m, d: analysis.linear_interpolation(m, m, d, mse, 1.0),
            "`alphas` must be a 1-D sequence of step sizes",
        ),
    ],
    ids=[
        "lanczos_steps",
        "num_probes",
        "sigma",
        "zero_rho",
        "rho",
        "m",
        "empty_direction",
        "direction_shape",
        "directions",
        "numpy_data",
        "weighted_data",
        "summed_loss",
        "iterator",
        "m_sharpness_list",
        "no_loss",
        "zero_direction",
        "scalar_alphas",
        "grid_betas",
        "interpolation_alphas",
    ],
)
def test_bad_arguments_of_each_measure_are_rejected(call, message):
    # Each had failed deep inside, or given a number without a word.
    model, dataset = least_squares(np.ones((4, 3), "float32"), np.ones((4, 1)))
    with pytest.raises(ValueError, match=re.escape(message)):
        call(model, dataset)


def test_with_only_rank_1_weights_trainable_a_direction_must_be_given():
    # Li et al.'s default gives biases and normalization no direction, so
    # fine-tuning only those had given a flat landscape without a word.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3)).astype("float32")
    y = rng.standard_normal((8, 2)).astype("float32")
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="frozen")]
    )
    model.get_layer("frozen").kernel.trainable = False
    model.get_layer("frozen").bias.assign([0.5, -1.0])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    alphas = [-1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"shapes \[\(2,\)\]"):
        analysis.loss_landscape_1d(model, dataset, mse, alphas)
    (bias,) = [v.numpy() for v in model.trainable_weights]
    direction = analysis.filter_normalized_direction([bias], ignore_1d=False)
    losses = analysis.loss_landscape_1d(
        model, dataset, mse, alphas, direction=direction
    )
    kernel, _ = model.get_weights()
    for alpha, loss in zip(alphas, losses):
        want = np.mean((x @ kernel + bias + alpha * direction[0] - y) ** 2)
        np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_a_small_hessian_converges_as_a_large_one():
    # The tolerances had been absolute below 1: at 1e-4 the second value
    # came back 10 % off, at 1e-8 the first one step's guess and a 0.
    spectrum = np.geomspace(1.0, 0.01, 40)
    x = design_with_spectrum(spectrum).astype("float32")
    for scale in (1.0, 1e-4, 1e-8):
        model, dataset = least_squares(
            np.sqrt(scale) * x, np.zeros((64, 1), "float32")
        )
        got = analysis.hessian_top_eigenvalues(model, dataset, mse, k=2)
        want = 2 * np.float64(np.sqrt(scale) * x).T @ (np.sqrt(scale) * x)
        want = np.sort(np.linalg.eigvalsh(want / 64))[::-1][:2]
        np.testing.assert_allclose(got, want, rtol=1e-3)


def test_a_small_spectral_density_has_its_own_width():
    # Its span had an absolute floor of 1e-6: at 1e-10 the kernel was a
    # hundred times wider than the spectrum, and the two peaks one.
    x = design_with_spectrum([8e-10, 8e-10, 2e-10, 2e-10]).astype("float32")
    model, dataset = least_squares(x, np.zeros((64, 1), "float32"))
    grid, density, _, _ = analysis.hessian_spectral_density(
        model, dataset, mse, lanczos_steps=4, num_probes=2
    )
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-2)
    peak = grid[np.argmax(density)]
    assert min(abs(peak - 8e-10), abs(peak - 2e-10)) < 1e-11


def test_unconverged_eigenvalues_come_with_a_warning():
    x = design_with_spectrum(np.geomspace(1.0, 0.9, 40)).astype("float32")
    model, dataset = least_squares(x, np.zeros((64, 1), "float32"))
    with pytest.warns(UserWarning, match="did not converge.*max_iterations=3"):
        analysis.hessian_top_eigenvalues(
            model, dataset, mse, k=2, max_iterations=3
        )


def test_eigenvalues_converged_at_the_last_step_come_without_a_warning():
    # Convergence had been asked every 4 steps only: with 5 steps the top
    # value was never compared, and a converged run warned.
    spectrum = np.concatenate([[100.0], np.geomspace(1.0, 0.01, 39)])
    x = design_with_spectrum(spectrum).astype("float32")
    model, dataset = least_squares(x, np.zeros((64, 1), "float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = analysis.hessian_top_eigenvalues(
            model, dataset, mse, max_iterations=5
        )
    np.testing.assert_allclose(got, [100.0], rtol=1e-4)


def test_a_weight_the_loss_does_not_use_has_a_zero_hessian():
    # PyTorch's double backpropagation had raised on the unused head.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 3)).astype("float32")
    inputs = keras.Input((3,))
    used = keras.layers.Dense(1, use_bias=False)(inputs)
    unused = keras.layers.Dense(2)(inputs)
    model = keras.Model(inputs, [used, unused])
    dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(8)

    def first_output_mse(y, outputs):
        return mse(y, outputs[0])

    got = analysis.hessian_top_eigenvalues(model, dataset, first_output_mse)
    want = np.linalg.eigvalsh(2 * np.float64(x).T @ x / 16)[-1]
    np.testing.assert_allclose(got, [want], rtol=1e-4)


def test_dropout_in_training_mode_draws_the_same_masks_at_each_call():
    # PyTorch's global generator had drawn new masks at every evaluation.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 3)).astype("float32")
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)]
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(8)
    state = backend.random_state()

    def measure():
        return analysis.loss_landscape_1d(
            model, dataset, mse, [0.0, 0.5], training=True
        )

    first, second = measure(), measure()
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(
        first, analysis.loss_landscape_1d(model, dataset, mse, [0.0, 0.5])
    )
    if state is not None:  # PyTorch's generator is left where it was
        np.testing.assert_array_equal(
            np.asarray(backend.random_state()[0]), np.asarray(state[0])
        )


def test_interpolation_pairs_the_weights_of_a_frozen_layer_in_place():
    # The variables had been paired in trainable-then-frozen order, so a
    # layer frozen in one model only was matched with another's weights.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 3)).astype("float32")
    y = rng.standard_normal((20, 1)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    models = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        models.append(
            keras.Sequential(
                [
                    keras.Input((3,)),
                    keras.layers.Dense(3, activation="tanh"),
                    keras.layers.Dense(1),
                ]
            )
        )
    models[1].layers[0].trainable = False
    ends = [
        np.mean((m.predict(x, verbose=0) - y) ** 2, dtype=np.float64)
        for m in models
    ]
    path = analysis.linear_interpolation(*models, dataset, mse, [0.0, 1.0])
    np.testing.assert_allclose(path, ends, rtol=1e-5)


@pytest.mark.skipif(
    backends.BACKEND != "tensorflow",
    reason="the model's outputs are float32: JAX without x64, and Keras' "
    "PyTorch Sequential of float64 layers",
)
def test_a_float64_model_is_measured_in_float64():
    # Each batch's loss had been cast to float32: a landscape step of 1e-6
    # came out with the wrong sign on TensorFlow.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 3))
    y = rng.standard_normal((32, 1))
    w = rng.standard_normal((3, 1))
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(1, use_bias=False, dtype="float64"),
        ]
    )
    model.set_weights([w])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    d = rng.standard_normal((3, 1))

    def loss(y_true, y_pred):
        return keras.ops.mean((y_true - y_pred) ** 2, axis=-1)

    got = analysis.loss_landscape_1d(
        model, dataset, loss, [0.0, 1e-6], direction=[d]
    )
    want = [np.mean((x @ (w + a * d) - y) ** 2) for a in (0.0, 1e-6)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got[1] - got[0], want[1] - want[0], rtol=1e-4)


def test_a_loss_may_be_named_as_compile_takes_it():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 3)).astype("float32")
    y = rng.standard_normal((16, 1)).astype("float32")
    model, dataset = least_squares(x, y, rng.standard_normal((3, 1)))
    np.testing.assert_allclose(
        analysis.loss_landscape_1d(model, dataset, "mse", [0.0]),
        analysis.loss_landscape_1d(model, dataset, mse, [0.0]),
    )


def test_interpolation_ends_at_both_batchnorm_models():
    # The ends had used model_a's moving statistics with model_b's weights.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((32, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(8)
    models = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x + seed, x[:, :1], epochs=2, verbose=0)
        models.append(model)
    ends = [
        analysis.loss_landscape_1d(m, dataset, mse, [0.0])[0] for m in models
    ]
    path = analysis.linear_interpolation(*models, dataset, mse, [0.0, 1.0])
    np.testing.assert_allclose(path, ends, rtol=1e-5)


@pytest.mark.skipif(
    backends.BACKEND != "tensorflow", reason="Keras' TensorFlow moments"
)
def test_a_tensorflow_hessian_through_batch_statistics_is_refused():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization()]
    )
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.ones((4, 3)), np.ones((4, 3)))
    ).batch(4)
    with pytest.raises(ValueError, match=r"tf\.nn\.moments.*training=True"):
        analysis.hessian_top_eigenvalues(model, dataset, mse, training=True)
    analysis.hessian_top_eigenvalues(model, dataset, mse, training=False)
