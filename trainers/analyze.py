"""Sharpness of trained models: Hessian eigenvalues, m-sharpness, landscapes.

    python -m trainers.analyze --checkpoint=runs/sgd/model.keras \\
        --compare=runs/sam/model.keras --dataset=fashion_mnist \\
        --output_dir=runs/analysis

writes `analysis.json` (the settings, and for each model its top Hessian
eigenvalues, m-sharpness, loss at w and test accuracy) and PNG plots: 1-D
and 2-D filter-normalized loss landscapes side by side (like the SAM
paper's Figure 1) and the Hessian spectral densities. All but the test
accuracy is measured on the first --num_examples training examples, with
the models in inference mode: with their true labels, or with --run_data
with the labels the run that saved --checkpoint trained on (its label
noise included). Any model the trainers save loads, their custom layers
included.
"""

import dataclasses
import json
import os
import types

import keras
import numpy as np
from absl import flags

from keras_sam import analysis
from keras_sam import options
from trainers import checkpoint
from trainers import flags as trainer_flags
from trainers import loop

# The custom layers of the trainers' models (Shake-Shake, ShakeDrop, the
# ImageNet preprocessing) are registered when their modules are imported.
from trainers import models  # noqa: F401
from trainers.data import arrays
from trainers.data import config as data_config
from trainers.data import datasets as data_lib

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("checkpoint", None, "A trained model (.keras).")
    flags.DEFINE_string(
        "compare", None, "A second model (.keras) to show side by side."
    )
    flags.DEFINE_enum(
        "dataset",
        "fashion_mnist",
        sorted(data_lib.DATASETS),
        "Data set (with --run_data, the run's).",
    )
    flags.DEFINE_string("data_dir", None, "As for the trainers.")
    flags.DEFINE_bool(
        "synthetic_data",
        False,
        "Random data (smoke runs); with --run_data, as the run had it.",
    )
    flags.DEFINE_bool(
        "run_data",
        False,
        "Measure on what the run that saved --checkpoint trained on: its "
        "training examples and labels, label noise included, as the "
        f"{loop.RESULTS} beside the model records them. Otherwise on "
        "--dataset's training examples with their true labels.",
    )
    flags.DEFINE_string("output_dir", "runs/analysis", "Where to write.")
    flags.DEFINE_integer(
        "num_examples",
        2048,
        "Training examples the measures use.",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "batch_size", 256, "Evaluation batch size.", lower_bound=1
    )
    for field in dataclasses.fields(Measurements):
        trainer_flags.define_setting(field, field.default)
    flags.mark_flag_as_required("checkpoint")


def _loss(y, y_pred):
    return keras.losses.categorical_crossentropy(y, y_pred, from_logits=True)


def _splits(flags_obj):
    """The training and test `Split`s, and the number of classes."""
    if not flags_obj.run_data:
        train, test, info = data_lib.load(
            flags_obj.dataset,
            flags_obj.data_dir,
            flags_obj.synthetic_data,
            synthetic_size=flags_obj.num_examples,
        )
        return train, test, info.num_classes
    path = os.path.join(os.path.dirname(flags_obj.checkpoint), loop.RESULTS)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--run_data: no {loop.RESULTS} beside "
            f"--checkpoint={flags_obj.checkpoint!r}."
        )
    with open(path) as f:
        run_results = json.load(f)
    recorded = run_results["flags"]
    synthetic = recorded["synthetic_data"]
    recorded.update(  # a synthetic run's data are made, not read
        data_dir=None
        if synthetic
        else flags_obj.data_dir or recorded["data_dir"],
        synthetic_data=synthetic,
    )
    config = data_config.DataConfig.from_flags(
        types.SimpleNamespace(**recorded)
    )
    splits = arrays.in_memory_splits(config, run_results["dataset"])
    return splits.train, splits.test, splits.info.num_classes


@dataclasses.dataclass(frozen=True)
class Measurements(data_config.FlagFields):
    """What `measure` computes; each field is the flag of its name."""

    top_k: int = data_config.setting(
        1, "Top Hessian eigenvalues to compute.", check=data_config.at_least(1)
    )
    max_iterations: int = data_config.setting(
        40, "Cap on Hessian-vector products.", check=data_config.at_least(1)
    )
    rho: float = data_config.setting(
        options.SAMOptions.rho,
        "ρ of the m-sharpness.",
        check=(lambda v: v > 0, "must be > 0"),
    )
    m: int = data_config.setting(
        128,
        "Examples per set of the m-sharpness.",
        check=data_config.at_least(1),
    )
    landscape_radius: float = data_config.setting(
        1.0,
        "Landscape extent along each direction.",
        check=(lambda v: v > 0, "must be > 0"),
    )
    landscape_points: int = data_config.setting(
        21,
        "Grid points per landscape axis; odd, so that the grid holds w.",
        check=(lambda v: v >= 3 and v % 2, "must be odd and >= 3"),
    )
    spectrum_steps: int = data_config.setting(
        0,
        "Lanczos steps of the spectral density; 0 skips it.",
        check=data_config.at_least(0),
    )


def measure(model, dataset, measurements):
    """The sharpness measures of `model` on `dataset`, as a dict."""
    alphas = np.linspace(
        -measurements.landscape_radius,
        measurements.landscape_radius,
        measurements.landscape_points,
    )
    result = {
        "top_eigenvalues": analysis.hessian_top_eigenvalues(
            model,
            dataset,
            _loss,
            k=measurements.top_k,
            max_iterations=measurements.max_iterations,
            verbose=True,
        ).tolist(),
        "m_sharpness": analysis.m_sharpness(
            model, dataset, _loss, rho=measurements.rho, m=measurements.m
        ),
        "landscape_1d": analysis.loss_landscape_1d(
            model, dataset, _loss, alphas
        ).tolist(),
        "landscape_2d": analysis.loss_landscape_2d(
            model, dataset, _loss, alphas, alphas
        ).tolist(),
        "alphas": alphas.tolist(),
    }
    result["loss"] = result["landscape_1d"][len(alphas) // 2]
    if measurements.spectrum_steps:
        grid, density, _, _ = analysis.hessian_spectral_density(
            model, dataset, _loss, lanczos_steps=measurements.spectrum_steps
        )
        result["spectrum"] = {
            "grid": grid.tolist(),
            "density": density.tolist(),
        }
    return result


def load_model(path):
    """A `.keras` model the trainers saved, without its training config."""
    return keras.saving.load_model(path, compile=False)


def run(flags_obj):
    """Measures the models; returns what it writes to analysis.json: the
    settings, and {model: its measures}."""
    measurements = Measurements.from_flags(flags_obj)
    paths = {"checkpoint": flags_obj.checkpoint}
    if flags_obj.compare:
        paths["compare"] = flags_obj.compare
    for name, path in paths.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"--{name}: no model file at {path!r}.")
        if not path.endswith(".keras") or os.path.isdir(path):
            raise ValueError(
                f"--{name} must be a .keras model file, such as the "
                f"{loop.MODEL} a trainer writes (not its checkpoint). "
                f"Received: --{name}={path!r}"
            )
    loop.check_output_dir(flags_obj.output_dir)
    os.makedirs(flags_obj.output_dir, exist_ok=True)
    train, test, num_classes = _splits(flags_obj)
    examples = min(flags_obj.num_examples, len(train.labels))
    # Checked before the eigenvalues, which take the longest.
    if measurements.top_k > measurements.max_iterations:
        raise ValueError(
            f"--top_k={measurements.top_k} needs as many Lanczos steps: "
            f"--max_iterations={measurements.max_iterations} is fewer."
        )
    if measurements.m > examples:
        raise ValueError(
            f"--m={measurements.m} exceeds the {examples} examples measured "
            f"(--num_examples={flags_obj.num_examples}): the m-sharpness "
            "needs one set of --m."
        )
    dataset = arrays.test_dataset(
        data_lib.Split(train.images[:examples], train.labels[:examples]),
        flags_obj.batch_size,
        num_classes,
    )
    results = {}
    for name, path in _model_names(paths).items():
        model = load_model(path)
        results[name] = dict(
            measure(model, dataset, measurements),
            test_accuracy=arrays.accuracy(model, test, flags_obj.batch_size),
        )
    names = list(results)
    alphas = results[names[0]]["alphas"]
    out = flags_obj.output_dir
    analysis.plot_landscape_1d(
        alphas,
        [results[n]["landscape_1d"] for n in names],
        os.path.join(out, "landscape_1d.png"),
        labels=names,
    )
    analysis.plot_landscape_2d(
        alphas,
        alphas,
        [np.array(results[n]["landscape_2d"]) for n in names],
        os.path.join(out, "landscape_2d.png"),
        titles=[
            f"{n}: λ_max={results[n]['top_eigenvalues'][0]:.1f}" for n in names
        ],
    )
    if flags_obj.spectrum_steps:
        analysis.plot_spectral_density(
            [np.array(results[n]["spectrum"]["grid"]) for n in names],
            [np.array(results[n]["spectrum"]["density"]) for n in names],
            os.path.join(out, "spectrum.png"),
            label=names,
        )
    written = dict(
        settings=dict(
            dataclasses.asdict(measurements),
            examples=examples,
            labels="the run's" if flags_obj.run_data else "true",
        ),
        models=results,
    )
    checkpoint.write_json(os.path.join(out, "analysis.json"), written)
    return written


def _model_names(paths):
    """`{name: path}` of the models of `paths` (`{flag: path}`): each named
    by its run's folder, or by its path from the folders' common one when
    two folders share a name, or by its flag when the paths are one."""
    folders = {
        flag: os.path.dirname(os.path.abspath(path))
        for flag, path in paths.items()
    }
    names = {flag: os.path.basename(f) for flag, f in folders.items()}
    if len(set(names.values())) < len(names):
        common = os.path.commonpath(list(folders.values()))
        names = {
            flag: os.path.relpath(f, common) for flag, f in folders.items()
        }
    if len(set(names.values())) < len(names) or not all(names.values()):
        names = {flag: flag for flag in paths}
    return {names[flag]: path for flag, path in paths.items()}


def main(_):
    for name, r in run(FLAGS)["models"].items():
        print(
            f"{name}: top eigenvalues {np.round(r['top_eigenvalues'], 3)}, "
            f"m-sharpness {r['m_sharpness']:.4f}, loss {r['loss']:.4f}, "
            f"test accuracy {r['test_accuracy']:.4f}"
        )


if __name__ == "__main__":
    define_flags()
    trainer_flags.run_main(main)
