"""Sparse gradients (an `Embedding`'s) give the step of their dense equivalent.

On TensorFlow the gradient of a lookup is a `tf.IndexedSlices` with one row
per lookup: a token seen k times has k rows, whose sum is its dense
gradient. The oracle below is derived by hand in NumPy (float64) for a
bag-of-embeddings classifier, `logits = mean_l E[t_l] @ W + b`, so every
backend is checked against the same independent numbers; on JAX and
PyTorch the gradients are dense and the test holds them to the same oracle.
"""

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import backend
from tests.backends import BACKEND

VOCABULARY, WIDTH, LENGTH, CLASSES, BATCH = 7, 3, 6, 3, 8
LEARNING_RATE = 0.5


def bag_of_embeddings_loss_and_grad(weights, tokens, y):
    """Mean cross-entropy and its gradient (dE, dW, db), by hand."""
    table, kernel, bias = weights
    n = tokens.shape[0]
    features = table[tokens].mean(axis=1)
    logits = features @ kernel + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(n), y]).mean()
    dlogits = p.copy()
    dlogits[np.arange(n), y] -= 1.0
    dlogits /= n
    dfeatures = dlogits @ kernel.T
    dtable = np.zeros_like(table)
    for i in range(n):
        for token in tokens[i]:  # a repeated token adds its rows up
            dtable[token] += dfeatures[i] / tokens.shape[1]
    return loss, [dtable, features.T @ dlogits, dlogits.sum(axis=0)]


def sam_gradient(weights, tokens, y, rho, adaptive=False, eta=0.01):
    """∇L(w + ε); ASAM's T = |w| + η on the table and kernel, 1 on the
    bias, as `SAMModel(adaptive=True)`'s default."""
    _, g = bag_of_embeddings_loss_and_grad(weights, tokens, y)
    if adaptive:
        t = [np.abs(weights[0]) + eta, np.abs(weights[1]) + eta, 1.0]
    else:
        t = [1.0, 1.0, 1.0]
    norm = np.sqrt(sum(np.sum((ti * gi) ** 2) for ti, gi in zip(t, g)))
    perturbed = [
        w + rho * ti**2 * gi / (norm + 1e-12)
        for w, ti, gi in zip(weights, t, g)
    ]
    return g, bag_of_embeddings_loss_and_grad(perturbed, tokens, y)[1]


def oracle_step(weights, tokens, y, rho, variant):
    """The weights after one SGD step of `variant`."""
    if variant == "micro_batches":
        halves = np.array_split(np.arange(len(y)), 2)
        parts = [sam_gradient(weights, tokens[h], y[h], rho) for h in halves]
        update = [(a + b) / 2 for a, b in zip(parts[0][1], parts[1][1])]
    else:
        clean, update = sam_gradient(
            weights, tokens, y, rho, adaptive=variant == "asam"
        )
        if variant == "gsam":
            dot = sum(np.sum(g * p) for g, p in zip(clean, update))
            squared = sum(np.sum(p**2) for p in update)
            update = [
                p - 0.3 * (g - dot / (squared + 1e-12) * p)
                for g, p in zip(clean, update)
            ]
    return [w - LEARNING_RATE * u for w, u in zip(weights, update)]


def text_data():
    rng = np.random.RandomState(0)
    # Few distinct tokens, so most rows of the gradient repeat.
    tokens = rng.randint(0, 3, (BATCH, LENGTH)).astype("int32")
    y = rng.randint(0, CLASSES, BATCH)
    weights = [
        rng.randn(VOCABULARY, WIDTH),
        rng.randn(WIDTH, CLASSES),
        0.1 * rng.randn(CLASSES),
    ]
    return tokens, y, weights


def bag_of_embeddings(weights):
    model = keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, WIDTH),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.set_weights([w.astype("float32") for w in weights])
    return model


def modes():
    if BACKEND == "tensorflow":
        return ["eager", "graph", "xla"]
    return ["jit"] if BACKEND == "jax" else ["eager"]


def compile_model(model, mode, optimizer=None):
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=mode == "eager",
        jit_compile=mode in ("xla", "jit"),
    )


def test_the_norm_of_a_repeated_lookup_sums_its_rows_first():
    # One row looked up four times, loss = sum of the outputs: the gradient
    # of that row is [4, 4], so ‖g‖ = 4√2 (each lookup's rows alone: 2√2).
    layer = keras.layers.Embedding(5, 2)
    layer.build((1, 4))
    tokens = np.array([[1, 1, 1, 1]], "int32")

    def objective(weights):
        (table,) = weights
        outputs, _ = layer.stateless_call([table], [], tokens)
        return keras.ops.sum(outputs), ()

    _, gradients = backend.value_and_gradients(
        objective, [layer.embeddings.value]
    )
    norm = keras_sam.global_norm(gradients)
    np.testing.assert_allclose(float(norm), 4 * np.sqrt(2), rtol=1e-6)
    (epsilon,) = keras_sam.sam_perturbation(gradients, rho=0.5)
    want = np.zeros((5, 2))
    want[1] = 0.5 / np.sqrt(2)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(epsilon), want, rtol=1e-6
    )


@pytest.mark.parametrize("mode", modes())
@pytest.mark.parametrize("variant", ["sam", "asam", "gsam", "micro_batches"])
def test_a_sam_step_on_an_embedding_matches_the_dense_oracle(variant, mode):
    tokens, y, weights = text_data()
    rho = 0.5 if variant == "asam" else 0.1
    arguments = {
        "sam": {},
        "asam": {"adaptive": True},
        "gsam": {"gsam_alpha": 0.3},
        "micro_batches": {"micro_batches": 2},
    }[variant]
    base = bag_of_embeddings(weights)
    model = keras_sam.SAMModel(base, rho=rho, **arguments)
    compile_model(model, mode)
    model.fit(tokens, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    want = oracle_step(weights, tokens, y, rho, variant)
    for got, expected in zip(base.get_weights(), want):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    _, clean = bag_of_embeddings_loss_and_grad(weights, tokens, y)
    if variant == "sam":
        # The logged ‖g‖ is the dense gradient's norm, not the rows'.
        logged = float(model.get_metrics_result()["grad_norm"])
        dense_norm = np.sqrt(sum(np.sum(g**2) for g in clean))
        np.testing.assert_allclose(logged, dense_norm, rtol=1e-5)


class DenseLookup(keras.layers.Layer):
    """`Embedding` as a one-hot product: the same numbers, dense gradients."""

    def __init__(self, vocabulary, width, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary, self.width = vocabulary, width

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            (self.vocabulary, self.width), name="embeddings"
        )

    def call(self, tokens):
        one_hot = keras.ops.one_hot(tokens, self.vocabulary)
        return keras.ops.matmul(one_hot, self.embeddings)


def dense_equivalent(weights):
    model = keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            DenseLookup(VOCABULARY, WIDTH),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.set_weights([w.astype("float32") for w in weights])
    return model


@pytest.mark.parametrize("mode", modes())
@pytest.mark.parametrize(
    "arguments",
    [
        {"switching": "periodic", "looksam_alpha": 0.7},
        {"switching": "periodic"},
        {"rho": "schedule", "gsam_alpha": 0.3},
        {"perturbation": "momentum", "rho": 0.5},
        {"micro_batches": 3},
    ],
    ids=["looksam", "periodic", "gsam_schedule", "momentum_sam", "uneven"],
)
def test_every_variant_steps_as_with_the_dense_equivalent(arguments, mode):
    tokens, y, weights = text_data()
    tokens = np.concatenate([tokens, tokens[::-1], tokens[:5]])
    y = np.concatenate([y, y[::-1], y[:5]])
    results = []
    for build in (bag_of_embeddings, dense_equivalent):
        options = dict(arguments)
        if options.get("switching") == "periodic":
            options["switching"] = keras_sam.switching.Periodic(2)
        learning_rate = keras.optimizers.schedules.CosineDecay(0.5, 4)
        if options.get("rho") == "schedule":
            options["rho"] = keras_sam.schedules.RhoFollowingLearningRate(
                learning_rate, rho_max=0.1, rho_min=0.02
            )
        base = build(weights)
        model = keras_sam.SAMModel(base, **options)
        compile_model(
            model, mode, keras.optimizers.SGD(learning_rate, momentum=0.9)
        )
        model.fit(
            tokens, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
        )
        results.append(base.get_weights())
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", modes())
def test_rho_zero_on_an_embedding_is_the_plain_fit_bitwise(mode):
    tokens, y, weights = text_data()
    results = []
    for wrap in (lambda base: base, lambda base: keras_sam.SAMModel(base, 0)):
        base = bag_of_embeddings(weights)
        model = wrap(base)
        compile_model(model, mode, keras.optimizers.SGD(0.5, momentum=0.9))
        model.fit(tokens, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        results.append(base.get_weights())
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("sync", [False, True])
def test_replicas_perturb_an_embedding_as_the_oracle(sync):
    import tensorflow as tf

    from tests.distribute_test import mirrored

    tokens, y, weights = text_data()
    strategy = mirrored()
    with strategy.scope():
        base = bag_of_embeddings(weights)
        model = keras_sam.SAMModel(base, rho=0.1, sync_perturbations=sync)
        compile_model(model, "graph")
    dataset = tf.data.Dataset.from_tensor_slices((tokens, y)).batch(BATCH)
    model.fit(dataset, epochs=1, verbose=0)
    # Each replica's ε comes from its half of the batch, as micro-batches'.
    variant = "sam" if sync else "micro_batches"
    want = oracle_step(weights, tokens, y, 0.1, variant)
    for got, expected in zip(base.get_weights(), want):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
