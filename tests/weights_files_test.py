"""`SAMModel.export` and weights files that the bare base model can read."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from keras_sam import switching
from tests import backends
from tests.sam_model_test import BATCH
from tests.sam_model_test import bn_dropout_model
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import xent


def trained(**kwargs):
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(bn_dropout_model(seed=3), rho=0.3, **kwargs)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


def assert_same_variables(got, want):
    # Keras does not save the seed generators' state in weights files.
    got = [v for v in got if "seed" not in v.path]
    want = [v for v in want if "seed" not in v.path]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.skipif(
    backends.BACKEND == "torch",
    reason="Keras' SavedModel export fails on PyTorch for a plain model too "
    "(torch.export with dynamic shapes; static ones need torch_xla)",
)
def test_export_writes_the_base_models_serving_artifact(tmp_path):
    model = trained()
    path = os.fspath(tmp_path / "exported")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    x, _, _, _ = softmax_data()
    np.testing.assert_allclose(
        reloaded.serve(tf.constant(x)).numpy(),
        model.base.predict(x, verbose=0),
        rtol=1e-6,
    )


def test_model_checkpoint_weights_load_into_the_bare_base(tmp_path):
    x, y, _, _ = softmax_data()
    path = os.fspath(tmp_path / "ckpt.weights.h5")
    model = keras_sam.SAMModel(bn_dropout_model(seed=3), rho=0.3)
    model.compile(optimizer=sgd(), loss=xent())
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
        ],
    )
    bare = bn_dropout_model(seed=9)
    bare.load_weights(path)
    # Moving statistics included: every variable of the base.
    assert_same_variables(bare.variables, model.base.variables)
    np.testing.assert_array_equal(
        bare.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_sam_weights_file_restores_the_optimizer_and_variant_state(tmp_path):
    path = os.fspath(tmp_path / "sam.weights.h5")
    kwargs = dict(switching=switching.Periodic(2), looksam_alpha=0.5)
    model = trained(**kwargs)
    model.save_weights(path)
    restored = trained(**kwargs)
    restored.fit(*softmax_data()[:2], batch_size=BATCH, verbose=0)
    restored.load_weights(path)
    assert_same_variables(restored.variables, model.variables)
    assert_same_variables(
        restored.optimizer.variables, model.optimizer.variables
    )
    assert int(restored.optimizer.iterations.numpy()) == 3
    assert any(np.any(v.numpy() != 0) for v in model._looksam_directions)


def test_a_base_weights_file_loads_into_a_sam_model(tmp_path):
    path = os.fspath(tmp_path / "base.weights.h5")
    base = trained().base
    base.save_weights(path)
    model = keras_sam.SAMModel(bn_dropout_model(seed=9))
    model.load_weights(path)
    assert_same_variables(model.base.variables, base.variables)


def test_a_compiled_base_files_optimizer_state_loads_into_a_sam_model(
    tmp_path,
):
    # A run that goes on with SAM from a plain model's weights file: its
    # momentum and step count had been dropped with the base's load.
    x, y, _, _ = softmax_data()
    path = os.fspath(tmp_path / "plain.weights.h5")
    plain = bn_dropout_model(seed=3)
    plain.layers[2].rate = 0.0
    plain.compile(optimizer=sgd(), loss=xent())
    plain.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    plain.save_weights(path)
    base = bn_dropout_model(seed=9)
    base.layers[2].rate = 0.0
    model = keras_sam.SAMModel(base, rho=0.0)
    model.compile(optimizer=sgd(), loss=xent())
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    assert int(model.optimizer.iterations.numpy()) == 3
    for fitted in (plain, model):
        fitted.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert_same_variables(model.base.variables, plain.variables)


def test_a_file_in_the_nested_layout_of_earlier_versions_loads(tmp_path):
    path = os.fspath(tmp_path / "nested.weights.h5")
    model = trained()
    keras.Model.save_weights(model, path)  # Keras' layout: base/...
    restored = keras_sam.SAMModel(bn_dropout_model(seed=9))
    restored.load_weights(path)
    assert_same_variables(restored.base.variables, model.base.variables)
