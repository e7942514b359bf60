"""A NumPy reference for SAM on a small MLP, for the sharded JAX tests.

The model is `Dense(H, tanh) -> [BatchNormalization] -> Dense(C)` with
Keras' sparse categorical cross-entropy from logits (mean over the batch).
Only the forward pass is written here, in float64; gradients are central
finite differences of it, so the reference shares nothing with Keras or
JAX but the definition of the model. Parameters are a dict of arrays
named by their Keras variable paths.
"""

import numpy as np

D, H, C = 6, 12, 10
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3
TRAINABLE = [
    "hidden/kernel",
    "hidden/bias",
    "norm/gamma",
    "norm/beta",
    "out/kernel",
    "out/bias",
]
MOVING = ["norm/moving_mean", "norm/moving_variance"]


def initial_parameters(batchnorm, seed=0):
    """Trainable and moving parameters, float32 values, by path."""
    rng = np.random.RandomState(seed)
    p = {
        "hidden/kernel": 0.6 * rng.randn(D, H),
        "hidden/bias": 0.1 * rng.randn(H),
        "out/kernel": 0.5 * rng.randn(H, C),
        "out/bias": 0.1 * rng.randn(C),
    }
    if batchnorm:
        p["norm/gamma"] = 1.0 + 0.2 * rng.randn(H)
        p["norm/beta"] = 0.1 * rng.randn(H)
        p["norm/moving_mean"] = np.zeros(H)
        p["norm/moving_variance"] = np.ones(H)
    return {k: v.astype("float32") for k, v in p.items()}


def data(n, seed=1):
    rng = np.random.RandomState(seed)
    return rng.randn(n, D).astype("float32"), rng.randint(0, C, n)


def trainable_names(params):
    return [k for k in TRAINABLE if k in params]


def forward(params, x, y):
    """(loss, batch mean and variance of the BatchNorm input or None)."""
    h = np.tanh(x @ params["hidden/kernel"] + params["hidden/bias"])
    stats = None
    if "norm/gamma" in params:
        mean, var = h.mean(axis=0), h.var(axis=0)
        stats = (mean, var)
        h = (h - mean) / np.sqrt(var + BN_EPSILON)
        h = h * params["norm/gamma"] + params["norm/beta"]
    logits = h @ params["out/kernel"] + params["out/bias"]
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean(), stats


def loss_and_gradients(params, x, y, step=1e-6):
    """Loss and {path: gradient} of the trainable parameters."""
    loss, _ = forward(params, x, y)
    gradients = {}
    for name in trainable_names(params):
        g = np.zeros_like(params[name])
        for i in np.ndindex(g.shape):
            shifted = {k: v.copy() for k, v in params.items()}
            shifted[name][i] += step
            up, _ = forward(shifted, x, y)
            shifted[name][i] -= 2 * step
            down, _ = forward(shifted, x, y)
            g[i] = (up - down) / (2 * step)
        gradients[name] = g
    return loss, gradients


def model_shard(name, value, index, shards, layouts):
    """Device `index`'s slice of `value` along the axes `layouts` shards."""
    layout = layouts.get(name)
    if layout is None:
        return value
    s = tuple(
        slice(None)
        if axis is None
        else slice(
            index * value.shape[a] // shards,
            (index + 1) * value.shape[a] // shards,
        )
        for a, axis in enumerate(layout)
    )
    return value[s]


def perturbation(grads, params, rho, adaptive=False, eta=0.01, norms=None):
    """ε of SAM (or ASAM, T = |w| + η except on biases and `beta`).

    `norms` replaces the global ‖T g‖: a function from the scaled
    gradients to one norm per entry (the per-model-shard variant).
    """
    t = {
        k: np.abs(params[k]) + eta
        if adaptive and not k.endswith(("bias", "beta"))
        else np.ones_like(g)
        for k, g in grads.items()
    }
    scaled = {k: t[k] * g for k, g in grads.items()}
    if norms is None:
        norm = np.sqrt(sum(np.sum(v**2) for v in scaled.values()))
        norms = {k: norm for k in grads}
    else:
        norms = norms(scaled)
    return {k: rho * t[k] * scaled[k] / (norms[k] + 1e-12) for k in grads}


def per_model_shard_norms(layouts, shards):
    """What a step that took ‖T g‖ over one model shard only would use.

    Each sharded entry is scaled, slice by slice, by the norm of the slices
    on its device plus the replicated entries; replicated entries by that
    of the first device. Returns a `norms` function for `perturbation`.
    """

    def norms(scaled):
        local = [
            np.sqrt(
                sum(
                    np.sum(model_shard(k, v, i, shards, layouts) ** 2)
                    for k, v in scaled.items()
                )
            )
            for i in range(shards)
        ]
        out = {}
        for k, v in scaled.items():
            if k in layouts:
                factor = np.zeros_like(v)
                for i in range(shards):
                    sliced = model_shard(k, factor, i, shards, layouts)
                    sliced[...] = local[i]
                out[k] = factor
            else:
                out[k] = local[0]
        return out

    return norms


def sam_step(params, x, y, rho, parts, **kwargs):
    """Clean loss, SAM gradients and BatchNorm batch statistics over
    `parts` equal consecutive slices, each with its own ε; `rho=0` is the
    plain step on the whole batch."""
    if not rho:
        loss, grads = loss_and_gradients(params, x, y)
        return loss, grads, [forward(params, x, y)[1]]
    losses, sam, stats = [], [], []
    for xi, yi in zip(np.split(x, parts), np.split(y, parts)):
        loss, grads = loss_and_gradients(params, xi, yi)
        eps = perturbation(grads, params, rho, **kwargs)
        perturbed = {k: v + eps.get(k, 0.0) for k, v in params.items()}
        losses.append(loss)
        sam.append(loss_and_gradients(perturbed, xi, yi)[1])
        stats.append(forward(params, xi, yi)[1])
    return (
        np.mean(losses),
        {k: np.mean([g[k] for g in sam], axis=0) for k in sam[0]},
        stats,
    )


class FriendlyStep:
    """F-SAM's step on the whole batch, a `sam_step` with state: ε along
    d = g − σ m, where m, the moving average of the clean gradients, is
    the first g and then moves by `decay` after d is formed."""

    def __init__(self, sigma, decay):
        self.sigma, self.decay, self.average = sigma, decay, None

    def __call__(self, params, x, y, rho, parts):
        assert parts == 1, "one state per step: the whole batch"
        loss, grads = loss_and_gradients(params, x, y)
        m = self.average or grads
        direction = {
            k: g if self.average is None else g - self.sigma * m[k]
            for k, g in grads.items()
        }
        self.average = {
            k: self.decay * m[k] + (1 - self.decay) * g
            for k, g in grads.items()
        }
        eps = perturbation(direction, params, rho)
        perturbed = {k: v + eps.get(k, 0.0) for k, v in params.items()}
        sam = loss_and_gradients(perturbed, x, y)[1]
        return loss, sam, [forward(params, x, y)[1]]


class LookSAMStep:
    """LookSAM's step on the whole batch, SAM every `every` steps: a SAM
    step keeps, per tensor, the part g_v of its SAM gradient orthogonal to
    its clean g; the steps between descend along g + α (‖g‖/‖g_v‖) g_v."""

    def __init__(self, alpha, every):
        self.alpha, self.every = alpha, every
        self.step, self.directions = 0, None

    def __call__(self, params, x, y, rho, parts):
        assert parts == 1, "one state per step: the whole batch"
        loss, grads = loss_and_gradients(params, x, y)
        stats = [forward(params, x, y)[1]]
        self.step += 1
        if (self.step - 1) % self.every:
            return (
                loss,
                {
                    k: g
                    + self.alpha
                    * np.linalg.norm(g)
                    / np.linalg.norm(self.directions[k])
                    * self.directions[k]
                    for k, g in grads.items()
                },
                stats,
            )
        eps = perturbation(grads, params, rho)
        perturbed = {k: v + eps.get(k, 0.0) for k, v in params.items()}
        sam = loss_and_gradients(perturbed, x, y)[1]
        self.directions = {
            k: s - np.sum(s * grads[k]) / np.sum(grads[k] ** 2) * grads[k]
            for k, s in sam.items()
        }
        return loss, sam, stats


def train(
    params, x, y, batch, rho, parts, lr, momentum, step=sam_step, **kwargs
):
    """Keras' SGD with momentum on SAM gradients, one epoch in order.

    `step` computes each batch's (loss, gradients, BatchNorm statistics):
    `sam_step` with `kwargs`, or a variant's step with its state.
    BatchNorm's moving statistics move by the mean of the parts' updates.
    Returns the final parameters (by path) and each step's clean loss.
    """
    params = {k: v.astype(np.float64) for k, v in params.items()}
    velocity = {k: np.zeros_like(params[k]) for k in trainable_names(params)}
    losses = []
    for start in range(0, len(x), batch):
        s = slice(start, start + batch)
        loss, grads, stats = step(params, x[s], y[s], rho, parts, **kwargs)
        losses.append(loss)
        for k, g in grads.items():
            velocity[k] = momentum * velocity[k] - lr * g
            params[k] = params[k] + velocity[k]
        if "norm/gamma" in params:
            for name, i in zip(MOVING, (0, 1)):
                old = params[name]
                update = np.mean([st[i] for st in stats], axis=0)
                params[name] = old + (1 - BN_MOMENTUM) * (update - old)
    return params, losses
