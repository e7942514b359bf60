"""The trainers end to end: smoke runs, strategies, resumption, bad flags."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
from absl import flags

import keras_sam
from tests import backends
from tests.distribute_test import mirrored
from trainers import checkpoint
from trainers import compare_sgd_sam
from trainers import config as trainer_config
from trainers import fashion_mnist
from trainers import flags as trainer_flags
from trainers import loop
from trainers.data import datasets as data_lib

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_flags(output_dir, **overrides):
    """Parsed default flags of the Fashion-MNIST trainer, with overrides."""
    if "rho" not in flags.FLAGS:
        fashion_mnist.define_flags()
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])
    values = flags.FLAGS.flag_values_dict()
    values.update(
        synthetic_data=True,
        batch_size=16,
        train_steps=2,
        verbose=0,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_two_synthetic_steps_write_results(tmp_path):
    results = fashion_mnist.run(make_flags(tmp_path))
    assert results["train_steps"] == 2
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    for key in ("test_accuracy", "test_loss", "train_steps", "flags"):
        assert key in saved
    assert saved["flags"]["rho"] == 0.05
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert os.path.exists(tmp_path / checkpoint.CHECKPOINT)
    assert os.listdir(tmp_path / "tensorboard")
    assert os.path.exists(tmp_path / loop.MODEL)


def test_two_synthetic_steps_under_mirrored_strategy(tmp_path):
    results = fashion_mnist.run(
        make_flags(tmp_path, jit_compile="false"), strategy_override=mirrored()
    )
    assert results["train_steps"] == 2 and results["replicas"] == 2
    assert np.isfinite(results["test_loss"])


def whole_and_resumed(
    monkeypatch, tmp_path, step, hook="on_train_batch_end", **settings
):
    """Results of an uninterrupted run and of one killed after `step`,
    then started again."""
    whole = fashion_mnist.run(make_flags(tmp_path / "whole", **settings))
    run_killed_after_step(
        monkeypatch,
        step,
        fashion_mnist.run,
        make_flags(tmp_path / "cut", **settings),
        hook,
    )
    resumed = fashion_mnist.run(make_flags(tmp_path / "cut", **settings))
    assert resumed["resumed_from_step"] == step
    return whole, resumed


def run_killed_after_step(
    monkeypatch, step, run, flags_obj, hook="on_train_batch_end"
):
    """Runs `run(flags_obj)`, interrupted right after the checkpoint
    callback's `hook` has handled `step`, as a kill would interrupt it."""
    original = getattr(checkpoint.AtomicCheckpoint, hook)

    def crash(self, *args, **kwargs):  # ([batch or epoch], logs)
        original(self, *args, **kwargs)
        if self.step == step:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(checkpoint.AtomicCheckpoint, hook, crash)
    with pytest.raises(KeyboardInterrupt):
        run(flags_obj)
    monkeypatch.undo()


RESUMED_SETTINGS = {
    "sam": dict(),
    "cutout": dict(augmentation="cutout"),
    # Variants whose state carries across steps: LookSAM's stored direction
    # (SAM on steps 0 and 3, so step 5 reuses a direction saved before the
    # kill) and AE-SAM's gradient-norm statistics.
    "looksam": dict(switching="periodic", sam_every=3, looksam_alpha=0.7),
    "ae_sam": dict(switching="ae_sam"),
    # The loss-scale optimizer skips the first steps (overflows at its
    # initial scale) and does not count them.
    "float16": dict(model="small_cnn", mixed_precision="float16"),
}


@pytest.mark.parametrize("variant", RESUMED_SETTINGS)
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, variant
):
    settings = dict(
        train_steps=6,
        checkpoint_every_steps=2,
        deterministic=True,
        rho=0.1,
        **RESUMED_SETTINGS[variant],
    )
    whole, resumed = whole_and_resumed(monkeypatch, tmp_path, 4, **settings)
    assert resumed["train_steps"] == 6
    np.testing.assert_allclose(
        resumed["test_loss"], whole["test_loss"], rtol=1e-6
    )


def test_variant_flags_build_the_documented_sam_model(tmp_path):
    results = fashion_mnist.run(
        make_flags(
            tmp_path,
            rho_min=0.01,
            gsam_alpha=0.2,
            perturbed_variables="normalization",
            switching="periodic",
            sam_every=2,
            looksam_alpha=0.5,
        )
    )
    assert results["train_steps"] == 2 and np.isfinite(results["test_loss"])
    config = trainer_config.TrainingConfig.from_flags(
        make_flags(
            tmp_path,
            perturbed_variables="kernel,bias",
            switching="randomized",
            sam_probability=0.25,
            seed=4,
        )
    )
    made = trainer_flags.sam_options(config.sam, config.seed)
    assert made.perturbed_variables == ["kernel", "bias"]
    assert made.switching.probability == 0.25 and made.switching.seed == 4
    made = trainer_flags.sam_options(
        trainer_config.TrainingConfig.from_flags(
            make_flags(tmp_path, switching="ae_sam")
        ).sam
    )
    assert isinstance(made.switching, keras_sam.switching.GradientNormOutlier)


@pytest.mark.parametrize(
    "every, hook, step",
    # Two steps an epoch: killed after the epoch's checkpoint, or after one
    # within an epoch, whose next `fit` begins from the average's weights
    # unless they are put back.
    [(2, "on_epoch_end", 4), (3, "on_train_batch_end", 3)],
)
def test_a_run_killed_at_an_epochs_end_resumes_with_an_ema(
    tmp_path, monkeypatch, every, hook, step
):
    # Keras' `fit` ends by writing the average into the weights, which the
    # next epoch must not train from: the checkpoint holds the raw ones.
    settings = dict(
        train_steps=6,
        checkpoint_every_steps=every,
        deterministic=True,
        ema_decay=0.9,
        train_examples=32,
    )
    whole, resumed = whole_and_resumed(
        monkeypatch, tmp_path, step, hook=hook, **settings
    )
    np.testing.assert_allclose(
        resumed["history"]["loss"], whole["history"]["loss"], rtol=1e-6
    )
    np.testing.assert_allclose(
        resumed["test_loss"], whole["test_loss"], rtol=1e-6
    )


def test_the_weights_average_is_evaluated_but_never_trained_on(tmp_path):
    runs = [
        fashion_mnist.run(
            make_flags(
                tmp_path / str(decay),
                ema_decay=decay,
                train_examples=64,
                train_steps=0,
                epochs=3,
                deterministic=True,
            )
        )
        for decay in (0.0, 0.9)
    ]
    np.testing.assert_allclose(
        runs[0]["history"]["loss"], runs[1]["history"]["loss"], rtol=1e-6
    )
    assert abs(runs[0]["test_loss"] - runs[1]["test_loss"]) > 1e-3


def test_the_final_validation_figures_are_of_the_averaged_weights(
    tmp_path, monkeypatch
):
    # They had been the last epoch's, of the raw weights, while the test
    # accuracy and model.keras were of the average.
    measured = {}
    original = loop.ExampleSetAccuracy.__init__

    def recording(self, model, example_sets):
        measured.update(base=model, sets=example_sets)
        original(self, model, example_sets)

    monkeypatch.setattr(loop.ExampleSetAccuracy, "__init__", recording)
    results = fashion_mnist.run(
        make_flags(
            tmp_path,
            ema_decay=0.9,
            train_examples=256,
            validation_examples=256,
            label_noise=0.4,
            track_memorization=True,
            train_steps=0,
            epochs=2,
            deterministic=True,
        )
    )
    for key, measure in measured["sets"].items():
        assert results[key] == float(measure(measured["base"])), key
    assert any(
        results[key] != results["history"][key][-1] for key in measured["sets"]
    )


def test_a_float16_run_counts_the_steps_its_loss_scale_skipped(tmp_path):
    # The run's step had been the optimizer's counter: results said 1
    # step of 4, and every run of the command again trained more.
    settings = dict(model="small_cnn", mixed_precision="float16", train_steps=4)
    first = fashion_mnist.run(make_flags(tmp_path, **settings))
    saved = np.load(tmp_path / checkpoint.CHECKPOINT)
    assert int(saved["variables/sgd/iteration"]) < 4 == int(saved["step"])
    assert first["train_steps"] == 4
    again = fashion_mnist.run(make_flags(tmp_path, **settings))
    assert again["resumed_from_step"] == 4
    assert again["history"] == first["history"]
    assert again["test_loss"] == first["test_loss"]


def test_rerunning_a_finished_run_trains_no_more(tmp_path):
    first = fashion_mnist.run(make_flags(tmp_path))
    again = fashion_mnist.run(make_flags(tmp_path))
    assert again["resumed_from_step"] == 2 and again["train_steps"] == 2
    assert again["test_loss"] == first["test_loss"]


# Two steps an epoch.
EPOCHS = dict(train_examples=32, batch_size=16, deterministic=True)


def test_the_test_set_is_evaluated_every_eval_every_epochs(tmp_path):
    # Four epochs of two steps; evaluated after the second and the fourth,
    # and once more, for the results, at the end.
    settings = dict(train_steps=8, eval_every_epochs=2, **EPOCHS)
    results = fashion_mnist.run(make_flags(tmp_path, **settings))
    assert len(results["history"]["loss"]) == 4
    assert len(results["history"]["val_loss"]) == 2
    assert results["history"]["val_loss"][-1] == pytest.approx(
        results["test_loss"], rel=1e-6
    )


def test_a_finished_run_started_again_says_so_and_keeps_its_history(
    tmp_path, capsys
):
    first = fashion_mnist.run(make_flags(tmp_path, train_steps=4, **EPOCHS))
    assert len(first["history"]["loss"]) == 2
    assert len(first["history"]["val_loss"]) == 2
    capsys.readouterr()
    again = fashion_mnist.run(make_flags(tmp_path, train_steps=4, **EPOCHS))
    printed = capsys.readouterr().out
    assert "has finished: 4 steps trained, 4 asked for" in printed
    assert "Resuming" not in printed
    assert again["history"] == first["history"]
    with open(tmp_path / loop.RESULTS) as f:
        assert json.load(f)["history"] == first["history"]


def test_a_resumed_run_logs_every_epoch_as_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    settings = dict(train_steps=6, checkpoint_every_steps=1, **EPOCHS)
    whole, resumed = whole_and_resumed(monkeypatch, tmp_path, 3, **settings)
    for key in ("loss", "accuracy", "sharpness", "grad_norm", "val_loss"):
        got, want = resumed["history"][key], whole["history"][key]
        assert len(got) == len(want) == 3
        # Epoch 1 was cut in two, and its running means carried across.
        assert got == want, key


def test_checkpoints_are_as_rare_as_asked(tmp_path):
    # Every `fit` (an epoch) had ended with one.
    settings = dict(train_steps=6, checkpoint_every_steps=4, **EPOCHS)
    saves = []
    original = checkpoint.save

    def counting_save(path, model, step, *args, **kwargs):
        saves.append(step)
        return original(path, model, step, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save", counting_save)
        fashion_mnist.run(make_flags(tmp_path, **settings))
    assert saves == [4, 6]


def test_results_record_the_trainer_flags_only(tmp_path):
    assert "logtostderr" in flags.FLAGS and "run_with_pdb" in flags.FLAGS
    fashion_mnist.run(make_flags(tmp_path))
    with open(tmp_path / loop.RESULTS) as f:
        recorded = json.load(f)["flags"]
    declared = {
        flag.name
        for flag in flags.FLAGS.flags_by_module_dict()["trainers.flags"]
    }
    assert set(recorded) == declared


def test_checkpoint_of_another_model_is_refused(tmp_path):
    fashion_mnist.run(make_flags(tmp_path))
    with pytest.raises(
        ValueError,
        match="another run .*--model=small_cnn there, --model=resnet20 now",
    ):
        fashion_mnist.run(make_flags(tmp_path, model="resnet20"))


def test_compare_table_and_summary_state_the_numbers():
    def fake(rho, acc, flipped, sharpness, cpu):
        return dict(
            flags=dict(rho=rho, unread=1),
            test_accuracy=acc,
            train_accuracy_flipped=flipped,
            train_accuracy_unflipped=0.99,
            sharpness=sharpness,
            train_wall_seconds=60.0,
            train_cpu_seconds=cpu,
            history=dict(loss=[0.0] * 60),
            test_loss=1.0,
        )

    results = {
        "SGD": fake(0.05, 0.70, 0.8, 40.0, 30.0),
        "SAM": fake(0.1, 0.78, 0.3, 10.0, 45.0),
    }
    compared = compare_sgd_sam.comparison(results, 0.4)
    assert set(compared["SAM"]) == {*compare_sgd_sam.REPORTED, "epochs", "rho"}
    table = compare_sgd_sam.format_table(compared)
    assert table.startswith("Fashion-MNIST, 40% of the training labels")
    assert "MLP, 60 epochs:" in table
    assert "| test accuracy (clean test set) | 70.00% | 78.00% |" in table
    assert "| SGD | SAM (ρ = 0.1) |" in table
    assert "(memorized) | 80.0% | 30.0% |" in table
    assert "| 40.0 | 10.0 |" in table
    assert "| 1.00 | 1.00 |" in table and "| 0.50 | 0.75 |" in table
    summary = compare_sgd_sam.summary(compared)
    assert summary.startswith("SAM ends 8.0 points above SGD")
    assert "80%" in summary and "4.0x as sharp" in summary
    compared["SAM"]["test_accuracy"] = 0.65
    assert "5.0 points below" in compare_sgd_sam.summary(compared)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--rho=-1", "--rho must be >= 0"),
        ("--strategy=gpu_pod", "value should be one of"),
        ("--label_noise=1.5", "--label_noise must lie in [0, 1]"),
        ("--learning_rate=inf", "--learning_rate must be > 0 and finite"),
    ],
)
def test_bad_flag_values_fail_with_a_message_naming_them(flag, message):
    assert_refused("trainers.fashion_mnist", flag, message)


def assert_refused(program, flag, message, *other_flags):
    """`python -m program *other_flags flag` fails, naming the flag, with
    `message`."""
    result = subprocess.run(
        [sys.executable, "-m", program, *other_flags, flag],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert flag.split("=")[0] in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        # An even grid holds no α = 0: its middle "loss at w" was not.
        ("--landscape_points=4", "--landscape_points must be odd and >= 3"),
        ("--landscape_radius=nan", "--landscape_radius must be > 0"),
        ("--num_examples=-5", "-5 is not a positive integer"),
        ("--checkpoint=/nowhere.keras", "--checkpoint: no model file at"),
        # Keras' "File format not supported" had come as a traceback.
        ("--checkpoint=README.md", "--checkpoint must be a .keras model"),
    ],
)
def test_analyze_refuses_bad_flags_before_measuring(flag, message, tmp_path):
    assert_refused(
        "trainers.analyze",
        flag,
        message,
        "--checkpoint=/nowhere.keras",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert not (tmp_path / "out").exists()


def test_compare_refuses_measuring_sharpness_on_no_examples():
    assert_refused(
        "trainers.compare_sgd_sam",
        "--sharpness_examples=0",
        "0 is not a positive integer",
    )


def analyze_flags(tmp_path, **overrides):
    """trainers.analyze's flags for a quick run on synthetic data."""
    values = dict(
        compare=None,
        dataset="fashion_mnist",
        data_dir=None,
        synthetic_data=True,
        run_data=False,
        output_dir=str(tmp_path / "analysis"),
        num_examples=64,
        batch_size=32,
        top_k=1,
        max_iterations=2,
        rho=0.05,
        m=16,
        landscape_points=3,
        landscape_radius=0.5,
        spectrum_steps=0,
    )
    return types.SimpleNamespace(**dict(values, **overrides))


def test_analyze_refuses_a_url_output_dir_before_writing(tmp_path, monkeypatch):
    from trainers import analyze

    model_file = tmp_path / "model.keras"  # not read: refused before
    model_file.write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # where a relative folder "gs:" would go
    flags_obj = analyze_flags(
        tmp_path, checkpoint=str(model_file), output_dir="gs://bucket/out"
    )
    with pytest.raises(ValueError, match="--output_dir must be a local"):
        analyze.run(flags_obj)
    assert os.listdir(tmp_path) == ["model.keras"]


def test_analyze_compares_two_trained_models(tmp_path):
    from trainers import analyze

    for rho in (0.0, 0.05):
        fashion_mnist.run(make_flags(tmp_path / f"rho{rho}", rho=rho))
    written = analyze.run(
        analyze_flags(
            tmp_path,
            checkpoint=str(tmp_path / "rho0.0" / loop.MODEL),
            compare=str(tmp_path / "rho0.05" / loop.MODEL),
            top_k=2,
            max_iterations=6,
            spectrum_steps=4,
        )
    )
    results = written["models"]
    assert set(results) == {"rho0.0", "rho0.05"}
    assert written["settings"]["labels"] == "true"
    assert written["settings"]["examples"] == 64
    assert written["settings"]["m"] == 16
    for r in results.values():
        assert len(r["top_eigenvalues"]) == 2
        assert r["top_eigenvalues"][0] >= r["top_eigenvalues"][1]
        assert np.isfinite(r["m_sharpness"])
        assert np.array(r["landscape_2d"]).shape == (3, 3)
    for name in (
        "analysis.json",
        "landscape_1d.png",
        "landscape_2d.png",
        "spectrum.png",
    ):
        assert (tmp_path / "analysis" / name).stat().st_size > 0


def test_analyze_measures_on_the_labels_the_run_trained_on(tmp_path):
    from trainers import analyze

    trained = fashion_mnist.run(
        make_flags(tmp_path / "run", label_noise=0.5, train_examples=128)
    )
    # The run's own data: synthetic, as its results.json records.
    options = analyze_flags(
        tmp_path,
        checkpoint=str(tmp_path / "run" / loop.MODEL),
        run_data=True,
        synthetic_data=False,
    )
    written = analyze.run(options)
    measured = written["models"]["run"]
    assert written["settings"]["labels"] == "the run's"
    assert measured["test_accuracy"] == pytest.approx(
        trained["test_accuracy"], abs=1e-6
    )
    # The loss at w from the run's own recipe: its first 128 examples, half
    # their labels replaced with the run's seed, the first 64 measured.
    train, _, info = data_lib.load("fashion_mnist", None, True)
    noisy, _ = data_lib.add_label_noise(
        train.labels[:128], 0.5, info.num_classes, 0
    )
    assert np.mean(noisy[:64] != train.labels[:64]) > 0.3
    model = analyze.load_model(options.checkpoint)
    logits = model.predict(train.images[:64] / 255.0, verbose=0)

    def loss(labels):
        return float(
            np.mean(
                keras.losses.sparse_categorical_crossentropy(
                    labels[:64], logits, from_logits=True
                )
            )
        )

    assert measured["loss"] == pytest.approx(loss(noisy), rel=1e-5)
    assert abs(loss(noisy) - loss(train.labels)) > 1e-3
    lone = tmp_path / "lone" / loop.MODEL  # a model without its run
    lone.parent.mkdir()
    shutil.copy(options.checkpoint, lone)
    with pytest.raises(FileNotFoundError, match="--run_data: no results"):
        analyze.run(
            types.SimpleNamespace(**dict(vars(options), checkpoint=str(lone)))
        )


def test_analyze_run_data_is_of_the_data_set_the_run_trained_on(tmp_path):
    # It had loaded --dataset's (Fashion-MNIST's by default) for the run's
    # recipe, and failed on the model's input shape.
    from trainers import analyze
    from trainers import cifar

    trained = cifar.run(
        make_flags(tmp_path / "run", model="mlp", dataset="cifar10")
    )
    options = analyze_flags(  # a --data_dir a synthetic run did not read
        tmp_path,
        checkpoint=str(tmp_path / "run" / loop.MODEL),
        run_data=True,
        data_dir=str(tmp_path),
    )
    measured = analyze.run(options)["models"]["run"]
    assert measured["test_accuracy"] == pytest.approx(
        trained["test_accuracy"], abs=1e-6
    )


@pytest.mark.skipif(
    not os.path.isdir(data_lib.DEBIAN_FASHION_MNIST),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_analyze_run_data_reads_moved_data_from_the_data_dir_given(tmp_path):
    # The run records where its data was; --data_dir says where it is now.
    from trainers import analyze

    moved = tmp_path / "data"
    moved.mkdir()
    for name in os.listdir(data_lib.DEBIAN_FASHION_MNIST):
        os.symlink(
            os.path.join(data_lib.DEBIAN_FASHION_MNIST, name), moved / name
        )
    trained = fashion_mnist.run(
        make_flags(
            tmp_path / "run",
            synthetic_data=False,
            data_dir=str(moved),
            train_examples=64,
        )
    )
    shutil.rmtree(moved)
    options = analyze_flags(
        tmp_path,
        checkpoint=str(tmp_path / "run" / loop.MODEL),
        run_data=True,
        synthetic_data=False,
        data_dir=data_lib.DEBIAN_FASHION_MNIST,
    )
    measured = analyze.run(options)["models"]["run"]
    assert measured["test_accuracy"] == pytest.approx(
        trained["test_accuracy"], abs=1e-6
    )
    with pytest.raises(FileNotFoundError, match=re.escape(str(moved))):
        analyze.run(types.SimpleNamespace(**dict(vars(options), data_dir=None)))


def test_analyze_names_models_of_same_named_folders_apart():
    # Both had been "sam": the second replaced the first.
    from trainers import analyze

    def names(checkpoint, compare):
        paths = dict(checkpoint=checkpoint, compare=compare)
        return list(analyze._model_names(paths))

    assert names("r/sgd/m.keras", "r/sam/m.keras") == ["sgd", "sam"]
    assert names("a/sam/m.keras", "b/sam/m.keras") == ["a/sam", "b/sam"]
    assert names("r/m.keras", "r/m.keras") == ["checkpoint", "compare"]


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
@pytest.mark.parametrize(
    "module, dataset", [("cifar", "cifar100"), ("svhn", "svhn")]
)
def test_tfds_trainers_run_two_steps_on_mock_data(
    tmp_path, module, dataset, strategy
):
    import importlib

    import tensorflow_datasets as tfds

    trainer = importlib.import_module(f"trainers.{module}")
    options = make_flags(
        tmp_path / "out",
        synthetic_data=False,
        data_dir=str(tmp_path),
        model="resnet20",
        augmentation="basic",
        dataset=dataset,
        jit_compile="false",
    )
    with tfds.testing.mock_data(num_examples=48):
        results = trainer.run(
            options,
            strategy_override=mirrored() if strategy == "mirrored" else None,
        )
    assert results["dataset"] == dataset
    assert results["train_steps"] == 2
    assert results["replicas"] == (2 if strategy == "mirrored" else 1)
    assert np.isfinite(results["test_loss"])


def test_hundred_steps_on_the_real_fashion_mnist_learn_the_task(tmp_path):
    results = fashion_mnist.run(
        make_flags(
            tmp_path,
            synthetic_data=False,
            data_dir=None,
            batch_size=128,
            train_steps=100,
            eval_every_epochs=1,
        )
    )
    assert results["train_steps"] == 100
    # Ten classes: chance is 0.10; 100 SAM steps of the small CNN reach
    # about 0.77 here.
    assert results["test_accuracy"] > 0.7
