"""Does SAM generalize better? SGD, SAM and variants on the real Fashion-MNIST.

Three studies, each one command (about 20, 35 and 30 minutes on 2 cores):

    python -m benchmarks.generalization --study=clean --seeds=3 \
        --output=docs/results_clean.json
    python -m benchmarks.generalization --study=label_noise --seeds=2 \
        --output=docs/results_label_noise.json
    python -m benchmarks.generalization --study=variants --seeds=2 \
        --output=docs/results_variants.json
    python -m benchmarks.report_results

Every run trains the small CNN on the first 10,000 training examples for 15
epochs (batch 128, SGD with momentum 0.9, lr 0.02 with cosine decay, L2 5e-4,
no augmentation) and is evaluated on the full clean test set after every
epoch. `clean` trains the small CNN with SGD (ρ = 0), SAM (ρ = 0.05) and ASAM
(ρ = 0.5) for --seeds seeds on the clean labels. `label_noise` replaces
20/40/60/80 % of the training labels by random classes (the paper's Table 4
protocol; the test set stays clean) and trains SGD and SAM (ρ = 0.1, 0.05 at
80 %, as in the paper) for --seeds seeds at each rate, recording the test
accuracy after every epoch. `variants` trains GSAM, SAM-ON, periodic,
randomized and adaptive (AE-SAM) switching and LookSAM at one noise rate
(--variants_noise) next to SGD and SAM. Every run uses the same model,
schedule, budget and data order for a given seed; only the optimizer
differs. Runs that finished are read back from their output directory, so an
interrupted study continues where it stopped.
"""

import json
import os
import types

from absl import app
from absl import flags

from trainers import fashion_mnist

FLAGS = flags.FLAGS

CLEAN = {
    "SGD": dict(rho=0.0),
    "SAM": dict(rho=0.05),
    "ASAM": dict(rho=0.5, adaptive=True),
}
NOISE_RATES = (0.2, 0.4, 0.6, 0.8)
# The efficient and improved variants of keras_sam, each with its
# contender in benchmarks.step_time (for its cost), at one noise rate.
VARIANTS = {
    "GSAM": ("gsam", dict(gsam_alpha=0.1, rho_min=0.01)),
    "SAM-ON": ("sam_on", dict(perturbed_variables="normalization", rho=0.5)),
    "periodic k=5": ("periodic_5", dict(switching="periodic", sam_every=5)),
    "randomized p=0.2": (
        "randomized_0.2",
        dict(switching="randomized", sam_probability=0.2),
    ),
    "AE-SAM": ("ae_sam", dict(switching="ae_sam")),
    "LookSAM k=5": (
        "looksam_5",
        dict(switching="periodic", sam_every=5, looksam_alpha=0.7),
    ),
}


def define_flags():
    fashion_mnist.define_flags()
    flags.DEFINE_enum(
        "study", "clean", ["clean", "label_noise", "variants"], "Study."
    )
    flags.DEFINE_float(
        "noise_rho",
        None,
        "ρ of SAM and the variants in the label-noise and variants studies "
        "(default: the paper's, 0.1 up to 60 % noise and 0.05 at 80 %).",
    )
    flags.DEFINE_list(
        "noise_rates",
        [str(r) for r in NOISE_RATES],
        "Label-noise rates of the label_noise study.",
    )
    flags.DEFINE_float(
        "variants_noise",
        0.4,
        "Label-noise rate of the variants study (SGD and SAM run there too).",
    )
    flags.DEFINE_integer("seeds", 3, "Seeds per configuration.")
    flags.DEFINE_string("output", None, "JSON file for the results.")
    flags.DEFINE_string(
        "runs_dir", "runs/generalization", "Per-run output directories."
    )
    # CPU-sized: 10k examples, 15 epochs (1,170 steps at batch 128); long
    # enough for SGD to start fitting noisy labels, a few minutes a run.
    FLAGS.set_default("epochs", 15)
    FLAGS.set_default("train_examples", 10000)
    FLAGS.set_default("verbose", 2)


def configurations(
    study, seeds, variants_noise=0.4, noise_rho=None, rates=NOISE_RATES
):
    """(name, label_noise, seed, overrides) of every run of a study."""
    if study == "clean":
        for seed in range(seeds):
            for name, overrides in CLEAN.items():
                yield name, 0.0, seed, overrides
        return
    if study == "variants":
        rate = variants_noise
        for seed in range(seeds):
            yield "SGD", rate, seed, dict(rho=0.0)
            yield "SAM", rate, seed, _noise_rho(rate, noise_rho)
            for name, (_, overrides) in VARIANTS.items():
                rho = _noise_rho(rate, noise_rho)
                yield name, rate, seed, {**rho, **overrides}
        return
    for rate in rates:
        for seed in range(seeds):
            yield "SGD", rate, seed, dict(rho=0.0)
            yield "SAM", rate, seed, _noise_rho(rate, noise_rho)


def _noise_rho(rate, noise_rho=None):
    """The paper's label-noise ρ (0.1 up to 60 % noise, 0.05 at 80 %), or
    `noise_rho` when given."""
    if noise_rho is not None:
        return dict(rho=noise_rho)
    return dict(rho=0.05 if rate >= 0.8 else 0.1)


def _run_name(name, noise, seed, noise_rho=None):
    # Shared across studies: the variants study reuses the SGD and SAM runs
    # of the label-noise study at its rate (and ρ).
    slug = name.lower().replace(" ", "_").replace("=", "")
    if noise_rho is not None and name != "SGD":
        slug += f"-rho{noise_rho}"
    return f"{slug}-noise{noise}-seed{seed}"


def _finished(output_dir):
    """The results of a run that trained to the end, or None."""
    path = os.path.join(output_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if results["train_steps"] != results["requested_train_steps"]:
        return None
    return results


def run(flags_obj):
    results = []
    for name, noise, seed, overrides in configurations(
        flags_obj.study,
        flags_obj.seeds,
        flags_obj.variants_noise,
        flags_obj.noise_rho,
        [float(r) for r in flags_obj.noise_rates],
    ):
        values = dict(flags_obj.flag_values_dict())
        values.update(overrides)
        values.update(
            seed=seed,
            label_noise=noise,
            output_dir=os.path.join(
                flags_obj.runs_dir,
                _run_name(name, noise, seed, flags_obj.noise_rho),
            ),
        )
        print(f"=== {name}, label noise {noise}, seed {seed} ===")
        r = _finished(values["output_dir"]) or fashion_mnist.run(
            types.SimpleNamespace(**values)
        )
        results.append(
            dict(
                optimizer=name,
                label_noise=noise,
                seed=seed,
                rho=values["rho"],
                test_accuracy=r["test_accuracy"],
                test_loss=r["test_loss"],
                train_steps=r["train_steps"],
                wall_time_seconds=r["wall_time_seconds"],
                history=r["history"],
            )
        )
    if flags_obj.output:
        with open(flags_obj.output, "w") as f:
            json.dump(
                {
                    "study": flags_obj.study,
                    "flags": results and values,
                    "runs": results,
                },
                f,
                indent=1,
            )
    return results


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
