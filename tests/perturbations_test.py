"""The pure perturbation functions against hand-computed values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sam import perturbations


def test_global_norm_is_the_norm_of_the_concatenation():
    tensors = [tf.constant([3.0, 0.0]), None, tf.constant([[4.0], [12.0]])]
    np.testing.assert_allclose(perturbations.global_norm(tensors), 13.0)


def test_global_norm_of_nothing_is_zero():
    assert float(perturbations.global_norm([None, None])) == 0.0


def test_sam_perturbation_has_length_rho_along_the_gradient():
    grads = [tf.constant([3.0, 0.0]), None, tf.constant([4.0])]
    eps = perturbations.sam_perturbation(grads, rho=0.5)
    assert eps[1] is None
    np.testing.assert_allclose(eps[0], [0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(eps[2], [0.4], rtol=1e-6)


def test_asam_perturbation_matches_the_hand_computed_value():
    # T_w = |w| + η = [1.1, 2.1], T_w g = [1.1, -4.2], ‖T_w g‖ = 4.3417,
    # ε = ρ T_w² g / ‖T_w g‖.
    w, g = [tf.constant([1.0, -2.0])], [tf.constant([1.0, -2.0])]
    eps = perturbations.asam_perturbation(g, w, rho=2.0, eta=0.1)
    t = np.array([1.1, 2.1])
    want = 2.0 * t**2 * np.array([1.0, -2.0]) / np.linalg.norm(t * [1, -2])
    np.testing.assert_allclose(eps[0], want, rtol=1e-6)


def test_asam_perturbation_is_invariant_to_rescaling_a_layer():
    # Kwon et al.'s point: scaling w by a and g by 1/a leaves T_w g alone
    # (when η = 0+), so ε/w is unchanged.
    w = [tf.constant([1.0, -2.0, 0.5])]
    g = [tf.constant([0.3, 0.1, -0.2])]
    eps = perturbations.asam_perturbation(g, w, rho=1.0, eta=1e-9)[0]
    eps_scaled = perturbations.asam_perturbation(
        [g[0] / 10.0], [w[0] * 10.0], rho=1.0, eta=1e-9
    )[0]
    np.testing.assert_allclose(eps_scaled / 10.0, eps, rtol=1e-5)


def test_zero_gradient_gives_zero_perturbation_not_nan():
    eps = perturbations.sam_perturbation([tf.zeros(3)], rho=0.05)
    np.testing.assert_array_equal(eps[0], np.zeros(3))
    eps = perturbations.asam_perturbation([tf.zeros(3)], [tf.ones(3)], rho=1.0)
    np.testing.assert_array_equal(eps[0], np.zeros(3))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_gradient_gives_zero_perturbation(bad):
    grads = [tf.constant([1.0, bad]), tf.constant([2.0])]
    for eps in (
        perturbations.sam_perturbation(grads, rho=0.05),
        perturbations.asam_perturbation(grads, [tf.ones(2), tf.ones(1)], 1.0),
    ):
        for e in eps:
            np.testing.assert_array_equal(e, np.zeros_like(e))


def test_float16_gradient_norm_is_computed_in_float32():
    # 300² overflows float16 (max 65504); the float32 norm does not.
    grads = [tf.constant([300.0, 400.0], tf.float16)]
    eps = perturbations.sam_perturbation(grads, rho=1.0)
    assert keras.backend.standardize_dtype(eps[0].dtype) == "float16"
    np.testing.assert_allclose(eps[0], [0.6, 0.8], rtol=1e-3)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="1 gradients and 2 weights"):
        perturbations.asam_perturbation([tf.ones(1)], [tf.ones(1)] * 2, 1.0)
