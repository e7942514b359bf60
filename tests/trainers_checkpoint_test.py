"""The trainers' checkpoint: keyed by variable path, refusing mismatches."""

import errno
import os
import re
import shutil

import keras
import numpy as np
import pytest

from keras_sam import backend
from tests import backends
from tests import trainers_run_test
from trainers import checkpoint
from trainers import fashion_mnist
from trainers import models
from trainers.models import simple

# Every backend: the checkpoint is NumPy and Keras, and on PyTorch it also
# holds the generators that Keras' unseeded `Dropout` draws from.
on_torch = pytest.mark.skipif(
    backends.BACKEND != "torch", reason="PyTorch's global generators"
)


def _compiled(hidden=3, names=("a", "b")):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(hidden, name=names[0]),
            keras.layers.Dense(2, name=names[1]),
        ],
        name="net",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1, 0.9, name="sgd"))
    model.optimizer.build(model.trainable_variables)
    return model


def test_checkpoint_is_keyed_by_variable_path_and_restores_every_value(
    tmp_path,
):
    path = str(tmp_path / checkpoint.CHECKPOINT)
    model = _compiled()
    rng = np.random.default_rng(0)
    for variable in checkpoint.state_paths(model).values():
        variable.assign(10 * rng.random(variable.shape) + 1)
    want = {k: v.numpy() for k, v in checkpoint.state_paths(model).items()}
    checkpoint.save(path, model, step=7)
    with np.load(path) as saved:
        keys = {f for f in saved.files if f.startswith("variables/")}
    assert "variables/net/a/kernel" in keys
    # Weights and momenta, the iteration counter and the learning rate.
    assert len(keys) == len(want) == 4 + 4 + 2

    restored = _compiled()
    assert checkpoint.restore(path, restored) == 7
    for key, variable in checkpoint.state_paths(restored).items():
        np.testing.assert_array_equal(variable.numpy(), want[key])


@pytest.mark.parametrize("bad", ["loss", "weight"])
def test_a_step_with_a_non_finite_loss_or_weight_is_never_saved(tmp_path, bad):
    # A step whose loss overflowed but whose update was skipped (a loss
    # scale's) keeps finite weights: the loss alone tells it.
    path = str(tmp_path / checkpoint.CHECKPOINT)
    model = _compiled()
    saver = checkpoint.AtomicCheckpoint(path, every=1, start_step=0)
    saver.set_model(model)
    saver.set_params({"steps": 4})
    saver.on_train_begin()
    kernel = model.layers[0].kernel
    if bad == "weight":
        kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    saver.on_train_batch_end(0, {"loss": np.nan if bad == "loss" else 1.0})
    assert not os.path.exists(path)
    kernel.assign(np.ones(kernel.shape, "float32"))
    saver.on_train_batch_end(1, {"loss": 1.0})
    assert checkpoint.read(path).step == 2


def test_checkpoint_mismatches_are_listed_and_nothing_is_assigned(tmp_path):
    path = str(tmp_path / checkpoint.CHECKPOINT)
    checkpoint.save(path, _compiled(), step=1)
    # Same number of variables, same shapes: restoring by position would
    # have succeeded silently.
    renamed = _compiled(names=("c", "b"))
    before = [v.numpy() for v in checkpoint.state_paths(renamed).values()]
    with pytest.raises(ValueError, match="another model") as error:
        checkpoint.restore(path, renamed)
    assert "missing net/c/kernel" in str(error.value)
    assert "unexpected net/a/kernel" in str(error.value)
    for variable, value in zip(
        checkpoint.state_paths(renamed).values(), before
    ):
        np.testing.assert_array_equal(variable.numpy(), value)
    with pytest.raises(ValueError, match="another model") as error:
        checkpoint.restore(path, _compiled(hidden=5))
    assert (
        "net/a/kernel has shape (4, 3) in the checkpoint and (4, 5) in the "
        "model"
    ) in str(error.value)


def test_repeated_variable_paths_get_distinct_keys():
    model = _compiled()
    model.extra = [keras.Variable(float(i), name="state") for i in range(3)]
    keys = list(checkpoint.state_paths(model))
    assert (
        len(set(keys)) == len(keys) == len(checkpoint._state_variables(model))
    )
    assert {"state", "state#1", "state#2"} <= set(keys)


def test_a_users_variable_named_as_a_variants_state_keeps_its_key(tmp_path):
    # The renaming of checkpoints from before the variant state had a path
    # per entry applies to keys the model lacks, not to a user's own.
    class Averaged(keras.layers.Layer):
        def build(self, input_shape):
            self.average = self.add_weight(
                shape=(2,), initializer="ones", name="friendly_average"
            )

        def call(self, x):
            return x * self.average

    def model():
        net = keras.Sequential(
            [keras.Input((2,)), Averaged(name="avg")], name="net"
        )
        net.compile(optimizer=keras.optimizers.SGD(0.1, name="sgd"))
        net.optimizer.build(net.trainable_variables)
        return net

    path = str(tmp_path / checkpoint.CHECKPOINT)
    saved = model()
    saved.layers[0].average.assign([2.0, 3.0])
    checkpoint.save(path, saved, step=1)
    restored = model()
    assert checkpoint.restore(path, restored) == 1
    np.testing.assert_array_equal(restored.layers[0].average.numpy(), [2, 3])


def test_a_checkpoint_without_settings_or_checksum_still_restores(tmp_path):
    # As checkpoints were written before they held either.
    path = str(tmp_path / checkpoint.CHECKPOINT)
    model = _compiled()
    arrays = {
        "variables/" + k: v.numpy() + 1
        for k, v in checkpoint.state_paths(model).items()
    }
    np.savez(path, step=np.int64(5), history=np.array("{}"), **arrays)
    saved = checkpoint.read(path)
    assert saved.settings is None and saved.step == 5
    assert checkpoint.restore(saved, model) == 5
    for key, variable in checkpoint.state_paths(model).items():
        np.testing.assert_array_equal(
            variable.numpy(), arrays["variables/" + key]
        )


def test_a_changed_value_fails_the_checksum(tmp_path):
    path = str(tmp_path / checkpoint.CHECKPOINT)
    checkpoint.save(path, _compiled(), step=2, settings={"rho": 0.05})
    assert checkpoint.read(path).settings == {"rho": 0.05}
    # Rewritten whole (the zip's own CRCs agree), one value changed.
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["step"] = np.int64(3)
    np.savez(path, **arrays)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.read(path)
    assert str(error.value) == (
        f"Checkpoint {path} is corrupt: its contents do not match the "
        "checksum written with them"
    )


def test_each_save_keeps_the_checkpoint_before(tmp_path):
    path = str(tmp_path / checkpoint.CHECKPOINT)
    model = _compiled()
    assert checkpoint.find(path) is None
    for step in (1, 2, 3):
        checkpoint.save(path, model, step=step)
    assert sorted(os.listdir(tmp_path)) == [
        checkpoint.CHECKPOINT,
        checkpoint.CHECKPOINT + checkpoint.PREVIOUS,
    ]
    assert checkpoint.read(path).step == 3
    assert checkpoint.read(path + checkpoint.PREVIOUS).step == 2
    # Killed between the two renames: only the one before is left.
    os.remove(path)
    assert checkpoint.find(path).step == 2


def test_a_checkpoint_keyed_by_position_is_refused(tmp_path):
    path = str(tmp_path / checkpoint.CHECKPOINT)
    model = _compiled()
    by_position = {f"v{i}": v.numpy() for i, v in enumerate(model.variables)}
    np.savez(path, step=np.int64(3), **by_position)
    with pytest.raises(ValueError, match="by position"):
        checkpoint.restore(path, model)


def test_a_directory_lock_admits_one_holder_at_a_time(
    tmp_path, monkeypatch, capsys
):
    path = str(tmp_path / ".training.lock")
    with checkpoint.DirectoryLock(path):
        with pytest.raises(checkpoint.DirectoryInUseError) as error:
            checkpoint.DirectoryLock(path)
        assert str(error.value) == (
            f"Another process (pid {os.getpid()}) is training in {tmp_path} "
            f"(it holds {path}). Wait for it to end, or use another "
            "--output_dir."
        )
    checkpoint.DirectoryLock(path).release()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    checkpoint.DirectoryLock(path).release()
    assert "cannot lock files (No locks available)" in capsys.readouterr().err


def _random_leaves():
    return [
        np.asarray(leaf)
        for leaf in keras.tree.flatten(backend.random_state())
        if leaf is not None
    ]


def _draw():
    # What an unseeded Dropout draws on PyTorch (its global generator);
    # elsewhere no global state is drawn from.
    if backends.BACKEND == "torch":
        import torch

        return torch.rand(3).numpy()
    return None


def test_the_backends_random_state_is_saved_and_restored(tmp_path):
    path = str(tmp_path / checkpoint.CHECKPOINT)
    model = _compiled()
    checkpoint.save(path, model, step=1)
    want, drawn = _random_leaves(), _draw()
    _draw()
    checkpoint.restore(path, model)
    for got, expected in zip(_random_leaves(), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(_draw(), drawn)
    with np.load(path) as saved:
        keys = {k for k in saved.files if k.startswith("random_state/")}
    assert len(keys) == len(want) and bool(want) == (
        backends.BACKEND == "torch"
    )


@on_torch
def test_a_checkpoint_of_the_torch_generator_alone_still_restores(tmp_path):
    # As checkpoints of PyTorch runs were written before they held the
    # leaves of `keras_sam.backend.random_state()`.
    import torch

    path = str(tmp_path / checkpoint.CHECKPOINT)
    model = _compiled()
    arrays = {
        "variables/" + k: v.numpy()
        for k, v in checkpoint.state_paths(model).items()
    }
    generator = torch.get_rng_state()
    want = torch.rand(3).numpy()
    np.savez(
        path,
        step=np.int64(2),
        torch_random_state=generator.numpy(),
        **arrays,
    )
    torch.rand(5)
    assert checkpoint.restore(path, model) == 2
    np.testing.assert_array_equal(torch.rand(3).numpy(), want)


@on_torch
def test_the_random_stream_leaves_out_draws_between_batches():
    # A data loader drawing between two batches does not move the stream
    # the batches draw from: they draw what two batches in a row draw.
    keras.utils.set_random_seed(3)
    want = [_draw(), _draw()]
    keras.utils.set_random_seed(3)
    stream = checkpoint.RandomStream()
    got = []
    for _ in range(2):
        stream.on_train_batch_begin(0)
        got.append(_draw())
        stream.on_train_batch_end(0)
        _draw()  # the loader's
    np.testing.assert_array_equal(np.stack(got), np.stack(want))


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _finish_old_run(tmp_path, monkeypatch, fixture, **settings):
    """Resumes the fixture run `<fixture>_step_3.npz` with today's trainer
    (settings as the old run's) to step 6; returns the checkpoint it wrote
    and the old uninterrupted run's (`<fixture>_step_6.npz`), opened."""
    monkeypatch.setitem(
        models.MODELS,
        "mlp",
        lambda shape, classes, wd=0.0: simple.mlp(shape, classes, wd, 4),
    )
    shutil.copy(
        os.path.join(FIXTURES, f"{fixture}_step_3.npz"),
        tmp_path / checkpoint.CHECKPOINT,
    )
    results = fashion_mnist.run(
        trainers_run_test.make_flags(
            tmp_path,
            model="mlp",
            train_steps=6,
            checkpoint_every_steps=3,
            deterministic=True,
            rho=0.1,
            learning_rate=0.02,
            **settings,
        )
    )
    assert results["resumed_from_step"] == 3
    assert results["train_steps"] == 6
    return (
        np.load(tmp_path / checkpoint.CHECKPOINT),
        np.load(os.path.join(FIXTURES, f"{fixture}_step_6.npz")),
    )


def assert_resumed(got, want, key):
    # The fixture's steps ran on another machine's CPU, whose TensorFlow
    # kernels may round differently: bitwise only where it was written.
    # On an AMD EPYC, weights differed by an ulp and LookSAM's direction
    # (a difference of gradients) by up to 1.5e-8, 6e-6 of its value. A
    # resume that lost or misplaced state differs by the values' size.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=key)


@backends.tensorflow_only
def test_a_checkpoint_written_before_the_options_module_resumes(
    tmp_path, monkeypatch
):
    # Written by the Fashion-MNIST trainer at 0825e6a on TensorFlow
    # (before SAMOptions, compat and the flags derived from them), with
    # the MLP narrowed to 4 units to keep the files small: a 6-step run
    # with --rho=0.1 --learning_rate=0.02 --batch_size=16 --synthetic_data
    # --checkpoint_every_steps=3 --deterministic, cut after step 3
    # (`step_3`) and uninterrupted (`step_6`). Today's trainer accepts the
    # old run's settings and finishes it where the old one ended.
    got, want = _finish_old_run(tmp_path, monkeypatch, "trainer_0825e6a")
    with got, want:
        variables = [k for k in want.files if k.startswith("variables/")]
        assert len(variables) == 13
        for key in variables:
            assert_resumed(got[key], want[key], key)


@backends.tensorflow_only
def test_a_looksam_checkpoint_of_shared_state_paths_resumes(
    tmp_path, monkeypatch
):
    # Written by the Fashion-MNIST trainer at d589cae on TensorFlow, when
    # LookSAM's directions shared one path (keyed `looksam_direction`,
    # `looksam_direction#1`, ...), as the test above with
    # --looksam_alpha=0.7 --switching=periodic --sam_every=2 (`step_3` is
    # the checkpoint the step-6 one replaced). Today's entries have a name
    # each (`looksam_direction_0`, ...); the run ends where the old one did.
    got, want = _finish_old_run(
        tmp_path,
        monkeypatch,
        "trainer_looksam_d589cae",
        looksam_alpha=0.7,
        switching="periodic",
        sam_every=2,
    )
    old = re.compile(r"(.*looksam_direction)(?:#(\d))?")
    with got, want:
        variables = [k for k in want.files if k.startswith("variables/")]
        directions = [k for k in variables if old.fullmatch(k)]
        assert len(directions) == 6
        for key in variables:
            match = old.fullmatch(key)
            new = key if match is None else f"{match[1]}_{match[2] or 0}"
            assert_resumed(got[new], want[key], key)
