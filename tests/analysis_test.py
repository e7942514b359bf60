"""keras_sam.analysis against analytic Hessians and hand-computed values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sam import analysis


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


def test_repeated_eigenvalues_do_not_hang_or_nan():
    x = design_with_spectrum([5.0, 5.0, 5.0, 1.0]).astype("float32")
    model, dataset = least_squares(x, np.zeros((64, 1), "float32"))
    got = analysis.hessian_top_eigenvalues(
        model, dataset, mse, k=2, max_iterations=20
    )
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0], 5.0, rtol=1e-2)


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
    analysis.hessian_top_eigenvalues(
        model, dataset, mse, training=True, max_iterations=5
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
    [(dict(k=0), "Received: k=0"), (dict(k=99), "`k=99` exceeds")],
)
def test_bad_k_is_rejected(kwargs, message):
    model, dataset = least_squares(np.ones((4, 3), "float32"), np.ones((4, 1)))
    with pytest.raises(ValueError, match=message):
        analysis.hessian_top_eigenvalues(model, dataset, mse, **kwargs)
