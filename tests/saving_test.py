"""Serialization, `.keras` files and checkpoint callbacks."""

import json
import os

import keras
import numpy as np
import pytest

import keras_sam
from tests.sam_model_test import BATCH
from tests.sam_model_test import D
from tests.sam_model_test import bn_dropout_model
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import xent

ARGUMENTS = dict(
    rho=0.3, adaptive=True, eta=0.02, sync_perturbations=False, micro_batches=2
)


def compiled_model(dropout=True, **kwargs):
    base = bn_dropout_model()
    if not dropout:
        # Keras does not save seed-generator state in `.keras` files or
        # backups, so a resumed run draws new dropout masks, with or
        # without SAM. Exact-resume tests therefore use no dropout.
        base.layers[2].rate = 0.0
    model = keras_sam.SAMModel(base, **(kwargs or ARGUMENTS))
    model.compile(optimizer=sgd(), loss=xent(), metrics=["accuracy"])
    return model


def test_get_config_holds_every_argument_and_round_trips():
    model = compiled_model()
    config = model.get_config()
    for name, value in ARGUMENTS.items():
        assert config[name] == value, name
    clone = keras_sam.SAMModel.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.base, keras.Sequential)


def test_compile_config_names_public_optimizer_classes():
    model = keras_sam.SAMModel(bn_dropout_model())
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(sgd()), loss=xent()
    )
    config = model.get_compile_config()
    optimizer = config["optimizer"]
    assert optimizer["module"] == "keras.optimizers"
    assert optimizer["config"]["inner_optimizer"]["module"] == (
        "keras.optimizers"
    )
    # As Keras writes them on PyTorch (and earlier versions saved them).
    optimizer["config"]["inner_optimizer"]["module"] = (
        "keras.src.backend.torch.optimizers.torch_sgd"
    )
    clone = keras_sam.SAMModel(bn_dropout_model())
    clone.compile_from_config(config)
    inner = clone.optimizer.inner_optimizer
    assert isinstance(inner, keras.optimizers.SGD)
    assert type(inner) is type(sgd())  # this backend's own class
    assert inner.momentum == sgd().momentum


def test_wrapper_is_built_when_its_base_is():
    assert keras_sam.SAMModel(bn_dropout_model()).built
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    model = keras_sam.SAMModel(unbuilt)
    assert not model.built
    model.build((None, 4))
    assert model.built and unbuilt.built


def test_registered_under_the_keras_sam_package():
    name = keras.saving.get_registered_name(keras_sam.SAMModel)
    assert name == "keras_sam>SAMModel"


def test_keras_file_round_trip_predicts_and_trains_on_identically(tmp_path):
    x, y, _, _ = softmax_data()
    path = os.fspath(tmp_path / "sam.keras")

    uninterrupted = compiled_model(dropout=False)
    uninterrupted.fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )

    model = compiled_model(dropout=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_sam.SAMModel)
    # JSON, because Keras' own build config turns tuples into lists.
    assert json.dumps(loaded.get_config()) == json.dumps(model.get_config())
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert loaded.optimizer.iterations.numpy() == 6
    for want, got in zip(uninterrupted.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("weights_only", [False, True])
def test_model_checkpoint_writes_a_loadable_file(tmp_path, weights_only):
    x, y, _, _ = softmax_data()
    suffix = ".weights.h5" if weights_only else ".keras"
    path = os.fspath(tmp_path / f"ckpt{suffix}")
    model = compiled_model()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(
                path, save_weights_only=weights_only
            )
        ],
    )
    if weights_only:
        restored = compiled_model()
        restored.load_weights(path)
    else:
        restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )


class _StopAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt("simulated preemption")


def test_backup_and_restore_resumes_to_the_uninterrupted_result(tmp_path):
    x, y, _, _ = softmax_data()
    backup = keras.callbacks.BackupAndRestore(os.fspath(tmp_path / "backup"))

    uninterrupted = compiled_model(dropout=False)
    uninterrupted.fit(
        x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0
    )

    model = compiled_model(dropout=False)
    with pytest.raises(KeyboardInterrupt):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[backup, _StopAfterEpoch(1)],
        )
    resumed = compiled_model(dropout=False)
    history = resumed.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[backup],
    )
    assert len(history.epoch) == 1  # only the third epoch was left
    for want, got in zip(uninterrupted.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def fit_epochs(model, epochs, initial_epoch=0, callbacks=()):
    """`model` fitted on `softmax_data`, its batches in order."""
    x, y, _, _ = softmax_data()
    in_order = dict(batch_size=BATCH, shuffle=False, verbose=0)
    model.fit(
        x,
        y,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=list(callbacks),
        **in_order,
    )
    return model


class _DoubleRho(keras.callbacks.Callback):
    """Doubles the model's Variable ρ after each epoch, as a user's ρ rule
    might; listed before the callback that saves, so the file holds it."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.rho.assign(self.model.rho * 2.0)


@pytest.mark.parametrize("path", ["backup", "keras_file", "weights_file"])
def test_a_variable_rho_a_callback_changed_resumes_where_it_was(tmp_path, path):
    # A Variable ρ was neither in a weights file nor in a backup, and a
    # `.keras` file made it a float, so a resumed run went on from the
    # initial ρ (or could not change it again). An optimizer's learning
    # rate, which a callback may change as well, resumes from its value.
    def model():
        return compiled_model(dropout=False, rho=keras.Variable(0.05))

    def fit(model, callbacks=(), initial_epoch=0):
        return fit_epochs(model, 3, initial_epoch, [_DoubleRho(), *callbacks])

    uninterrupted = fit(model())
    file = os.fspath(tmp_path / "ckpt")
    if path == "backup":
        backup = keras.callbacks.BackupAndRestore(file)
        with pytest.raises(KeyboardInterrupt):
            fit(model(), [backup, _StopAfterEpoch(0)])
        resumed = fit(model(), [backup])
    else:
        weights_only = path == "weights_file"
        file += ".weights.h5" if weights_only else ".keras"
        checkpoint = keras.callbacks.ModelCheckpoint(
            file, save_weights_only=weights_only
        )
        with pytest.raises(KeyboardInterrupt):
            fit(model(), [checkpoint, _StopAfterEpoch(0)])
        if weights_only:
            # A model with a number ρ reads the file too, ignoring its ρ.
            compiled_model(dropout=False, rho=0.05).load_weights(file)
            resumed = model()
            resumed.optimizer.build(resumed.trainable_variables)
            resumed.load_weights(file)
        else:
            resumed = keras.saving.load_model(file)
        assert float(resumed.rho.numpy()) == pytest.approx(0.1)
        fit(resumed, initial_epoch=1)
    assert float(resumed.rho.numpy()) == pytest.approx(0.4)
    for want, got in zip(uninterrupted.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_file_whose_state_does_not_load_leaves_a_variable_rho(tmp_path):
    # ρ was assigned before Keras checked the rest of the model's state.
    x, y, _, _ = softmax_data()
    path = os.fspath(tmp_path / "friendly.weights.h5")
    saved = compiled_model(
        dropout=False, rho=keras.Variable(0.5), perturbation="friendly"
    )
    saved.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    saved.save_weights(path)
    model = compiled_model(dropout=False, rho=keras.Variable(0.05))
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="could not be loaded"):
        model.load_weights(path)
    assert float(model.rho.numpy()) == pytest.approx(0.05)


def _frozen_after_build(**options):
    made = compiled_model(dropout=False, **options)
    made.base.layers[0].trainable = False
    made.compile(optimizer=sgd(), loss=xent())
    return made


def _state(model):
    """The model's variant state of the variables it trains now."""
    state = model._friendly_averages or model._looksam_directions
    return [
        v.numpy()
        for v in keras_sam.selection.state_of(
            model.trainable_variables, state, model._state_owners, "state"
        )
    ]


STATEFUL = {
    "friendly": dict(perturbation="friendly"),
    "looksam": dict(
        looksam_alpha=0.7, switching=keras_sam.switching.Periodic(2)
    ),
}


@pytest.mark.parametrize("variant", list(STATEFUL))
def test_a_file_of_a_model_frozen_after_its_build_resumes_by_load_model(
    tmp_path, variant
):
    # The state was made for the variables trainable at the build; the
    # model that `load_model` makes from the config has none for the
    # frozen layer, and takes the saved entries of its own variables.
    uninterrupted = fit_epochs(_frozen_after_build(**STATEFUL[variant]), 2)
    path = os.fspath(tmp_path / "frozen.keras")
    fit_epochs(_frozen_after_build(**STATEFUL[variant]), 1).save(path)
    resumed = keras.saving.load_model(path)
    assert len(_state(resumed)) == 4
    assert np.any(_state(resumed)[0])
    fit_epochs(resumed, 2, initial_epoch=1)
    for want, got in zip(
        uninterrupted.base.get_weights() + _state(uninterrupted),
        resumed.base.get_weights() + _state(resumed),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_variable_without_saved_state_starts_from_zeros(tmp_path):
    # Frozen at the build and trainable in the file: the loaded model makes
    # a state for it, which the file does not hold.
    keras.utils.set_random_seed(0)
    made = compiled_model(dropout=False, perturbation="friendly")
    made.base.layers[0].trainable = False
    fresh = keras_sam.SAMModel(made.base, perturbation="friendly")
    fresh.compile(optimizer=sgd(), loss=xent())
    fit_epochs(fresh, 1)
    made.base.layers[0].trainable = True
    path = os.fspath(tmp_path / "unfrozen.keras")
    fresh.save(path)
    loaded = keras.saving.load_model(path)
    state = _state(loaded)
    assert [s.shape for s in state[:2]] == [(D, 16), (16,)]
    assert not np.any(state[0]) and not np.any(state[1])
    fresh.base.layers[0].trainable = False
    np.testing.assert_array_equal(state[2], _state(fresh)[0])


@pytest.mark.parametrize("variant", list(STATEFUL))
def test_a_file_of_a_quantized_model_loads_with_its_state(tmp_path, variant):
    # Quantizing had removed the float kernels but not their state, and
    # the file failed `load_model` ("expected 4 variables, but received
    # 6"); a plain SAM or Keras model's loads.
    made = fit_epochs(compiled_model(dropout=False, **STATEFUL[variant]), 1)
    made.quantize("int8")
    path = os.fspath(tmp_path / "quantized.keras")
    made.save(path)
    loaded = keras.saving.load_model(path)
    # The biases and BatchNorm's scale and offset train on; their state is
    # the file's.
    assert [s.shape for s in _state(loaded)] == [(16,), (16,), (16,), (3,)]
    for want, got in zip(_state(made), _state(loaded)):
        np.testing.assert_array_equal(got, want)
    assert np.any(_state(loaded)[0])
    x = softmax_data()[0]
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), made.predict(x, verbose=0)
    )


def test_the_earlier_state_owner_record_loads():
    # Files written before the owners' indices were recorded mark them
    # with a 0/1 mask over the base's weights.
    base = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3), keras.layers.Dense(1)]
    )
    owners = base.layers[1].trainable_variables
    entries = {
        str(i): np.full(w.shape, i + 1.0) for i, w in enumerate(base.weights)
    }
    store = dict(entries, state_owners=np.array([1, 1, 1, 1], "int8"))
    loaded = {}
    keras_sam.selection.state_loader(base, owners, loaded.update)(store)
    assert sorted(loaded) == ["0", "1"]
    np.testing.assert_array_equal(loaded["0"], entries["2"])
    np.testing.assert_array_equal(loaded["1"], entries["3"])


def _named_model():
    # Fixed names: PyTorch's `state_dict` keys hold the variables' paths.
    base = keras.Sequential(
        [keras.Input((D,)), keras.layers.Dense(3, name="dense")], name="base"
    )
    model = keras_sam.SAMModel(base, rho=0.05)
    model.compile(optimizer=sgd(), loss=xent())
    return model


def test_a_model_of_a_built_base_records_its_build_as_keras_does(tmp_path):
    # The build had been marked, not made: no input shape recorded, so
    # TensorFlow's SavedModel had no serving signature and PyTorch's
    # `state_dict` lacked the wrapper's parameters until a first step.
    model = _named_model()
    assert model.get_build_config() == {"input_shape": (None, D)}
    x = softmax_data()[0][:BATCH]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.saved_model.save(model, os.fspath(tmp_path / "saved"))
        served = tf.saved_model.load(os.fspath(tmp_path / "saved"))
        outputs = served.signatures["serving_default"](tf.constant(x))
        np.testing.assert_allclose(
            next(iter(outputs.values())).numpy(),
            model.predict(x, verbose=0),
            rtol=1e-6,
        )
    if keras.backend.backend() == "torch":
        fit_epochs(model, 1)
        fresh = _named_model()
        fresh.load_state_dict(model.state_dict())  # strict
        np.testing.assert_array_equal(
            fresh.predict(x, verbose=0), model.predict(x, verbose=0)
        )


VARIANT_STATE = {  # options, and the name of the state's entries
    "looksam": (
        dict(looksam_alpha=0.7, switching=keras_sam.switching.Periodic(2)),
        "looksam_direction",
    ),
    "friendly": (dict(perturbation="friendly"), "friendly_average"),
}


def _variant_model(variant, epochs):
    base = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(3, name="dense"),
        ],
        name="base",
    )
    options = VARIANT_STATE[variant][0]
    model = keras_sam.SAMModel(base, rho=0.05, name="sam", **options)
    model.compile(optimizer=sgd(), loss=xent())
    return fit_epochs(model, epochs)


@pytest.mark.parametrize("variant", sorted(VARIANT_STATE))
def test_each_entry_of_a_variants_state_has_its_own_path(variant):
    # They had shared one path: PyTorch's `state_dict` held one of the
    # four entries (and loaded it into all, silently), and JAX's
    # `get_state_tree` refused the model.
    model = _variant_model(variant, epochs=1)
    name = VARIANT_STATE[variant][1]
    state = [v for v in model.variables if name in v.path]
    assert [v.path for v in state] == [f"sam/{name}_{i}" for i in range(4)]
    assert len({v.path for v in model.variables}) == len(model.variables)

    other = _variant_model(variant, epochs=2)
    if keras.backend.backend() == "torch":
        other.load_state_dict(model.state_dict())  # strict
    elif keras.backend.backend() == "jax":
        other.set_state_tree(model.get_state_tree())
    else:
        other.set_weights(model.get_weights())
    for got, want in zip(other.variables, model.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(got),
            keras.ops.convert_to_numpy(want),
            want.path,
        )


def test_a_file_loads_after_import_keras_sam_with_its_jit_compile(tmp_path):
    # What docs/api.md says about loading a SAMModel file, in fresh
    # processes as a user would load it.
    import subprocess
    import sys

    x, y = softmax_data()[:2]
    model = compiled_model()
    model.compile(optimizer=sgd(), loss=xent(), jit_compile=False)
    model.fit(x[:BATCH], y[:BATCH], verbose=0)
    path = str(tmp_path / "sam.keras")
    model.save(path)
    load = f"import keras; m = keras.saving.load_model({path!r}); "
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())

    def run(code):
        return subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    without = run(load)
    assert without.returncode != 0
    assert "SAMModel" in without.stderr
    loaded = run(
        "import keras_sam; " + load + "print(type(m).__name__, m.jit_compile)"
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split()[-2:] == ["SAMModel", "False"]


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_a_file_saved_before_the_options_module_loads_and_trains():
    # Written by keras_sam at 0825e6a on TensorFlow (before SAMOptions and
    # compat): a BatchNorm model with a ρ schedule, ASAM, a switching
    # policy, LookSAM and a variable selection.
    model = keras.saving.load_model(
        os.path.join(FIXTURES, "sam_model_0825e6a.keras")
    )
    saved = np.load(os.path.join(FIXTURES, "sam_model_0825e6a.npz"))
    assert isinstance(model.rho, keras_sam.schedules.RhoFollowingLearningRate)
    assert model.options.adaptive and model.options.looksam_alpha == 0.7
    assert model.switching.every == 3
    assert model.perturbed_variables == ["dense"]
    np.testing.assert_allclose(
        model.predict(saved["x"], verbose=0),
        saved["prediction"],
        rtol=1e-5,
        atol=1e-6,
    )
    history = model.fit(saved["x"], saved["y"], batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
