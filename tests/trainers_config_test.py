"""trainers.config: every setting comes from the flag of its name."""

import dataclasses
import os
import re
import types

import keras
import pytest
from absl import flags

from keras_sam import options
from keras_sam import schedules
from keras_sam import switching
from tests import backends
from trainers import checkpoint
from trainers import config
from trainers import fashion_mnist
from trainers import flags as trainer_flags
from trainers import loop
from trainers import models
from trainers.data import arrays
from trainers.data import config as data_config

pytestmark = backends.tensorflow_only

FLAT_CONFIGS = [
    config.OptimizerConfig,
    config.AcceleratorConfig,
    data_config.DataConfig,
]
NESTED = {"data", "optimizer", "sam", "accelerator", "recorded_flags"}


def _declared_flags():
    """The process's flags, with the common and streamed sets' declared."""
    if "rho" not in flags.FLAGS:
        fashion_mnist.define_flags()
    trainer_flags.define_stream_flags()
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])
    return flags.FLAGS


def test_every_field_is_a_flag_with_its_default_help_and_check():
    # A field without a flag of its name would keep its default silently.
    declared = _declared_flags()
    fields = [
        (cls.__name__, f)
        for cls in FLAT_CONFIGS
        for f in dataclasses.fields(cls)
    ]
    fields += [
        ("TrainingConfig", f)
        for f in dataclasses.fields(config.TrainingConfig)
        if f.name not in NESTED
    ]
    assert [f"{c}.{f.name}" for c, f in fields if f.name not in declared] == []
    settings = [f for _, f in fields if f.name not in ("model", "output_dir")]
    assert {f.name for f in settings} == {
        f.name for f in config.setting_fields()
    }
    assert [
        f.name
        for f in settings
        if f.metadata["help"] not in declared[f.name].help
    ] == []
    # The Fashion-MNIST trainer sets these itself; every other setting's
    # default is the flag's.
    own = {"learning_rate", "data_dir"}
    assert [
        f"{f.name}: {f.default!r}, flag {declared[f.name].default!r}"
        for f in settings
        if f.name not in own and f.default != declared[f.name].default
    ] == []


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("batch_size", 0, "--batch_size must be >= 1"),
        ("train_examples", 0, "--train_examples must be >= 1"),
        ("weight_decay", "nan", "--weight_decay must be >= 0 and finite"),
        ("ema_decay", 1.0, "--ema_decay must lie in [0, 1) and finite"),
        ("steps_per_execution", 0, "--steps_per_execution must be >= 1"),
        ("image_size", 16, "--image_size must be >= 32"),
        ("sam_start_fraction", 2.0, "--sam_start_fraction must lie in"),
        ("momentum", "nan", "--momentum must lie in [0, 1] and finite"),
        ("momentum", 1.5, "--momentum must lie in [0, 1] and finite"),
        ("seed", -1, "--seed must lie in [0, 2**32)"),
        ("shuffle_buffer", 0, "--shuffle_buffer must be >= 1"),
        ("verbose", 7, "--verbose must be 0, 1 or 2"),
        ("model_parallel", 0, "--model_parallel must be >= 1"),
    ],
)
def test_a_setting_refuses_what_its_check_says(name, value, message):
    declared = _declared_flags()
    with pytest.raises(flags.IllegalFlagValueError) as error:
        declared(["test", f"--{name}={value}"])
    try:
        assert message in str(error.value)
    finally:
        declared[name].value = declared[name].default
        declared.validate_all_flags()


def by_hand(**settings):
    return config.TrainingConfig(
        model="mlp",
        output_dir="/tmp/run",
        data=data_config.DataConfig(),
        **settings,
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: data_config.DataConfig(batch_size=0),
            "`batch_size` must be >= 1. Received: batch_size=0",
        ),
        (
            lambda: config.OptimizerConfig(learning_rate=float("nan")),
            "`learning_rate` must be > 0 and finite. Received: "
            "learning_rate=nan",
        ),
        (
            lambda: config.TrainingConfig(
                model="mlp",
                output_dir="/tmp/run",
                data=data_config.DataConfig(),
                train_steps=None,
            ),
            "`train_steps` must be >= 0. Received: train_steps=None",
        ),
        # Each of these had been taken: a misspelt SAM setting dropped, a
        # schedule name trained with a constant rate, a fraction of an
        # epoch failing after the first checkpoint.
        (
            lambda: by_hand(sam={"rhoo": 0.1}),
            f"`sam` has no settings ['rhoo']; it takes "
            f"{sorted(config.sam_defaults())}. Received: sam={{'rhoo': 0.1}}",
        ),
        (
            lambda: by_hand(sam={"rho": -1.0}),
            "--rho must be >= 0. Received: --rho=-1.0",
        ),
        (  # it had named the policy's argument, `every`
            lambda: by_hand(sam={"sam_every": 2.5}),
            "--sam_every must be an integer >= 1. Received: --sam_every=2.5",
        ),
        (
            lambda: config.OptimizerConfig(lr_schedule="linear"),
            "`lr_schedule` must be one of ['constant', 'cosine']. Received: "
            "lr_schedule='linear'",
        ),
        (
            lambda: by_hand(epochs=1.5),
            "`epochs` must be an integer. Received: epochs=1.5",
        ),
        (
            lambda: config.TrainingConfig(
                model="resnet21",
                output_dir="/tmp/run",
                data=data_config.DataConfig(),
            ),
            f"`model` must be one of {models.NAMES}. Received: "
            "model='resnet21'",
        ),
        (
            lambda: by_hand(
                sam={"perturbation": "momentum"},
                optimizer=config.OptimizerConfig(momentum=0.0),
            ),
            "--perturbation=momentum moves the weights along SGD's momentum, "
            "so it needs --momentum > 0. Received: --momentum=0.0",
        ),
        # These three had been taken: two ignored, one refused at the run.
        (
            lambda: config.AcceleratorConfig(tpu="node-1"),
            "`tpu` acts with `strategy=tpu` only. Received: tpu='node-1', "
            "strategy='default'",
        ),
        (
            lambda: data_config.DataConfig(data_dir="/d", synthetic_data=True),
            "`data_dir` acts with `synthetic_data=False` only. Received: "
            "data_dir='/d', synthetic_data=True",
        ),
        (
            lambda: config.AcceleratorConfig(model_parallel=0),
            "`model_parallel` must be >= 1. Received: model_parallel=0",
        ),
    ],
)
def test_a_config_made_by_hand_refuses_what_the_flag_would(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value) == message


def test_every_sam_option_is_a_flag_with_its_default_and_help():
    # Derived from keras_sam.options, so a new option gets its flag.
    declared = _declared_flags()
    assert [
        f.name
        for f in options.fields()
        if f.name not in declared
        or f.metadata["help"] not in declared[f.name].help
    ] == []
    assert {
        f.name: declared[f.name].default
        for f in options.fields()
        if f.name not in ("rho", "switching")
    } == {
        f.name: f.default
        for f in options.fields()
        if f.name not in ("rho", "switching")
    }
    # ρ is each trainer's (the paper's for its data set); the policy by
    # name, the one that runs SAM at every step by default.
    assert declared["switching"].default == "none"
    assert trainer_flags.sam_options({}) == options.SAMOptions()
    # A policy's parameter defaults to the policy's own default.
    assert declared["sam_every"].default == switching.Periodic().every
    assert (
        declared["sam_probability"].default
        == switching.Randomized().probability
    )


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(rho=-1.0), "--rho must be >= 0. Received: --rho=-1.0"),
        (dict(eta=float("inf")), "--eta must be finite. Received: --eta=inf"),
        (  # the remedy and the value had been Python's
            dict(looksam_alpha=0.5),
            "--looksam_alpha acts on the steps without SAM, so it needs a "
            "--switching policy, e.g. --switching=periodic --sam_every=5. "
            "Received: --looksam_alpha=0.5, --switching=none",
        ),
        (
            dict(sam_every=0),
            "--sam_every must be an integer >= 1. Received: --sam_every=0",
        ),
        (
            dict(rho_min=0.1, rho=0.05),
            "Received: --rho_min=0.1, --rho=0.05",
        ),
        (
            dict(perturbed_variables="kernel,("),
            "'(' is not one",
        ),
        (  # it had been ignored
            dict(sam_every=3),
            "--sam_every acts with `--switching=periodic` only. Received: "
            "--sam_every=3, --switching=none",
        ),
        (  # the policy had been shown as its object's repr
            dict(perturbation="friendly", switching="randomized"),
            "cannot be combined with --switching (F-SAM keeps one moving "
            "average of the whole batch's clean gradient and perturbs at "
            "every step). Received: --switching=randomized",
        ),
        (  # it had failed at the first step, naming the optimizer
            dict(perturbation="momentum", momentum=0.0),
            "--perturbation=momentum moves the weights along SGD's "
            "momentum, so it needs --momentum > 0. Received: --momentum=0.0",
        ),
    ],
)
def test_a_bad_sam_flag_fails_parsing_naming_the_flag_and_value(
    values, message
):
    declared = _declared_flags()
    name = next(iter(values))
    argv = ["test", *(f"--{k}={v}" for k, v in values.items())]
    with pytest.raises(flags.IllegalFlagValueError) as error:
        declared(argv)
    try:
        assert str(error.value).startswith(f"flag --{name}=")
        assert message in str(error.value)
    finally:
        for key in values:
            declared[key].value = declared[key].default
        declared.validate_all_flags()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--tpu=node-1"],
            "--tpu acts with `--strategy=tpu` only. Received: --tpu='node-1', "
            "--strategy='default'",
        ),
        (
            ["--synthetic_data", "--data_dir=/d"],
            "--data_dir acts with `--synthetic_data=False` only. Received: "
            "--data_dir='/d', --synthetic_data=True",
        ),
    ],
)
def test_a_flag_that_another_would_make_ignored_is_refused(argv, message):
    declared = _declared_flags()
    try:
        with pytest.raises(flags.IllegalFlagValueError) as error:
            declared(["test", *argv])
        assert message in str(error.value)
        for name in ("tpu", "data_dir", "synthetic_data"):
            declared[name].value = declared[name].default
        declared(["test", "--strategy=tpu", "--tpu=node-1", "--data_dir=/d"])
    finally:
        for name in ("tpu", "data_dir", "synthetic_data", "strategy"):
            declared[name].value = declared[name].default
        declared.validate_all_flags()


def test_an_empty_setting_is_not_one_another_makes_ignored():
    assert config.AcceleratorConfig(tpu="").tpu == ""
    assert (
        data_config.DataConfig(data_dir="", synthetic_data=True).data_dir == ""
    )


def test_epochs_that_train_steps_override_are_no_setting_of_the_run():
    # A resume with another --epochs had been refused, though it changes
    # nothing when --train_steps is set.
    assert "epochs" not in by_hand(train_steps=5, epochs=3).settings()
    assert by_hand(epochs=3).settings()["epochs"] == 3


def test_nosam_ignores_the_sam_flags_as_its_help_says():
    # They had been checked all the same: `--nosam --looksam_alpha=0.5`
    # was refused for want of a policy.
    declared = _declared_flags()
    try:
        declared(["test", "--nosam", "--looksam_alpha=0.5"])
        made = config.TrainingConfig.from_flags(declared)
        assert made.sam is None
    finally:
        for key in ("looksam_alpha", "sam"):
            declared[key].value = declared[key].default
        declared.validate_all_flags()


def test_sam_flags_make_the_options_of_their_forms(tmp_path):
    made = trainer_flags.sam_options(
        dict(
            rho=0.2,
            rho_min=0.02,
            perturbed_variables="kernel,bias",
            switching="late_phase",
            sam_start_fraction=0.75,
            adaptive=True,
        ),
        total_steps=200,
        learning_rate=keras.optimizers.schedules.CosineDecay(0.1, 200),
    )
    assert isinstance(made.rho, schedules.RhoFollowingLearningRate)
    assert (made.rho.rho_max, made.rho.rho_min) == (0.2, 0.02)
    assert made.perturbed_variables == ["kernel", "bias"]
    assert made.switching.start_step == 150 and made.adaptive
    # With a constant learning rate, ρ following it is the constant ρ.
    assert trainer_flags.sam_options(dict(rho=0.2, rho_min=0.02)).rho == 0.2


@pytest.mark.parametrize("sam", [None, dict(rho=0.2, rho_min=0.02)])
def test_cosine_learning_rate_reaches_zero_at_the_last_step(sam):
    made = config.TrainingConfig(
        model="small_cnn",
        output_dir="unused",
        data=data_config.DataConfig(batch_size=4),
        optimizer=config.OptimizerConfig(learning_rate=0.1),
        sam=sam,
    )
    strategy, settings = loop.prepare(made)
    _, model = loop.build_sam_model(
        made,
        strategy,
        settings,
        lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
        total_steps=40,
    )
    # 0.1 · (1 + cos(π t / 40)) / 2, by hand.
    expected = {0: 0.1, 10: 0.0853553, 20: 0.05, 30: 0.0146447, 40: 0.0}
    for step, rate in expected.items():
        model.optimizer.iterations.assign(step)
        assert float(model.optimizer.learning_rate) == pytest.approx(
            rate, abs=1e-6
        )
        if sam is not None:
            # ρ follows the rate: 0.2 at the peak, 0.02 at the last step.
            assert float(model.options.rho(step)) == pytest.approx(
                0.02 + 0.18 * rate / 0.1, abs=1e-6
            )


def test_from_flags_reads_every_value():
    values = dict(
        _declared_flags().flag_values_dict(),
        model="resnet20",
        output_dir="/tmp/x",
        epochs=3,
        train_steps=7,
        weight_decay=1e-3,
        checkpoint_every_steps=5,
        eval_every_epochs=2,
        verbose=0,
        batch_size=32,
        seed=9,
        label_noise=0.2,
        learning_rate=0.3,
        lr_schedule="constant",
        nesterov=True,
        label_smoothing=0.1,
        rho=0.2,
        rho_min=0.01,
        switching="periodic",
        sam_every=3,
        looksam_alpha=0.7,
        jit_compile="true",
        mixed_precision="bfloat16",
        steps_per_execution=4,
        deterministic=True,
    )
    made = config.TrainingConfig.from_flags(types.SimpleNamespace(**values))
    assert (made.model, made.output_dir, made.epochs, made.train_steps) == (
        "resnet20",
        "/tmp/x",
        3,
        7,
    )
    assert (made.weight_decay, made.checkpoint_every_steps) == (1e-3, 5)
    assert (made.eval_every_epochs, made.verbose) == (2, 0)
    assert (made.batch_size, made.seed, made.data.label_noise) == (32, 9, 0.2)
    assert made.optimizer == config.OptimizerConfig(
        learning_rate=0.3,
        lr_schedule="constant",
        momentum=values["momentum"],
        nesterov=True,
        label_smoothing=0.1,
    )
    assert made.sam == dict(
        config.sam_defaults(),
        rho=0.2,
        rho_min=0.01,
        switching="periodic",
        sam_every=3,
        looksam_alpha=0.7,
    )
    assert made.accelerator == config.AcceleratorConfig(
        jit_compile="true",
        mixed_precision="bfloat16",
        steps_per_execution=4,
        deterministic=True,
    )
    assert made.recorded_flags["rho"] == 0.2
    assert "logtostderr" not in made.recorded_flags  # absl's own
    baseline = config.TrainingConfig.from_flags(
        types.SimpleNamespace(**dict(values, sam=False))
    )
    assert baseline.sam is None


def test_a_config_made_by_hand_trains_without_flags(tmp_path):
    results = loop.run(
        config.TrainingConfig(
            model="small_cnn",
            output_dir=str(tmp_path),
            data=data_config.DataConfig(batch_size=16, synthetic_data=True),
            train_steps=2,
            verbose=0,
        ),
        lambda data: arrays.load(data, fashion_mnist.DATASET),
    )
    assert results["train_steps"] == 2
    assert results["flags"] == {}


def test_a_checkpoint_of_the_sam_flags_before_they_were_derived_resumes():
    # The settings of a default run, as trainers.config.SAMConfig wrote
    # them before the SAM flags came from keras_sam.options: same names,
    # same values, and no --adaptive_variables, which a run then could not
    # set.
    before = dict(
        sam=True,
        rho=0.05,
        rho_min=None,
        adaptive=False,
        eta=0.01,
        sync_perturbations=False,
        micro_batches=1,
        gsam_alpha=0.0,
        perturbed_variables="all",
        switching="none",
        sam_every=2,
        sam_probability=0.5,
        sam_start_fraction=0.9,
        looksam_alpha=None,
        perturbation="gradient",
    )
    now = config.TrainingConfig(
        model="small_cnn",
        output_dir="/tmp/run",
        data=data_config.DataConfig(batch_size=16),
    ).settings()
    assert {k: now[k] for k in before} == before
    saved = checkpoint.Saved(
        path="/tmp/run/checkpoint.npz",
        step=3,
        variables={},
        metrics={},
        history={},
        settings=dict(now, **before),
    )
    del saved.settings["adaptive_variables"]
    loop._check_same_run(saved, now, "/tmp/run")
    with pytest.raises(checkpoint.CheckpointError) as error:
        loop._check_same_run(saved, dict(now, sam_every=3), "/tmp/run")
    assert "--sam_every=2 there, --sam_every=3 now" in str(error.value)


def test_faults_md_names_every_setting_that_may_change_on_resume():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "faults.md")) as f:
        text = " ".join(f.read().split())
    start = text.index("every setting must match but")
    sentence = text[start : text.index("MAY_CHANGE_ON_RESUME", start)]
    named = set(re.findall(r"`--(\w+)`", sentence))
    assert named == set(config.MAY_CHANGE_ON_RESUME)
