"""An independent NumPy reference for SAM on softmax regression.

Everything here is derived by hand, in float64, without Keras or
TensorFlow: the model is `logits = x @ W + b`, the loss is Keras'
sparse categorical cross-entropy from logits with reduction
"sum_over_batch_size" (`Σ_i s_i ℓ_i / n`), plus `l2 · Σ W²`.
"""

import numpy as np


def softmax_regression_loss_and_grad(w, b, x, y, sample_weight=None, l2=0.0):
    """Loss and gradient (dW, db) at (W, b), by hand."""
    n = x.shape[0]
    s = np.ones(n) if sample_weight is None else sample_weight
    logits = x @ w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    nll = -np.log(p[np.arange(n), y])
    loss = np.sum(s * nll) / n + l2 * np.sum(w**2)
    dlogits = p.copy()
    dlogits[np.arange(n), y] -= 1.0
    dlogits *= (s / n)[:, None]
    return loss, (x.T @ dlogits + 2.0 * l2 * w, dlogits.sum(axis=0))


def perturbation(
    grads, weights, rho, adaptive=False, eta=0.01, adaptive_variables="weights"
):
    """ε of SAM, or of ASAM when `adaptive`.

    ASAM's T is |w| + η on the kernel W and, with `adaptive_variables="all"`
    only, on the bias b; with the default `"weights"`, T = 1 on b, as in the
    ASAM authors' code. `weights` is `[W, b]`.
    """
    if adaptive:
        scaled = (True, adaptive_variables == "all")
        t = [
            np.abs(w) + eta if on else np.ones_like(w)
            for w, on in zip(weights, scaled)
        ]
        norm = np.sqrt(sum(np.sum((ti * g) ** 2) for ti, g in zip(t, grads)))
        return [rho * ti**2 * g / (norm + 1e-12) for ti, g in zip(t, grads)]
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    return [rho * g / (norm + 1e-12) for g in grads]


def sam_gradient(
    w,
    b,
    x,
    y,
    rho,
    sample_weight=None,
    l2=0.0,
    loss_and_grad=softmax_regression_loss_and_grad,
    **kwargs,
):
    """(clean loss, [dW, db] at (W, b) + ε) of `loss_and_grad`."""
    loss, grads = loss_and_grad(w, b, x, y, sample_weight, l2)
    ew, eb = perturbation(grads, [w, b], rho, **kwargs)
    _, sam = loss_and_grad(w + ew, b + eb, x, y, sample_weight, l2)
    return loss, list(sam)


def penalized_loss_and_grad(w, b, x, y, sample_weight=None, l2=0.0):
    """`2 · (cross-entropy + l2 · Σ W²) + 0.1 · mean(logits²)`, by hand.

    The mean runs over the n × C logits.
    """
    loss, (gw, gb) = softmax_regression_loss_and_grad(
        w, b, x, y, sample_weight, l2
    )
    logits = x @ w + b
    dlogits = 0.2 * logits / logits.size
    return (
        2.0 * loss + 0.1 * np.mean(logits**2),
        (2.0 * gw + x.T @ dlogits, 2.0 * gb + dlogits.sum(axis=0)),
    )


def split_sam_gradient(w, b, x, y, rho, parts=2, sample_weight=None, **kwargs):
    """Mean of the SAM gradients of `parts` equal slices of the batch."""
    xs, ys = np.split(x, parts), np.split(y, parts)
    sws = (
        [None] * parts
        if sample_weight is None
        else np.split(sample_weight, parts)
    )
    results = [
        sam_gradient(w, b, xi, yi, rho, sample_weight=si, **kwargs)
        for xi, yi, si in zip(xs, ys, sws)
    ]
    loss = np.mean([r[0] for r in results])
    grads = [np.mean([r[1][i] for r in results], axis=0) for i in range(2)]
    return loss, grads


def array_split_sam_gradient(
    w, b, x, y, rho, parts=2, sample_weight=None, **kwargs
):
    """SAM over `parts` slices cut as `np.array_split` cuts (sizes n_i).

    Each slice gets its own ε; loss and gradients are the means over the
    non-empty slices weighted by n_i / n.
    """
    n = x.shape[0]
    sws = (
        [None] * parts
        if sample_weight is None
        else np.array_split(sample_weight, parts)
    )
    loss, grads = 0.0, [np.zeros_like(w), np.zeros_like(b)]
    for xi, yi, si in zip(
        np.array_split(x, parts), np.array_split(y, parts), sws
    ):
        if len(xi) == 0:
            continue
        part_loss, part_grads = sam_gradient(
            w, b, xi, yi, rho, sample_weight=si, **kwargs
        )
        loss += len(xi) / n * part_loss
        grads = [g + len(xi) / n * p for g, p in zip(grads, part_grads)]
    return loss, grads


def train_sgd_momentum(
    w, b, batches, rho, lr, momentum, gradient_fn=sam_gradient, **kwargs
):
    """Keras' SGD with momentum (v ← μv − ηg; w ← w + v) on SAM gradients.

    `batches` holds `(x, y)` or `(x, y, sample_weight)` tuples; `lr` may be
    a function of the step index. Returns the
    final (W, b) and the clean loss of every step.
    """
    w, b = w.astype(np.float64), b.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    losses = []
    for step, batch in enumerate(batches):
        x, y, sw = batch if len(batch) == 3 else (*batch, None)
        loss, (gw, gb) = gradient_fn(
            w, b, x, y, rho, sample_weight=sw, **kwargs
        )
        losses.append(loss)
        rate = lr(step) if callable(lr) else lr
        vw = momentum * vw - rate * gw
        vb = momentum * vb - rate * gb
        w, b = w + vw, b + vb
    return w, b, losses


def _dot(a, b):
    return sum(np.sum(ai * bi) for ai, bi in zip(a, b))


def gsam_gradient(w, b, x, y, rho, alpha, sample_weight=None):
    """GSAM: g_p − α (g − (g·g_p / ‖g_p‖²) g_p), over both tensors."""
    loss, clean = softmax_regression_loss_and_grad(w, b, x, y, sample_weight)
    _, sam = sam_gradient(w, b, x, y, rho, sample_weight)
    projection = _dot(clean, sam) / _dot(sam, sam)
    return loss, [p - alpha * (g - projection * p) for g, p in zip(clean, sam)]


def masked_sam_gradient(w, b, x, y, rho, mask, sample_weight=None):
    """SAM with ε computed from and added to the tensors in `mask` only."""
    loss, clean = softmax_regression_loss_and_grad(w, b, x, y, sample_weight)
    chosen = [g for g, m in zip(clean, mask) if m]
    norm = np.sqrt(sum(np.sum(g**2) for g in chosen))
    eps = [rho * g / norm if m else 0.0 * g for g, m in zip(clean, mask)]
    _, sam = softmax_regression_loss_and_grad(
        w + eps[0], b + eps[1], x, y, sample_weight
    )
    return loss, list(sam)


class Switching:
    """A stateful gradient function: SAM on the steps `is_sam(t)` says.

    On the other steps the clean gradient is used, or with `looksam_alpha`
    LookSAM's g + α (‖g‖/‖g_v‖) g_v, per tensor, where g_v is the part of
    the last SAM gradient orthogonal to that step's clean gradient.
    """

    def __init__(self, is_sam, looksam_alpha=None):
        self.is_sam = is_sam
        self.alpha = looksam_alpha
        self.step = 0
        self.directions = None
        self.decisions = []

    def __call__(self, w, b, x, y, rho, sample_weight=None):
        loss, clean = softmax_regression_loss_and_grad(
            w, b, x, y, sample_weight
        )
        use_sam = self.is_sam(self.step, _dot(clean, clean))
        self.decisions.append(bool(use_sam))
        self.step += 1
        if use_sam:
            _, sam = sam_gradient(w, b, x, y, rho, sample_weight)
            self.directions = [
                s - (np.sum(g * s) / np.sum(g * g)) * g
                for g, s in zip(clean, sam)
            ]
            return loss, sam
        if self.alpha is None or self.directions is None:
            return loss, list(clean)
        return loss, [
            g + self.alpha * np.linalg.norm(g) / np.linalg.norm(v) * v
            for g, v in zip(clean, self.directions)
        ]


def gradient_norm_outlier(decay, c_start, c_end, decay_steps):
    """AE-SAM's decision as a function of (step, ‖g‖²), with its state."""
    state = {}

    def is_sam(step, squared_norm):
        if not state:
            state.update(mean=squared_norm, variance=0.0)
            return True
        mean = decay * state["mean"] + (1 - decay) * squared_norm
        variance = (
            decay * state["variance"] + (1 - decay) * (squared_norm - mean) ** 2
        )
        state.update(mean=mean, variance=variance)
        c = c_start + (c_end - c_start) * min(step / decay_steps, 1.0)
        return squared_norm >= mean + c * np.sqrt(variance)

    return is_sam


def train_momentum_sam(
    w, b, batches, rho, lr, momentum, l2=0.0, mask=(True, True)
):
    """Momentum-SAM in Keras' convention, by hand.

    Per step: ε = ρ m/(‖m‖ + 1e-12) from the momentum m (zero at first) of
    the tensors in `mask` (W, b), 0 on the others; g = ∇L(w + ε);
    m ← μ m − lr g; w ← w + m. Returns the final (W, b) and the loss at
    w + ε of every step.
    """
    w, b = w.astype(np.float64), b.astype(np.float64)
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    losses = []
    for x, y, sw in batches:
        tw, tb = (m if on else 0.0 * m for m, on in zip((mw, mb), mask))
        norm = np.sqrt(np.sum(tw**2) + np.sum(tb**2))
        ew, eb = rho * tw / (norm + 1e-12), rho * tb / (norm + 1e-12)
        loss, (gw, gb) = softmax_regression_loss_and_grad(
            w + ew, b + eb, x, y, sw, l2
        )
        losses.append(loss)
        mw, mb = momentum * mw - lr * gw, momentum * mb - lr * gb
        w, b = w + mw, b + mb
    return w, b, losses


def train_momentum_sam_as_published(w, b, batches, rho, lr, momentum, l2=0.0):
    """Momentum-SAM as the authors' PyTorch code runs it (MarlonBecker/MSAM).

    PyTorch's buffer v ← μ v + g, w ← w − lr v; the parameters are stored
    at the perturbed point p = w − ρ v/‖v‖, where the next gradient is
    taken. Returns the unperturbed final (W, b).
    """
    params = [w.astype(np.float64), b.astype(np.float64)]
    buffers = [np.zeros_like(p) for p in params]
    inverse_norm = 0.0
    for x, y, sw in batches:
        _, grads = softmax_regression_loss_and_grad(*params, x, y, sw, l2)
        for p, v, g in zip(params, buffers, grads):
            p += rho * inverse_norm * v  # back to w
            v *= momentum
            v += g
            p -= lr * v
        norm = np.sqrt(sum(np.sum(v**2) for v in buffers))
        inverse_norm = 1.0 / (norm + 1e-12)
        for p, v in zip(params, buffers):
            p -= rho * inverse_norm * v  # to the next gradient's point
    return [p + rho * inverse_norm * v for p, v in zip(params, buffers)]


def clip(grads, clipnorm=None, global_clipnorm=None, clipvalue=None):
    """A Keras optimizer's clipping of the gradients it applies.

    `clipnorm`: each tensor to L2 norm ≤ `clipnorm`; `global_clipnorm`: all
    tensors by one factor, to a global L2 norm ≤ `global_clipnorm`;
    `clipvalue`: each element to [−clipvalue, clipvalue].
    """
    if clipnorm:
        return [g * clipnorm / max(np.linalg.norm(g), clipnorm) for g in grads]
    if global_clipnorm:
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        return [g * global_clipnorm / max(norm, global_clipnorm) for g in grads]
    if clipvalue:
        return [np.clip(g, -clipvalue, clipvalue) for g in grads]
    return list(grads)


def train_keras_sgd(
    w,
    b,
    batches,
    rho,
    lr,
    momentum=0.0,
    accumulation_steps=None,
    ema_momentum=None,
    ema_overwrite_frequency=None,
    gradient_fn=sam_gradient,
    **clipping,
):
    """Keras' SGD with its optimizer features, on SAM gradients, by hand.

    One call per batch, as `fit` makes: the batch's SAM gradient at the
    current weights, with its own ε (`rho` may be a function of the call
    index t, and so may `lr`, as Keras' learning-rate schedules count
    calls). Without accumulation every call applies its gradient. With
    `accumulation_steps=k` the calls' gradients are summed, and every k-th
    call applies their mean; the weights do not move in between. An
    applied gradient is clipped (`clip(..., **clipping)`), then
    v ← μv − lr·g; w ← w + v.

    With `ema_momentum=β`, after every call (an update or not) the average
    a ← β'a + (1 − β')w of the weights w at that moment, where β' = 0
    while u = 0 and β' = β after, u = t // k (or t) being the number of
    updates made before the call. With `ema_overwrite_frequency=f`, the
    weights are set to a after the calls where (u + 1) % f == 0.

    Returns the final (W, b), the clean loss of every call, and the final
    average (or `None`).
    """
    k = accumulation_steps or 1
    params = [w.astype(np.float64), b.astype(np.float64)]
    velocity = [np.zeros_like(p) for p in params]
    summed = [np.zeros_like(p) for p in params]
    average = None
    losses = []
    for t, batch in enumerate(batches):
        x, y, sw = batch if len(batch) == 3 else (*batch, None)
        radius = rho(t) if callable(rho) else rho
        loss, grads = gradient_fn(*params, x, y, radius, sample_weight=sw)
        losses.append(loss)
        summed = [s + g for s, g in zip(summed, grads)]
        if (t + 1) % k == 0:
            applied = clip([s / k for s in summed], **clipping)
            summed = [np.zeros_like(p) for p in params]
            rate = lr(t) if callable(lr) else lr
            velocity = [
                momentum * v - rate * g for v, g in zip(velocity, applied)
            ]
            params = [p + v for p, v in zip(params, velocity)]
        if ema_momentum is not None:
            updates = t // k
            beta = ema_momentum if updates else 0.0
            average = [
                beta * a + (1 - beta) * p
                for a, p in zip(average or params, params)
            ]
            overwrite = ema_overwrite_frequency or 0
            if overwrite and (updates + 1) % overwrite == 0:
                params = [a.copy() for a in average]
    return params[0], params[1], losses, average


def assert_fit_matches(model, history, want_w, want_b, losses, epochs):
    """A softmax regression's fit ended at the oracle's weights and logged,
    per epoch, the mean of the oracle's per-step losses."""
    got_w, got_b = model.base.get_weights()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
    steps = len(losses) // epochs
    np.testing.assert_allclose(
        history.history["loss"],
        np.mean(np.reshape(losses, (epochs, steps)), axis=1),
        rtol=1e-5,
    )
