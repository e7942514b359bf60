"""`SAMOptions`: each option's default and check live in one place."""

import dataclasses
import inspect
import re

import keras
import pytest

import keras_sam
from keras_sam import options
from tests.sam_model_test import softmax_data
from tests.sam_model_test import softmax_regression


def base():
    return softmax_regression(*softmax_data()[2:])


def test_the_defaults_are_exact_sam():
    defaults = options.SAMOptions()
    assert defaults.rho == 0.05
    assert defaults.micro_batches == 1
    assert defaults.perturbation == "gradient"
    assert defaults.takes_two_passes
    assert not options.SAMOptions(rho=0).takes_two_passes


def test_no_entry_point_repeats_a_default():
    # SAMModel, sam_gradients and the step take the options by name only.
    for function in (
        keras_sam.SAMModel.__init__,
        keras_sam.sam_gradients,
        keras_sam.stateless_sam_gradients,
        keras_sam.compute_sam_gradients,
    ):
        parameters = inspect.signature(function).parameters
        assert not set(parameters) & set(options.NAMES) - {"rho"}, function
        if "rho" in parameters:
            # None (the options' ρ), or the options' default object itself
            # (SAMModel's, for a positional ρ), never a second literal.
            default = parameters["rho"].default
            assert default is None or default is options.SAMOptions.rho


def test_every_option_has_help_for_a_command_line():
    for field in options.fields():
        assert len(field.metadata["help"]) > 20, field.name


def test_a_model_stores_its_options_and_round_trips_them():
    model = keras_sam.SAMModel(
        base(),
        rho=0.3,
        adaptive=True,
        micro_batches=2,
        switching=keras_sam.switching.Periodic(3),
        name="wrapped",
    )
    assert model.name == "wrapped"
    assert model.options.micro_batches == 2
    assert model.switching is model.options.switching
    config = model.get_config()
    clone = keras_sam.SAMModel.from_config(config)
    assert clone.options.get_config() == model.options.get_config()
    assert clone.switching.every == 3


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.SAMOptions().rho = 0.1


def test_sam_gradients_refuses_options_that_keep_state():
    x, y, _, _ = softmax_data()
    with pytest.raises(TypeError, match=re.escape("Received: looksam_alpha")):
        keras_sam.sam_gradients(
            base(),
            x,
            y,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            looksam_alpha=0.5,
        )


@pytest.mark.parametrize("name", options.GUARDED)
def test_an_option_assigned_on_the_model_is_refused(name):
    # The step and the saved config read `model.options`: an assigned
    # attribute trained with one ρ and saved another.
    model = keras_sam.SAMModel(base(), rho=0.05)
    before = getattr(model, name)
    with pytest.raises(AttributeError, match=rf"SAMModel.{name}` is fixed"):
        setattr(model, name, 0.5)
    assert getattr(model, name) is before
    if name != "options":
        assert getattr(model.options, name) is before


def test_the_refusals_remedy_makes_the_model_asked_for():
    model = keras_sam.SAMModel(base(), rho=0.05, micro_batches=2)
    again = keras_sam.SAMModel(
        model.base, **{**model.options.as_kwargs(), "rho": 0.5}
    )
    assert again.rho == again.options.rho == 0.5
    assert again.micro_batches == 2 and again.base is model.base
    assert again.get_config()["rho"] == 0.5


def test_a_schedule_is_called_once_to_check_it():
    # `sam_gradients` makes its options at every step of a custom loop.
    steps = []

    def rho(step):
        steps.append(int(keras.ops.convert_to_numpy(step)))
        return 0.05

    for _ in range(3):
        assert options.SAMOptions(rho=rho).rho is rho
    assert steps == [0]
