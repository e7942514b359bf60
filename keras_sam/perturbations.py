"""The perturbation ε of SAM and ASAM, as pure functions over lists of tensors.

Every function takes the gradient `g` at the current weights `w` (one tensor
per trainable variable, `None` where a variable gets no gradient) and returns
one tensor per variable, `None` kept in place. Norms are computed in float32
whatever the gradient dtype, so a float16 gradient cannot overflow them.

A gradient with a NaN or an infinity (a mixed-precision overflow) gives
ε = 0: the perturbed pass then runs at `w` itself and the loss-scale optimizer
sees the same non-finite gradient and skips the step, as it would without SAM.

Sparse gradients (TensorFlow's `tf.IndexedSlices`, the gradient of an
`Embedding`) give the numbers of their dense equivalent: rows of an index
looked up several times are summed first. The gradients stay sparse; ε of a
sparse gradient is dense, since it is added to the whole table, and GSAM and
LookSAM, which combine two gradients, make them dense.
"""

from keras import ops

from keras_sam import backend

DEFAULT_EPSILON = 1e-12


def global_norm(tensors):
    """Euclidean norm of all `tensors` taken as one vector, in float32.

    `None` entries are skipped. Returns `0.0` when every entry is `None`.
    A norm whose square overflows float32 (finite entries above ~1e19) is
    recomputed from the entries divided by the largest magnitude, so it is
    finite whenever the norm itself is.
    """
    return _global_norm(backend.sum_duplicate_rows(tensors))


def _global_norm(tensors):
    """`global_norm` of tensors whose sparse rows are already summed."""
    present = [ops.cast(t, "float32") for t in tensors if t is not None]
    if not present:
        return ops.zeros((), "float32")
    norm = _norm(present)

    def rescaled():
        largest = ops.max(ops.stack([ops.max(ops.abs(t)) for t in present]))
        return largest * _norm([ops.divide(t, largest) for t in present])

    return ops.cond(ops.isinf(norm), rescaled, lambda: norm)


def _norm(tensors):
    squares = [ops.sum(ops.square(t)) for t in tensors]
    return ops.sqrt(ops.sum(ops.stack(squares)))


def sam_perturbation(gradients, rho, epsilon=DEFAULT_EPSILON):
    """SAM's first-order worst-case perturbation (Foret et al., 2021, eq. 2).

    ```
    ε = ρ · g / (‖g‖₂ + epsilon)
    ```

    with one L2 norm over all variables together.

    Args:
        gradients: list of gradient tensors (or `None`).
        rho: radius ρ ≥ 0 of the neighbourhood.
        epsilon: added to the norm so that a zero gradient gives ε = 0.
            Defaults to `1e-12`.

    Returns:
        A list of tensors ε, each of the dtype of its gradient.
    """
    gradients = backend.sum_duplicate_rows(gradients)
    return _scaled_direction(gradients, gradients, rho, epsilon)


def asam_perturbation(
    gradients,
    weights,
    rho,
    eta=0.01,
    epsilon=DEFAULT_EPSILON,
    adaptive_mask=None,
):
    """ASAM's scale-invariant perturbation (Kwon et al., 2021, eq. 7).

    With the elementwise operator `T_w = |w| + η` on the tensors that
    `adaptive_mask` selects and `T = 1` on the others:

    ```
    ε = ρ · T_w² g / (‖T_w g‖₂ + epsilon)
    ```

    The authors' code (SamsungLabs/ASAM) applies `T_w` to the weight
    tensors only (kernels, normalization scales) and `T = 1` to biases and
    normalization offsets; `SAMModel(adaptive=True)` does the same by
    default (its `adaptive_variables` argument).

    Args:
        gradients: list of gradient tensors (or `None`).
        weights: list of the current weight tensors, aligned with
            `gradients`.
        rho: radius ρ ≥ 0; ASAM's ρ is typically about 10x SAM's.
        eta: η ≥ 0; η > 0 keeps weights at zero perturbable. Defaults to
            `0.01`.
        epsilon: added to the norm. Defaults to `1e-12`.
        adaptive_mask: booleans aligned with `gradients`: `True` where
            `T_w = |w| + η`, `False` where `T = 1`; `None` applies `T_w` to
            every tensor. Defaults to `None`.

    Returns:
        A list of tensors ε, each of the dtype of its gradient.
    """
    if len(gradients) != len(weights):
        raise ValueError(
            "`gradients` and `weights` must have the same length. Received "
            f"{len(gradients)} gradients and {len(weights)} weights."
        )
    gradients = backend.sum_duplicate_rows(gradients)
    if adaptive_mask is None:
        adaptive_mask = [True] * len(gradients)
    elif len(adaptive_mask) != len(gradients):
        raise ValueError(
            "`adaptive_mask` must have one entry per gradient. Received "
            f"{len(adaptive_mask)} entries for {len(gradients)} gradients."
        )
    norm_terms, directions = [], []
    for g, w, adapt in zip(gradients, weights, adaptive_mask):
        if g is None:
            norm_terms.append(None)
            directions.append(None)
            continue
        g = ops.cast(g, "float32")
        if adapt:
            t = ops.abs(ops.cast(w, "float32")) + eta
            norm_terms.append(ops.multiply(g, t))
            directions.append(ops.multiply(ops.multiply(g, t), t))
        else:
            norm_terms.append(g)
            directions.append(g)
    return _scaled_direction(norm_terms, directions, rho, epsilon, gradients)


def _scaled_direction(norm_terms, directions, rho, epsilon, like=None):
    """`ρ · direction / (‖norm_terms‖ + epsilon)`, or zeros if not finite.

    Sparse rows must be summed already.
    """
    like = directions if like is None else like
    norm = _global_norm(norm_terms)
    finite = ops.isfinite(norm)
    scale = ops.where(finite, rho / (norm + epsilon), 0.0)
    perturbation = []
    for d, g in zip(directions, like):
        if d is None:
            perturbation.append(None)
            continue
        # A scalar 0, not `zeros_like(d)`: in graph mode that would hold
        # one more parameter-sized tensor at the step's peak.
        d = ops.where(finite, ops.cast(d, "float32"), 0.0)
        perturbation.append(ops.cast(ops.multiply(d, scale), g.dtype))
    return perturbation


def gsam_gradients(clean, perturbed, alpha, epsilon=DEFAULT_EPSILON):
    """GSAM's update direction (Zhuang et al., ICLR 2022, Algorithm 1).

    With the clean gradient `g = ∇L(w)` and the SAM gradient
    `g_p = ∇L(w + ε)`, GSAM removes from `g_p` α times the part of `g`
    orthogonal to `g_p`, which descends the surrogate gap without changing
    the perturbed loss to first order:

    ```
    g_∥ = (g · g_p / (‖g_p‖² + epsilon)) g_p
    d   = g_p − α (g − g_∥)
    ```

    Dot products and norms run over all variables together, in float32.
    `alpha=0` returns `perturbed` unchanged.

    Args:
        clean: list of clean gradients (or `None`).
        perturbed: list of SAM gradients, aligned with `clean`.
        alpha: α ≥ 0, the weight of the orthogonal component.
        epsilon: guards the division by ‖g_p‖². Defaults to `1e-12`.

    Returns:
        A list of tensors, each of the dtype of its SAM gradient.
    """
    clean = backend.to_dense(clean)
    perturbed = backend.to_dense(perturbed)
    pairs = _present_pairs(clean, perturbed)
    dot = _sum_over(ops.sum(ops.multiply(g, p)) for g, p in pairs)
    squared = _sum_over(ops.sum(ops.square(p)) for _, p in pairs)
    projection = dot / (squared + epsilon)

    def update(g, p):
        orthogonal = ops.subtract(g, ops.multiply(projection, p))
        return ops.subtract(p, ops.multiply(alpha, orthogonal))

    return _map_pairs(update, clean, perturbed, keep="second")


def looksam_direction(clean, perturbed, epsilon=DEFAULT_EPSILON):
    """The direction LookSAM keeps from a SAM step (Liu et al., CVPR 2022).

    For each variable separately, as the public implementations do
    (unofficial ones: Liu et al. published none that we found; MSAM's
    reimplementation takes whole-vector norms instead), the part of the
    SAM gradient `g_s` orthogonal to the clean gradient `g`:

    ```
    g_v = g_s − (g · g_s / (‖g‖² + epsilon)) g
    ```

    Returns one float32 tensor per variable (`None` kept in place).
    """

    def direction(g, s):
        coefficient = ops.sum(ops.multiply(g, s)) / (
            ops.sum(ops.square(g)) + epsilon
        )
        return ops.subtract(s, ops.multiply(coefficient, g))

    return _map_pairs(
        direction,
        backend.to_dense(clean),
        backend.to_dense(perturbed),
        keep=None,
        cast=False,
    )


def looksam_gradients(clean, directions, alpha, epsilon=DEFAULT_EPSILON):
    """LookSAM's gradient on the steps between two SAM steps.

    For each variable separately, the clean gradient plus the stored
    direction `g_v` (see `looksam_direction`) rescaled to α times the
    clean gradient's norm:

    ```
    g + α (‖g‖ / (‖g_v‖ + epsilon)) g_v
    ```

    A zero direction (before the first SAM step) gives `g` itself.
    """

    def reuse(g, v):
        scale = alpha * _global_norm([g]) / (_global_norm([v]) + epsilon)
        return ops.add(g, ops.multiply(scale, v))

    return _map_pairs(reuse, backend.to_dense(clean), directions, keep="first")


def friendly_direction(gradients, average, sigma):
    """F-SAM's direction of ε (Li et al., CVPR 2024).

    Friendly SAM (Li, Zhou, He, Cheng and Huang) perturbs along
    the clean gradient `g` less σ times the moving average `m` of the
    previous steps' clean gradients (see `friendly_average`), an estimate
    of the full gradient, so that ε follows the batch's own noise:

    ```
    d = g − σ m
    ```

    `sigma=0` returns `g`; with `m = 0` (the first step) `d = g`. ε is
    then SAM's `ρ d / ‖d‖₂` (or ASAM's, from `d`).

    Args:
        gradients: list of clean gradients (or `None`).
        average: list of the averages `m`, aligned with `gradients`.
        sigma: σ ≥ 0, the share of the average removed.

    Returns:
        A list of tensors, each of the dtype of its gradient (`None` kept).
    """
    return _map_pairs(
        lambda g, m: ops.subtract(g, ops.multiply(sigma, m)),
        backend.to_dense(gradients),
        average,
        keep="first",
    )


def friendly_average(gradients, average, decay):
    """F-SAM's moving average of the clean gradients, after a step.

    ```
    m ← g                      if m = 0 (the first step)
    m ← λ m + (1 − λ) g        otherwise
    ```

    as in the authors' code (nblt/F-SAM), which starts its buffer at the
    first gradient and updates it with the clean gradient `g` after
    forming that step's `d = g − σ m` (so `friendly_direction` takes the
    average of the steps before). A gradient that is not finite (a
    mixed-precision overflow) leaves `m` unchanged, as does `None`.

    Args:
        gradients: list of clean gradients (or `None`).
        average: list of the current averages `m`, aligned with
            `gradients`.
        decay: λ in [0, 1).

    Returns:
        A list of float32 tensors, one per entry of `average`.
    """
    gradients = backend.to_dense(gradients)
    started = [m for g, m in zip(gradients, average) if g is not None]
    first = ops.equal(_global_norm(started), 0)
    finite = ops.isfinite(_global_norm(gradients))

    def update(g, m):
        new = ops.where(first, g, decay * m + (1.0 - decay) * g)
        return ops.where(finite, new, m)

    return _map_pairs(update, gradients, average, keep="second")


def _map_pairs(fn, first, second, keep, cast=True):
    """`fn(a, b)` in float32 over aligned lists, skipping `None` entries.

    Where either entry is `None` the result is the `keep` list's entry
    ("first", "second") or `None`. With `cast`, each result takes the dtype
    of the kept list's entry.
    """
    result = []
    for a, b in zip(first, second):
        kept = {"first": a, "second": b}.get(keep)
        if a is None or b is None:
            result.append(kept)
            continue
        out = fn(ops.cast(a, "float32"), ops.cast(b, "float32"))
        result.append(ops.cast(out, kept.dtype) if cast else out)
    return result


def _present_pairs(first, second):
    return [
        (ops.cast(a, "float32"), ops.cast(b, "float32"))
        for a, b in zip(first, second)
        if a is not None and b is not None
    ]


def _sum_over(scalars):
    scalars = list(scalars)
    if not scalars:
        return ops.zeros((), "float32")
    return ops.sum(ops.stack(scalars))
