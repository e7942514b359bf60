"""Sharpness of a trained model: Hessian spectrum, m-sharpness, landscapes.

Works on any Keras model (not only `SAMModel`) and a `tf.data.Dataset` of
`(x, y)` batches. The loss is the mean of `loss_fn(y, model(x))` over all
examples of the dataset (batches weighted by their size); `loss_fn` may
return per-example losses or their batch mean. Nothing else is added (no
regularizers): pass a loss that includes what you want measured.

Every evaluation runs statelessly: BatchNorm statistics, seeds and weights are
never modified. By default the model is evaluated with `training=False`
(BatchNorm uses its moving statistics, dropout is off), which makes the loss
a deterministic function of the weights; pass `training=True` to measure
with batch statistics, and dropout on, instead. Random layers then draw the
same numbers at every evaluation (PyTorch's global generator is set back),
so the loss is still a function of the weights. On TensorFlow, Hessians
through BatchNorm's batch statistics are refused (see
`compat.check_second_derivatives`).

Hessian-vector products use double backpropagation; the Hessian itself is
never formed. Eigenvalues come from the Lanczos algorithm with full
reorthogonalization (Golub & Van Loan, ch. 10), the spectral density from
stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019), and the
random directions of the landscapes are filter-normalized as in Li et al.,
"Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018).
"""

import collections.abc
import math
import warnings

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_sam import backend
from keras_sam import compat
from keras_sam import options
from keras_sam import perturbations
from keras_sam import selection


class _LossFunctions:
    """The mean loss, its gradient and HVPs at given weights, compiled once."""

    def __init__(
        self,
        model,
        dataset,
        loss_fn,
        training,
        variables=None,
        differentiated=True,
    ):
        """`variables`: what the weights given to each function are values
        of; defaults to `selection.weights(model)` (the trainable variables
        but float8 scaling state). `differentiated`: whether gradients or
        HVPs will be taken (else only losses)."""
        if not model.trainable_variables:
            raise ValueError(
                "`model` has no trainable weights: build it (call it on a "
                f"batch) or unfreeze a layer. Received: model={model.name!r}"
            )
        _check_dataset(dataset)
        if getattr(loss_fn, "reduction", None) == "sum":
            raise ValueError(
                "The loss measured is the mean over examples: pass a loss "
                "reduced with 'sum_over_batch_size' (or per example). "
                f"Received: loss_fn={loss_fn!r} with reduction='sum'"
            )
        self.model = model
        self.dataset = dataset
        self.loss_fn = keras.losses.get(loss_fn)  # "mse", as `compile` takes
        if self.loss_fn is None:
            raise ValueError(
                "`loss_fn` must be a loss function or a loss's name. "
                "Received: loss_fn=None"
            )
        self.training = training
        selection.check_layers_read_variables(model, differentiated)
        self.variables = variables or selection.weights(model)
        self._random_state = backend.random_state()
        self._batch_loss = backend.function(self._batch_loss_impl)
        self._batch_grad = backend.function(self._batch_grad_impl)
        self._batch_hvp = backend.function(self._batch_hvp_impl)

    def _loss_at(self, weights, x, y):
        mapping = list(zip(self.variables, weights))
        given = {id(v) for v in self.variables}
        mapping.extend(
            (v, ops.convert_to_tensor(v.value))
            for v in self.model.non_trainable_variables
            if id(v) not in given
        )
        with keras.StatelessScope(state_mapping=mapping):
            y_pred = self.model(x, training=self.training)
            # Per-example losses or their mean: either way, the batch mean.
            loss = self.loss_fn(y, y_pred)
            # float32 at least: a float64 model is measured in float64.
            dtype = keras.backend.result_type(loss.dtype, "float32")
            return ops.mean(ops.cast(loss, dtype))

    def _batch_loss_impl(self, weights, x, y):
        return self._loss_at(weights, x, y)

    def _batch_grad_impl(self, weights, x, y):
        def objective(weights):
            loss = self._loss_at(weights, x, y)
            return loss, loss

        loss, grads = backend.value_and_gradients(objective, weights)
        return loss, _zeros_for_none(grads, weights)

    def _batch_hvp_impl(self, weights, vector, x, y):
        return backend.hessian_vector_product(
            lambda w: self._loss_at(w, x, y), weights, vector
        )

    def current_weights(self):
        return [ops.stop_gradient(v.value) for v in self.variables]

    def call(self, fn, *args):
        """`fn(*args)` drawing the same random numbers at every call, as
        the unchanged seed variables give them on TensorFlow and JAX (on
        PyTorch, its global generator is set to where it was at the start,
        then set back)."""
        outer = backend.random_state()
        backend.set_random_state(self._random_state)
        try:
            return fn(*args)
        finally:
            backend.set_random_state(outer)

    def _mean_over_dataset(self, fn, *args):
        total, count = None, 0
        for x, y in _batches(self.dataset):
            n = int(ops.shape(tree.flatten(x)[0])[0])
            value = tree.map_structure(
                lambda t, n=n: ops.convert_to_numpy(t).astype(np.float64) * n,
                self.call(fn, *args, x, y),
            )
            total = (
                value
                if total is None
                else tree.map_structure(np.add, total, value)
            )
            count += n
        if count == 0:
            raise ValueError("`dataset` is empty.")
        return tree.map_structure(lambda t: t / count, total)

    def loss(self, weights):
        return float(self._mean_over_dataset(self._batch_loss, weights))

    def loss_and_gradient(self, weights):
        loss, grads = self._mean_over_dataset(self._batch_grad, weights)
        return float(loss), grads

    def hvp(self, weights, vector):
        return self._mean_over_dataset(self._batch_hvp, weights, vector)


def _check_dataset(dataset):
    # `(x, y)` arrays are the usual mistake; a list of batches iterates.
    if isinstance(dataset, (tuple, dict, np.ndarray)):
        raise ValueError(
            "`dataset` must be a `tf.data.Dataset` of `(x, y)` batches. "
            f"Received: a {type(dataset).__name__}"
        )
    if isinstance(dataset, collections.abc.Iterator):
        raise ValueError(
            "`dataset` is read once per loss, gradient or Hessian-vector "
            "product, so it must iterate again: a `tf.data.Dataset` or a "
            f"list of `(x, y)` batches. Received: a {type(dataset).__name__}"
        )


def _batches(dataset):
    """The `(x, y)` batches of `dataset` as the backend's tensors."""
    for batch in dataset:
        if not isinstance(batch, (tuple, list)):
            raise ValueError(
                "`dataset` must yield `(x, y)` batches. Received: a batch "
                f"of type {type(batch).__name__}"
            )
        if len(batch) != 2:
            raise ValueError(
                "`dataset` must yield `(x, y)` batches (weigh examples in "
                f"`loss_fn`). Received: a batch of {len(batch)} elements"
            )
        x, y = batch
        if backend.BACKEND != "tensorflow":
            x, y = tree.map_structure(
                lambda t: ops.convert_to_tensor(np.asarray(t)), (x, y)
            )
        yield x, y


def _zeros_for_none(grads, weights):
    return [
        ops.zeros_like(w) if g is None else g for g, w in zip(grads, weights)
    ]


class _Flattener:
    """Maps a list of tensors to one float64 vector and back."""

    def __init__(self, variables):
        self.shapes = [tuple(v.shape) for v in variables]
        self.dtypes = [v.dtype for v in variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = sum(self.sizes)

    def flatten(self, tensors):
        return np.concatenate(
            [np.asarray(t, np.float64).reshape(-1) for t in tensors]
        )

    def unflatten(self, vector):
        out, start = [], 0
        for shape, size, dtype in zip(self.shapes, self.sizes, self.dtypes):
            piece = vector[start : start + size].reshape(shape)
            out.append(ops.convert_to_tensor(piece, dtype=dtype))
            start += size
        return out


def _progress(total, verbose):
    return keras.utils.Progbar(total, verbose=1 if verbose else 0)


def _tridiagonal_eigen(alphas, betas):
    tridiagonal = np.diag(alphas)
    off = np.array(betas[: len(alphas) - 1])
    if len(off):
        tridiagonal += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(tridiagonal)


def _lanczos(
    matvec,
    size,
    steps,
    rng,
    tol,
    progress=None,
    converged=None,
    every=4,
    restart=False,
):
    """Lanczos tridiagonalization with full reorthogonalization.

    Returns the tridiagonal's eigenvalues (Ritz values, ascending), the
    squared first components of its eigenvectors (the quadrature weights)
    and whether it ran out of `steps` before either early stop: an
    invariant subspace (β ≤ `tol` times the largest |α|, relative, so a
    Hessian of any scale ends alike), which is how a zero or low-rank
    Hessian ends, or `converged(ritz_values)`, asked every `every` steps.

    With `restart`, an invariant subspace does not end it: it goes on from
    a random vector orthogonal to the basis (β = 0, so the tridiagonal is
    block diagonal). One start vector sees each eigenvalue once; the
    restarts find the other copies of a repeated one.
    """
    steps = min(steps, size)
    basis = np.zeros((steps, size))
    alphas, betas = [], []
    v = rng.standard_normal(size)
    v /= np.linalg.norm(v)
    for j in range(steps):
        basis[j] = v
        w = matvec(v)
        alpha = float(v @ w)
        w = w - alpha * v - (betas[-1] * basis[j - 1] if j else 0.0)
        # Reorthogonalizing twice keeps the basis orthonormal in floating
        # point; without it Lanczos reports ghost copies of eigenvalues.
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        beta = float(np.linalg.norm(w))
        if progress is not None:
            progress.add(1)
        invariant = beta <= tol * max(abs(a) for a in alphas)
        if invariant and (not restart or j + 1 == steps):
            break
        if (
            converged is not None
            and ((j + 1) % every == 0 or j + 1 == steps)
            and converged(_tridiagonal_eigen(alphas, betas)[0])
        ):
            break
        if invariant:
            w, beta = rng.standard_normal(size), 0.0
            for _ in range(2):
                w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        betas.append(beta)
        v = w / np.linalg.norm(w)
    exhausted = len(betas) == steps < size
    ritz, vectors = _tridiagonal_eigen(alphas, betas)
    return ritz, vectors[0] ** 2, exhausted


def hessian_top_eigenvalues(
    model,
    dataset,
    loss_fn,
    k=1,
    max_iterations=100,
    tol=1e-4,
    training=False,
    seed=0,
    verbose=False,
):
    """The `k` largest eigenvalues of the Hessian of the mean loss.

    The Hessian is taken with respect to `model.trainable_variables` (not
    float8 scaling state) at their current values, of the mean of
    `loss_fn(y, model(x))` over all examples in `dataset`. It is never
    formed: each Lanczos step costs one Hessian-vector product (one
    double-backprop pass over `dataset`).
    Iteration stops when the top `k` Ritz values change by less than `tol`
    times the largest of their magnitudes over 4 steps, when an invariant
    subspace is found (for example a zero Hessian), or after
    `max_iterations` products, with a warning that they did not converge.

    Args:
        model: a built Keras model.
        dataset: a `tf.data.Dataset` of `(x, y)` batches.
        loss_fn: `loss_fn(y_true, y_pred)` returning per-example losses
            or their batch mean, or a loss's name, as `compile` takes it.
        k: how many eigenvalues. Defaults to `1`.
        max_iterations: cap on Hessian-vector products, at least `k`.
            Defaults to `100`.
        tol: relative tolerance, > 0. Defaults to `1e-4`.
        training: evaluate the model in training mode (batch statistics).
            Defaults to `False`.
        seed: seed of the starting vector. Defaults to `0`.
        verbose: show a progress bar. Defaults to `False`.

    Returns:
        A NumPy array of `k` eigenvalues, largest first. A Krylov space
        that closes within `max_iterations` is restarted from a random
        vector orthogonal to it, which finds the other copies of a
        repeated eigenvalue; one that converges first may miss them.
    """
    k = options.checked_integer("k", k, 1)
    max_iterations = options.checked_integer(
        "max_iterations", max_iterations, k
    )
    tol = options.checked_number("tol", tol, 0, strict=True)
    compat.check_second_derivatives(model, training)
    functions = _LossFunctions(model, dataset, loss_fn, training)
    flat = _Flattener(functions.variables)
    if k > flat.size:
        raise ValueError(
            f"`k={k}` exceeds the number of trainable weights ({flat.size})."
        )
    weights = functions.current_weights()

    def matvec(v):
        return flat.flatten(functions.hvp(weights, flat.unflatten(v)))

    previous = [None]

    def converged(ritz):
        top = np.sort(ritz)[::-1][:k]
        done = (
            len(top) == k
            and previous[0] is not None
            and np.all(np.abs(top - previous[0]) <= tol * np.max(np.abs(top)))
        )
        previous[0] = top if len(top) == k else None
        return done

    ritz, _, exhausted = _lanczos(
        matvec,
        flat.size,
        max_iterations,
        np.random.default_rng(seed),
        tol * 1e-3,
        _progress(max_iterations, verbose),
        converged,
        restart=True,
    )
    top = np.sort(ritz)[::-1][:k]
    if exhausted:
        warnings.warn(
            f"The top {k} Hessian eigenvalues did not converge to tol={tol} "
            f"in max_iterations={max_iterations}: {top.tolist()}",
            stacklevel=2,
        )
    return top


def hessian_spectral_density(
    model,
    dataset,
    loss_fn,
    lanczos_steps=40,
    num_probes=2,
    grid_size=512,
    sigma=None,
    training=False,
    seed=0,
    verbose=False,
):
    """An estimate of the Hessian's eigenvalue density, by stochastic Lanczos.

    Each probe is a Gaussian vector; `lanczos_steps` Lanczos iterations from
    it give nodes θ (Ritz values) and weights τ (squared first components).
    The density is the probes' average of `Σ τ_i N(t; θ_i, σ²)` on a grid.

    Args:
        lanczos_steps: Hessian-vector products per probe, >= 1. Defaults
            to `40`.
        num_probes: random starting vectors, >= 1. Defaults to `2`.
        grid_size: points of the returned grid, >= 2. Defaults to `512`.
        sigma: width of the Gaussian kernel, > 0; defaults to 1% of the
            spectral range.
        Other arguments as in `hessian_top_eigenvalues`.

    Returns:
        `(grid, density, nodes, weights)`: the density on `grid` (it
        integrates to about 1), and every probe's nodes and weights.
    """
    lanczos_steps = options.checked_integer("lanczos_steps", lanczos_steps, 1)
    num_probes = options.checked_integer("num_probes", num_probes, 1)
    grid_size = options.checked_integer("grid_size", grid_size, 2)
    if sigma is not None:
        sigma = options.checked_number("sigma", sigma, 0, strict=True)
    compat.check_second_derivatives(model, training)
    functions = _LossFunctions(model, dataset, loss_fn, training)
    flat = _Flattener(functions.variables)
    weights = functions.current_weights()

    def matvec(v):
        return flat.flatten(functions.hvp(weights, flat.unflatten(v)))

    progress = _progress(lanczos_steps * num_probes, verbose)
    nodes, quad_weights = [], []
    # One stream for all probes: `seed + probe` made seed 0's second probe
    # seed 1's first.
    rng = np.random.default_rng(seed)
    for probe in range(num_probes):
        ritz, tau, _ = _lanczos(
            matvec,
            flat.size,
            lanczos_steps,
            rng,
            1e-10,
            progress,
        )
        nodes.append(ritz)
        quad_weights.append(tau)
    all_nodes = np.concatenate(nodes)
    low, high = all_nodes.min(), all_nodes.max()
    # Relative, as the eigenvalues' convergence; 1 for a zero Hessian.
    span = max(high - low, 1e-6 * max(abs(low), abs(high))) or 1.0
    sigma = sigma or 0.01 * span
    grid = np.linspace(low - 0.1 * span, high + 0.1 * span, grid_size)
    density = np.zeros_like(grid)
    for ritz, tau in zip(nodes, quad_weights):
        kernel = np.exp(
            -((grid[:, None] - ritz[None, :]) ** 2) / (2 * sigma**2)
        )
        density += kernel @ tau / (sigma * math.sqrt(2 * math.pi))
    return grid, density / num_probes, nodes, quad_weights


def m_sharpness(model, dataset, loss_fn, rho, m, training=False):
    """The paper's m-sharpness (Foret et al., 2021, §4.1).

    The examples of `dataset` are grouped into consecutive disjoint sets of
    `m` (a trailing remainder is dropped); for each set S, one ascent step
    gives `ε = ρ ∇L_S(w)/‖∇L_S(w)‖` and the set's sharpness is
    `L_S(w + ε) − L_S(w)`. Returns the mean over sets.

    Args:
        rho: radius ρ > 0.
        m: examples per set, ≥ 1.
        Other arguments as in `hessian_top_eigenvalues`.

    Returns:
        The mean sharpness, a Python float.
    """
    rho = options.checked_number("rho", rho, 0, strict=True)
    m = options.checked_integer("m", m, 1)
    _check_dataset(dataset)
    if not hasattr(dataset, "unbatch"):
        raise ValueError(
            "`m_sharpness` regroups the examples into sets of m, so "
            "`dataset` must be a `tf.data.Dataset`. Received: a "
            f"{type(dataset).__name__}"
        )
    groups = dataset.unbatch().batch(m, drop_remainder=True)
    functions = _LossFunctions(model, groups, loss_fn, training)
    weights = functions.current_weights()
    values = []
    for x, y in _batches(groups):
        loss, grads = functions.call(functions._batch_grad, weights, x, y)
        eps = perturbations.sam_perturbation(grads, rho)
        perturbed = [w + e for w, e in zip(weights, eps)]
        perturbed_loss = functions.call(functions._batch_loss, perturbed, x, y)
        values.append(float(perturbed_loss) - float(loss))
    if not values:
        raise ValueError(f"`dataset` has fewer than m={m} examples.")
    return float(np.mean(values))


def filter_normalized_direction(weights, seed=0, ignore_1d=True):
    """A random direction scaled filter by filter to the weights' norms.

    For every kernel (rank ≥ 2) the direction is Gaussian, and each filter
    (a slice along the last axis, the output channels in Keras) is rescaled
    to the Frobenius norm of the matching filter of the weights (Li et al.,
    2018). Rank-0/1 weights (biases, normalization parameters) get a zero
    direction when `ignore_1d`, as in the paper, and are otherwise
    normalized as a whole.

    Args:
        weights: list of weight arrays.
        seed: random seed, or a `np.random.Generator` to draw from.
            Defaults to `0`.
        ignore_1d: zero direction for rank < 2 weights. Defaults to `True`.

    Returns:
        A list of NumPy arrays shaped like `weights`.
    """
    rng = np.random.default_rng(seed)
    direction = []
    for w in weights:
        w = np.asarray(w, np.float64)
        d = rng.standard_normal(w.shape)
        if w.ndim < 2:
            if ignore_1d:
                d = np.zeros_like(w)
            else:
                d *= np.linalg.norm(w) / (np.linalg.norm(d) + 1e-10)
        else:
            axes = tuple(range(w.ndim - 1))
            w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
            d_norm = np.sqrt(np.sum(d**2, axis=axes, keepdims=True))
            d *= w_norm / (d_norm + 1e-10)
        direction.append(d)
    return direction


def _weights_of(model, variables=None):
    return [
        ops.convert_to_numpy(v.value).astype(np.float64)
        for v in variables or selection.weights(model)
    ]


def _checked_direction(name, direction, weights):
    """`direction` as float64 arrays, one shaped like each weight."""
    direction = [np.asarray(d, np.float64) for d in direction]
    if len(direction) != len(weights):
        raise ValueError(
            f"`{name}` must hold one array per trainable weight: "
            f"{len(weights)}. Received: {len(direction)} arrays"
        )
    for i, (d, w) in enumerate(zip(direction, weights)):
        if d.shape != w.shape:
            raise ValueError(
                f"`{name}[{i}]` must have its weight's shape {w.shape}. "
                f"Received: shape {d.shape}"
            )
    if not any(np.any(d) for d in direction):
        # The default gives rank-0/1 weights none: with only biases or
        # normalization trainable, a landscape had come back flat.
        raise ValueError(
            f"`{name}` is zero, so the landscape would be flat. The default "
            "filter-normalized direction gives rank-0/1 weights (biases, "
            "normalization) none, as Li et al. (2018) do; with only such "
            "weights trainable, pass one, e.g. `filter_normalized_direction("
            "weights, ignore_1d=False)` (scaled to each weight's norm, so "
            "zero for a weight still zero). Received: trainable weights of "
            f"shapes {[w.shape for w in weights]}"
        )
    return direction


def _checked_steps(name, steps):
    """`steps` (a landscape's α or β) as a 1-D float64 array."""
    values = np.asarray(steps, np.float64)
    if values.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D sequence of step sizes. Received: "
            f"{name}={steps!r}"
        )
    return values


def loss_landscape_1d(
    model, dataset, loss_fn, alphas, direction=None, training=False, seed=0
):
    """Loss at `w + α d` for each α; `d` filter-normalized unless given.

    Returns a NumPy array aligned with `alphas`.
    """
    alphas = _checked_steps("alphas", alphas)
    functions = _LossFunctions(
        model, dataset, loss_fn, training, differentiated=False
    )
    w = _weights_of(model)
    if direction is None:
        direction = filter_normalized_direction(w, seed)
    d = _checked_direction("direction", direction, w)
    return np.array(
        [functions.loss(_combine(functions, w, [(a, d)])) for a in alphas]
    )


def loss_landscape_2d(
    model,
    dataset,
    loss_fn,
    alphas,
    betas,
    directions=None,
    training=False,
    seed=0,
):
    """Loss at `w + α d₁ + β d₂` on the grid `alphas × betas`.

    Returns an array of shape `(len(alphas), len(betas))`.
    """
    alphas = _checked_steps("alphas", alphas)
    betas = _checked_steps("betas", betas)
    functions = _LossFunctions(
        model, dataset, loss_fn, training, differentiated=False
    )
    w = _weights_of(model)
    if directions is None:
        # One stream for both, so no seed's second is another seed's first.
        rng = np.random.default_rng(seed)
        directions = (
            filter_normalized_direction(w, rng),
            filter_normalized_direction(w, rng),
        )
    if len(directions) != 2:
        raise ValueError(
            f"`directions` must be two directions. Received: {len(directions)}"
        )
    d1, d2 = (
        _checked_direction(f"directions[{i}]", d, w)
        for i, d in enumerate(directions)
    )
    return np.array(
        [
            [
                functions.loss(_combine(functions, w, [(a, d1), (b, d2)]))
                for b in betas
            ]
            for a in alphas
        ]
    )


def linear_interpolation(
    model_a, model_b, dataset, loss_fn, alphas, training=False
):
    """Loss at `(1 − α) w_a + α w_b`, evaluated with `model_a`'s architecture.

    `w` holds every float variable of a model: its weights and its
    non-trainable state (BatchNorm's moving statistics), so that α = 0 and
    α = 1 are the two models. They must have the same variable shapes
    (e.g. the same network trained with SGD and with SAM).
    """
    alphas = _checked_steps("alphas", alphas)

    def floats(model):
        # In the layers' order: a layer frozen in one model only keeps its
        # place.
        return [v for v in model.weights if "float" in str(v.dtype)]

    variables_a = floats(model_a)
    w_a = _weights_of(model_a, variables_a)
    w_b = _weights_of(model_b, floats(model_b))
    if [w.shape for w in w_a] != [w.shape for w in w_b]:
        raise ValueError(
            "`model_a` and `model_b` have different weight shapes."
        )
    functions = _LossFunctions(
        model_a, dataset, loss_fn, training, variables_a, differentiated=False
    )
    difference = [b - a for a, b in zip(w_a, w_b)]
    return np.array(
        [
            functions.loss(_combine(functions, w_a, [(t, difference)]))
            for t in alphas
        ]
    )


def _combine(functions, weights, steps):
    combined = [np.array(w) for w in weights]
    for scale, direction in steps:
        for c, d in zip(combined, direction):
            c += scale * d
    return [
        ops.convert_to_tensor(c, dtype=v.dtype)
        for c, v in zip(combined, functions.variables)
    ]


def plot_landscape_1d(alphas, losses, path, labels=None, title=None):
    """Writes a PNG of one or more 1-D landscapes (a list of loss arrays)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curves = losses if isinstance(losses, (list, tuple)) else [losses]
    labels = labels or [None] * len(curves)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for curve, label in zip(curves, labels):
        ax.plot(alphas, curve, label=label)
    ax.set_xlabel("α (filter-normalized direction)")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    if any(labels):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_landscape_2d(alphas, betas, surfaces, path, titles=None, levels=20):
    """Writes a PNG of side-by-side 2-D landscape contours, one per surface."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    surfaces = surfaces if isinstance(surfaces, (list, tuple)) else [surfaces]
    titles = titles or [None] * len(surfaces)
    fig, axes = plt.subplots(
        1,
        len(surfaces),
        figsize=(4.5 * len(surfaces), 4),
        squeeze=False,
        constrained_layout=True,
    )
    vmax = max(float(np.max(s)) for s in surfaces)
    vmin = min(float(np.min(s)) for s in surfaces)
    for ax, surface, title in zip(axes[0], surfaces, titles):
        contour = ax.contourf(
            betas, alphas, surface, levels=np.linspace(vmin, vmax, levels)
        )
        ax.set_xlabel("β")
        ax.set_ylabel("α")
        if title:
            ax.set_title(title)
    fig.colorbar(contour, ax=axes[0].tolist())
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectral_density(grid, density, path, label=None, log=True):
    """Writes a PNG of a Hessian spectral density (log scale by default)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    grids = grid if isinstance(grid, (list, tuple)) else [grid]
    densities = density if isinstance(density, (list, tuple)) else [density]
    labels = label if isinstance(label, (list, tuple)) else [label] * len(grids)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for g, d, lab in zip(grids, densities, labels):
        ax.plot(g, np.maximum(d, 1e-12) if log else d, label=lab)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if any(labels):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
