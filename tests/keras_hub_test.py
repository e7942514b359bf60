"""SAMModel on KerasHub models: tiny backbones built from their constructors.

No preset is downloaded. The BERT tests fine-tune with LoRA
(`backbone.enable_lora`): SAM's ε then covers the trainable weights only
(docs/keras_features.md). `make venv` installs keras-hub without its
dependencies (see the Makefile); without it these tests are skipped.
"""

import functools

import keras
import numpy as np
import pytest

import keras_sam
from tests import backends
from trainers import checkpoint

keras_hub = pytest.importorskip(
    "keras_hub",
    reason="keras-hub is not installed (`make venv` installs it with "
    "`pip install --no-deps`, see the Makefile; it needs Python 3.11+)",
)

SEQ, VOCAB, CLASSES, N = 8, 50, 3, 16
RANK = 4
RHO, LR = 0.5, 0.5


def bert_classifier(seed=0):
    """A 1-layer BERT (hidden size 8), 3-class head, no dropout, LoRA on."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=SEQ,
        dropout=0.0,
    )
    model = keras_hub.models.BertTextClassifier(
        backbone, num_classes=CLASSES, preprocessor=None, dropout=0.0
    )
    backbone.enable_lora(rank=RANK)
    return model


def text_data(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQ + 1, N)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype("int32")
    x = {
        "token_ids": rng.integers(1, VOCAB, (N, SEQ)).astype("int32") * mask,
        "segment_ids": np.zeros((N, SEQ), "int32"),
        "padding_mask": mask,
    }
    return x, rng.integers(0, CLASSES, N).astype("int32")


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def values(variables):
    return {v.path: keras.ops.convert_to_numpy(v.value) for v in variables}


def assert_bitwise_equal(got, want):
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_lora_leaves_trainable_only_the_lora_factors_biases_and_head():
    model = bert_classifier()
    paths = [v.path.split("/")[-1] for v in model.trainable_variables]
    assert sorted(paths) == sorted(
        ["bias", "lora_kernel_a", "lora_kernel_b"] * 2 + ["kernel", "bias"]
    )


@pytest.mark.parametrize(
    "perturbed", ["all", ["lora_kernel"]], ids=["trainable", "lora_factors"]
)
def test_lora_sam_step_is_two_passes_with_eps_over_trainable_weights_only(
    perturbed,
):
    model = bert_classifier()
    # LoRA's B starts at zero, where A gets no gradient: start elsewhere.
    rng = np.random.default_rng(1)
    for v in model.trainable_variables:
        if v.path.endswith("lora_kernel_b"):
            v.assign(0.3 * rng.standard_normal(v.shape).astype("float32"))
    x, y = text_data()
    w0 = [
        keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables
    ]
    frozen = values(model.non_trainable_variables)
    mask = [
        perturbed == "all" or "lora_kernel" in v.path
        for v in model.trainable_variables
    ]

    # The reference: the backend's own autodiff, twice, with ε from the
    # gradient of the trainable weights alone (or of the LoRA factors
    # alone, with `perturbed_variables`), written by hand.
    def loss_of(outputs):
        return xent()(y, outputs)

    g = backends.gradients(model, loss_of, x)
    norm = np.sqrt(
        sum(np.sum(gi.astype(np.float64) ** 2) for gi, m in zip(g, mask) if m)
    )
    for v, wi, gi, m in zip(model.trainable_variables, w0, g, mask):
        v.assign(wi + RHO * gi / norm * m)
    g_sam = backends.gradients(model, loss_of, x)
    for v, wi in zip(model.trainable_variables, w0):
        v.assign(wi)
    want = [wi - LR * gi for wi, gi in zip(w0, g_sam)]
    plain = [wi - LR * gi for wi, gi in zip(w0, g)]

    sam = keras_sam.SAMModel(model, rho=RHO, perturbed_variables=perturbed)
    sam.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    sam.fit(x, y, batch_size=N, epochs=1, shuffle=False, verbose=0)

    got = [keras.ops.convert_to_numpy(v.value) for v in sam.trainable_variables]
    for w, v, want_i in zip(got, sam.trainable_variables, want):
        np.testing.assert_allclose(
            w, want_i, rtol=1e-4, atol=1e-6, err_msg=v.path
        )
    # ε moved the step: plain SGD lands far further away than the error.
    error = max(np.abs(w - want_i).max() for w, want_i in zip(got, want))
    moved = max(np.abs(w - p).max() for w, p in zip(got, plain))
    assert moved > 5e-5 and moved > 100 * error
    assert_bitwise_equal(values(model.non_trainable_variables), frozen)


def test_lora_fit_changes_only_the_trainable_weights():
    model = bert_classifier()
    x, y = text_data()
    frozen = values(model.non_trainable_variables)
    trainable = values(model.trainable_variables)
    sam = keras_sam.SAMModel(model, rho=RHO)
    sam.compile(
        optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.1), loss=xent()
    )
    history = sam.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)

    assert_bitwise_equal(values(model.non_trainable_variables), frozen)
    for path, value in values(model.trainable_variables).items():
        assert np.abs(value - trainable[path]).max() > 1e-4, path
    assert np.all(np.array(history.history["sharpness"]) > 0)


def adamw():
    # Named: variable paths include the optimizer's name, which Keras
    # would otherwise number per process (adam_w_1, adam_w_2, ...).
    return keras.optimizers.AdamW(1e-2, name="adamw")


def fit_lora(model, x, y, epochs):
    sam = keras_sam.SAMModel(model, rho=RHO)
    sam.compile(optimizer=adamw(), loss=xent())
    sam.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return sam


@functools.cache
def uninterrupted_run():
    """Every base variable after 2 epochs of `fit_lora`, in one go."""
    x, y = text_data()
    return values(fit_lora(bert_classifier(), x, y, epochs=2).base.variables)


def rebuilt_lora_model(seed=5):
    """The same model built again (another seed: every value is loaded)."""
    model = keras_sam.SAMModel(bert_classifier(seed=seed), rho=RHO)
    model.compile(optimizer=adamw(), loss=xent())
    # As for any Keras model: the optimizer's slots must exist to be set.
    model.optimizer.build(model.trainable_variables)
    return model


def test_lora_run_resumes_exactly_from_every_variable_by_path(tmp_path):
    x, y = text_data()
    first = fit_lora(bert_classifier(), x, y, epochs=1)
    path = str(tmp_path / "checkpoint.npz")
    checkpoint.save(path, first, step=2)
    resumed = rebuilt_lora_model()
    checkpoint.restore(path, resumed)
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    assert_bitwise_equal(values(resumed.base.variables), uninterrupted_run())


def test_lora_weights_file_merges_the_factors_and_zeroes_them_on_loading(
    tmp_path,
):
    x, y = text_data()
    first = fit_lora(bert_classifier(), x, y, epochs=1)
    path = str(tmp_path / "lora.weights.h5")
    first.save_weights(path)
    resumed = rebuilt_lora_model()
    resumed.load_weights(path)

    # Keras writes W + B·A into each LoRA layer's frozen kernel and,
    # loading into a LoRA layer, sets A = B = 0: the same function ...
    np.testing.assert_allclose(
        resumed.predict(x, verbose=0), first.predict(x, verbose=0), atol=1e-6
    )
    factors = [v for v in resumed.variables if "lora_kernel" in v.path]
    assert len(factors) == 4
    assert all(not np.any(v.numpy()) for v in factors)
    # ... but not the same run: it goes on elsewhere.
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    got, want = values(resumed.base.variables), uninterrupted_run()
    assert max(np.abs(got[k] - want[k]).max() for k in want) > 1e-3


def test_keras_file_of_a_lora_model_holds_the_merged_model(tmp_path):
    x, y = text_data()
    sam = fit_lora(bert_classifier(), x, y, epochs=1)
    path = str(tmp_path / "model.keras")
    sam.save(path)

    loaded = keras.saving.load_model(path)  # `import keras_sam` first

    assert isinstance(loaded, keras_sam.SAMModel)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), sam.predict(x, verbose=0), atol=1e-6
    )
    # KerasHub folds B·A into each kernel when saving and rebuilds the
    # backbone from its constructor: no LoRA factors, nothing frozen.
    assert not any("lora" in v.path for v in loaded.variables)
    assert len(loaded.trainable_variables) > len(sam.trainable_variables)


def resnet_classifier(seed=0, preprocessor=None):
    """A one-block ResNet (64 filters, 8x8 images) with BatchNorm."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64],
        stackwise_num_blocks=[1],
        stackwise_num_strides=[1],
        block_type="basic_block",
        image_shape=(8, 8, 3),
    )
    return keras_hub.models.ResNetImageClassifier(
        backbone, num_classes=CLASSES, preprocessor=preprocessor
    )


def test_resnet_keras_file_round_trip_trains_on_identically(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((N, 8, 8, 3), dtype="float32")
    y = rng.integers(0, CLASSES, N)
    sam = keras_sam.SAMModel(resnet_classifier(), rho=0.05)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=xent())
    sam.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "resnet.keras")
    sam.save(path)
    loaded = keras.saving.load_model(path)

    for model in (sam, loaded):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_bitwise_equal(values(loaded.variables), values(sam.variables))
    # BatchNorm's moving statistics were trained (from the clean pass).
    means = [v for v in sam.base.variables if v.path.endswith("moving_mean")]
    assert means and all(np.abs(v.numpy()).max() > 0 for v in means)


def test_a_pipeline_models_predict_step_serves_predict():
    # KerasHub's detectors decode in `predict_step`; their `predict` takes
    # two positional arguments: SAMModel.predict had failed on them.
    from keras_hub.src.utils.pipeline_model import PipelineModel

    class Decoding(PipelineModel):
        def __init__(self, **kwargs):
            inputs = keras.Input((3,))
            outputs = keras.layers.Dense(2)(inputs)
            super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        def predict_step(self, *args):
            output = super().predict_step(*args)
            if isinstance(output, tuple):  # JAX's (outputs, state)
                return keras.ops.softmax(output[0]), output[1]
            return keras.ops.softmax(output)

    model = keras_sam.SAMModel(Decoding(), rho=RHO)
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).standard_normal((4, 3)).astype("float32")
    model.fit(x, np.zeros((4, 2), "float32"), verbose=0)
    logits = keras.ops.convert_to_numpy(model(x))
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-6)


def image_preprocessor():
    """Resizes raw uint8 images to the backbone's 8x8 and scales them."""
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(8, 8), scale=1 / 255.0
    )
    return keras_hub.models.ResNetImageClassifierPreprocessor(converter)


def raw_images(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (N, 12, 12, 3)).astype("uint8")
    return x, rng.integers(0, CLASSES, N).astype("int32")


def compiled(model):
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    return model


def test_a_tasks_preprocessor_prepares_the_data_as_the_tasks_own_methods():
    # `task.fit` batches raw data and maps the task's preprocessor over
    # it; at ρ = 0 SAMModel's `fit` is bitwise the task's own, validation
    # included. Without the preprocessing, 12x12 images fail to reach the
    # 8x8 backbone.
    x, y = raw_images()
    task = compiled(resnet_classifier(preprocessor=image_preprocessor()))
    sam = compiled(
        keras_sam.SAMModel(
            resnet_classifier(preprocessor=image_preprocessor()), rho=0.0
        )
    )
    fits = [
        m.fit(x, y, batch_size=4, epochs=2, validation_split=0.25, verbose=0)
        for m in (task, sam)
    ]

    assert_bitwise_equal(values(sam.base.variables), values(task.variables))
    assert fits[1].history == {
        k: v for k, v in fits[0].history.items() if "loss" in k
    }
    assert (
        sam.evaluate(x, y, batch_size=4, verbose=0)
        == task.evaluate(x, y, batch_size=4, verbose=0)[0]
    )
    for method, args in (
        ("predict", (x,)),
        ("predict_on_batch", (x[:4],)),
        ("test_on_batch", (x[:4], y[:4])),
        ("train_on_batch", (x[:4], y[:4])),
    ):
        got, want = (getattr(m, method)(*args) for m in (sam, task))
        if method.startswith(("test", "train")):
            want = want[0]  # the task logs its accuracy too
        np.testing.assert_array_equal(got, want, err_msg=method)
    assert_bitwise_equal(values(sam.base.variables), values(task.variables))


def test_a_sam_step_on_raw_data_is_the_hand_step_on_preprocessed_data():
    x, y = raw_images()
    sam = compiled(
        keras_sam.SAMModel(
            resnet_classifier(preprocessor=image_preprocessor()), rho=RHO
        )
    )
    sam.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    # The reference: the same ResNet without a preprocessor, SAM steps by
    # hand on images that the preprocessor alone prepared, in `tf.data` as
    # KerasHub runs it (bilinear resizing differs across backends).
    import tensorflow as tf

    reference = resnet_classifier()
    batches = tf.data.Dataset.from_tensor_slices(x).batch(8)
    prepared = np.concatenate(
        list(batches.map(image_preprocessor()).as_numpy_iterator())
    )
    backends.train_by_hand_sam(reference, xent(), prepared, y, 8, RHO, LR)
    want = values(reference.trainable_variables)
    got = values(sam.base.trainable_variables)
    for path in want:
        np.testing.assert_allclose(
            got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=path
        )


def test_a_batch_with_a_dict_of_labels_is_preprocessed_and_trained():
    # A detector's labels are a dict (boxes, classes); KerasHub's own
    # `train_on_batch` fails on it (it converts `y` to one tensor).
    from keras_hub.src.utils.pipeline_model import PipelineModel

    class TwoHeads(PipelineModel):
        def __init__(self, **kwargs):
            inputs = keras.Input((3,))
            outputs = {
                "a": keras.layers.Dense(1, name="a")(inputs),
                "b": keras.layers.Dense(2, name="b")(inputs),
            }
            super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        def preprocess_samples(self, x, y=None, sample_weight=None):
            return keras.utils.pack_x_y_sample_weight(2 * x, y, sample_weight)

    def model(wrap):
        keras.utils.set_random_seed(0)
        base = TwoHeads()
        model = keras_sam.SAMModel(base, rho=0.0) if wrap else base
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        return model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype("float32")
    y = {
        "a": rng.standard_normal((4, 1)).astype("float32"),
        "b": rng.standard_normal((4, 2)).astype("float32"),
    }
    sam, plain = model(wrap=True), model(wrap=False)
    for method, args, plain_args in (
        ("train_on_batch", (x, y), (2 * x, y)),
        ("test_on_batch", (x, y), (2 * x, y)),
    ):
        got = getattr(sam, method)(*args, return_dict=True)
        want = getattr(keras.Model, method)(
            plain, *plain_args, return_dict=True
        )
        assert got == {k: v for k, v in want.items() if k in got}, method
    got = sam.predict_on_batch(x)
    want = keras.Model.predict_on_batch(plain, 2 * x)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert_bitwise_equal(values(sam.base.variables), values(plain.variables))
