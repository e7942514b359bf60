"""Where does SAM beat SGD? A label-noise study on the real Fashion-MNIST.

The regime is chosen so that the paper's mechanism can act: a model with
nothing but the optimizer to stop it from memorizing (`mlp`: two ReLU layers
of 512 units, no dropout, no BatchNorm, no augmentation) trained on 4,000
examples for 60 epochs, long enough for SGD to fit most of the flipped
labels. Every run: batch 128, SGD with momentum 0.9, learning rate 0.05 with
cosine decay, weight decay 5e-4 (L2 in the loss), the full clean test set,
and the last 2,000 training examples held out as a validation split whose
labels carry the same noise as the training labels.

    python -m benchmarks.generalization --study=noise \
        --output=docs/results_noise.json
    python -m benchmarks.generalization --study=variants --seeds=5 \
        --output=docs/results_variants.json
    python -m benchmarks.report_results

`noise` trains, for each label-noise rate in 0/20/40/60/80 %, plain SGD (a
Keras `fit` of the base model) and SAM at every ρ in {0.01, 0.02, 0.05, 0.1,
0.2, 0.5} with seed 0, and selects ρ per rate by seed 0's accuracy on the
validation split (never the test set). Seeds 1 and 2 then train SGD and SAM
at the selected ρ, and the report compares SGD and SAM seed by seed (same
initial weights, label noise and data order): 55 runs, whose recorded
wall times add up to about 50 minutes on 2 cores. `variants` trains the
efficient and improved variants at one noise rate (--variants_noise) with
the ρ selected there (not SAM-ON: it perturbs normalization layers only,
and the MLP has none).

`cnn` is the second regime: a residual CNN with BatchNorm (`resnet20`)
with basic augmentation (horizontal flip, pad 4, random crop), clean
labels and 40 % label noise, every method of `CNN_METHODS` with its ρ
chosen from its grid on seed 0's validation split (the regime and the
seeds are fixed by `CNN_REGIME` and `CNN_METHODS`, not by the flags):

    python -m benchmarks.generalization --study=cnn \
        --runs_dir=docs/results_cnn --output=docs/results_cnn.json

Its runs live in docs/results_cnn/ and their results.json files are
committed (the checkpoints are not), so that the study is resumed over
several sessions: it costs more than the four CPU hours it was sized for
(each run's results.json records its training CPU seconds).

`cnn_memorizing` probes what that regime needs: the same model, schedule
and ρ selection where SGD memorizes (`CNN_MEMORIZING`: fewer examples, no
augmentation, more epochs), 14 runs:

    python -m benchmarks.generalization --study=cnn_memorizing \
        --runs_dir=docs/results_cnn_memorizing \
        --output=docs/results_cnn_memorizing.json

Runs that finished are read back from --runs_dir, so an interrupted study
continues where it stopped; `--shard=i/n` runs every n-th run from the i-th,
so n processes can share the work.
"""

import contextlib
import json
import os
import time
import types

from absl import app
from absl import flags

from trainers import checkpoint
from trainers import compare_sgd_sam
from trainers import fashion_mnist

FLAGS = flags.FLAGS

NOISE_RATES = (0.0, 0.2, 0.4, 0.6, 0.8)
# 0.5 was added after 0.2, the largest of the first grid, was chosen at
# every noise rate above 0; it is chosen at none.
RHOS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
MSAM_RHOS = (0.3, 1.0, 3.0)
LOOKSAM_ALPHAS = (0.1, 0.3)
# Each variant's settings on top of SAM's (the report prices them with
# benchmarks.step_time's contenders).
VARIANTS = {
    "GSAM": dict(gsam_alpha=0.1, rho_min=0.01),
    "periodic k=5": dict(switching="periodic", sam_every=5),
    "randomized p=0.2": dict(switching="randomized", sam_probability=0.2),
    "AE-SAM": dict(switching="ae_sam"),
    "late-phase 10 %": dict(switching="late_phase", sam_start_fraction=0.9),
    "late-phase 30 %": dict(switching="late_phase", sam_start_fraction=0.7),
    "LookSAM k=5": dict(switching="periodic", sam_every=5, looksam_alpha=0.7),
    # LookSAM's α grid, added after α = 0.7 (its authors' default) trained
    # far below SGD in the CNN regime (CNN_METHODS); the report chooses α
    # on seed 0's validation split.
    **{
        f"LookSAM k=5 α={alpha}": dict(
            switching="periodic", sam_every=5, looksam_alpha=alpha
        )
        for alpha in LOOKSAM_ALPHAS
    },
    # Momentum-SAM wants a larger ρ than SAM's; the authors' range, with
    # the ρ chosen on seed 0's validation split by the report.
    **{
        f"Momentum-SAM ρ={rho}": dict(perturbation="momentum", rho=rho)
        for rho in MSAM_RHOS
    },
}


# The CNN regime (issue #28): TF graph mode was the fastest backend for it
# on 2 CPU cores (benchmarks.cnn_epoch_time, docs/cnn_epoch_time.json).
CNN_REGIME = dict(
    model="resnet20",
    train_examples=8000,
    validation_examples=2000,
    epochs=15,
    batch_size=128,
    learning_rate=0.1,
    lr_schedule="cosine",
    weight_decay=5e-4,
    augmentation="basic",
    track_memorization=True,
    eval_every_epochs=3,
)
CNN_NOISE_RATES = (0.4, 0.0)
# name: (overrides, ρ grid searched with seed 0 or None for SAM's chosen
# ρ, seeds); the variants' overrides are VARIANTS'. SAM's, ASAM's and
# Momentum-SAM's grids each gained a smaller ρ after seed 0 at 40 % noise
# chose the smallest of the first grid.
CNN_METHODS = {
    "SGD": (dict(sam=False), None, 3),
    "SAM": ({}, (0.02, 0.05, 0.1, 0.2), 3),
    "Momentum-SAM": (dict(perturbation="momentum"), (0.1,) + MSAM_RHOS, 3),
    "ASAM": (dict(adaptive=True), (0.2, 0.5, 1.0, 2.0), 2),
    "SAM-ON": (dict(perturbed_variables="normalization"), (0.05, 0.2, 1.0), 2),
    "AE-SAM": (VARIANTS["AE-SAM"], None, 2),
    # LookSAM's grid gained its larger ρ after it trained far below SGD at
    # SAM's chosen ρ, which it first shared with AE-SAM.
    "LookSAM k=5": (VARIANTS["LookSAM k=5"], (0.02, 0.1, 0.5), 2),
    # Added after no ρ brought LookSAM near SGD: in a short probe, LookSAM
    # at α = 0.1 fit its training set about as fast as SGD, at 0.7 far
    # slower. Each α at SAM's chosen ρ, like AE-SAM.
    **{
        f"LookSAM k=5 α={alpha}": (VARIANTS[f"LookSAM k=5 α={alpha}"], None, 2)
        for alpha in LOOKSAM_ALPHAS
    },
}


# The order the study trains its methods in, group by group: the report's
# questions in the order it asks them, so that an unfinished study answers
# the first ones soonest (SAM against SGD and Momentum-SAM, then SAM-ON).
CNN_ORDER = (
    ("SGD", "SAM", "Momentum-SAM"),
    ("SAM-ON",),
    ("ASAM",),
    ("AE-SAM", "LookSAM k=5", *(f"LookSAM k=5 α={a}" for a in LOOKSAM_ALPHAS)),
)


# What the CNN regime needs (issue #28): SGD does not memorize there, so
# the same model, schedule and ρ selection again where it does, as a probe
# of SAM's mechanism: 2,000 examples without augmentation for 40 epochs at
# 40 % noise (a pilot SGD run of 60 epochs fit every flipped label by epoch
# 30), SGD against SAM and Momentum-SAM, each ρ grid reaching higher than
# the CNN study's, whose runs chose its smallest.
CNN_MEMORIZING = dict(
    regime=dict(
        CNN_REGIME,
        train_examples=2000,
        augmentation="none",
        epochs=40,
        eval_every_epochs=10,
    ),
    methods={
        "SGD": CNN_METHODS["SGD"],
        "SAM": ({}, (0.05, 0.1, 0.2, 0.5), 3),
        "Momentum-SAM": (dict(perturbation="momentum"), MSAM_RHOS, 3),
    },
    order=(("SGD", "SAM", "Momentum-SAM"),),
    noise_rates=(0.4,),
)
CNN_STUDIES = {
    "cnn": dict(
        regime=CNN_REGIME,
        methods=CNN_METHODS,
        order=CNN_ORDER,
        noise_rates=CNN_NOISE_RATES,
    ),
    "cnn_memorizing": CNN_MEMORIZING,
}


def cnn_configurations(select, study="cnn"):
    """(name, label_noise, seed, overrides) of every run of a CNN study.

    Group by group of its `order`: seed 0's ρ grids first, then the other
    seeds at the chosen ρ; `select(noise, rhos, name)` is called only once
    seed 0's runs of `name` are listed.
    """
    spec = CNN_STUDIES[study]
    for group in spec["order"]:
        methods = {n: spec["methods"][n] for n in group}
        for noise in spec["noise_rates"]:
            for name, (overrides, rhos, _) in methods.items():
                if name == "SGD":
                    yield name, noise, 0, overrides
                for rho in rhos or ():
                    yield name, noise, 0, {**overrides, "rho": rho}
        for seed in range(max(m[2] for m in methods.values())):
            for noise in spec["noise_rates"]:
                for name, (overrides, rhos, seeds) in methods.items():
                    if seed >= seeds or (seed == 0 and (rhos or name == "SGD")):
                        continue
                    if name != "SGD":
                        rho = (
                            select(noise, rhos, name)
                            if rhos
                            else select(noise, spec["methods"]["SAM"][1], "SAM")
                        )
                        overrides = {**overrides, "rho": rho}
                    yield name, noise, seed, overrides


def define_flags():
    fashion_mnist.define_flags(
        **compare_sgd_sam.MEMORIZATION_REGIME,
        verbose=0,
        output_dir="runs/generalization/unused",
    )
    flags.DEFINE_enum(
        "study", "noise", ["noise", "variants", *CNN_STUDIES], "Study."
    )
    flags.DEFINE_list(
        "noise_rates", [str(r) for r in NOISE_RATES], "Label-noise rates."
    )
    flags.DEFINE_list("rhos", [str(r) for r in RHOS], "SAM's ρ grid.")
    flags.DEFINE_integer("seeds", 3, "Seeds per configuration.")
    flags.DEFINE_float(
        "variants_noise", 0.4, "Label-noise rate of the variants study."
    )
    flags.DEFINE_float(
        "variants_rho",
        None,
        "ρ of SAM and the variants in the variants study (default: the one "
        "the noise study selected on seed 0's validation split there).",
    )
    flags.DEFINE_string(
        "shard", "0/1", "i/n: run every n-th run from the i-th."
    )
    flags.DEFINE_string("output", None, "JSON file for the results.")
    flags.DEFINE_bool(
        "train",
        True,
        "Train the runs that have not finished; --notrain writes --output "
        "from the finished runs only (a study in progress).",
    )
    flags.DEFINE_string(
        "runs_dir", "runs/generalization", "Per-run output directories."
    )


def configurations(study, seeds, noise_rates, rhos, variants_noise, select):
    """(name, label_noise, seed, overrides) of every run of a study.

    `select(noise, rhos)` returns the ρ selected at `noise` from seed 0's
    runs; it is called only once those runs are listed.
    """
    if study == "noise":
        for noise in noise_rates:
            yield "SGD", noise, 0, dict(sam=False)
            for r in rhos:
                yield "SAM", noise, 0, dict(rho=r)
        for seed in range(1, seeds):
            for noise in noise_rates:
                yield "SGD", noise, seed, dict(sam=False)
                yield "SAM", noise, seed, dict(rho=select(noise, rhos))
        return
    rho = select(variants_noise, rhos)
    for seed in range(seeds):
        for name, overrides in VARIANTS.items():
            yield name, variants_noise, seed, {"rho": rho, **overrides}
    # The noise study trains these too; they come last so that it usually
    # has.
    for seed in range(seeds):
        yield "SGD", variants_noise, seed, dict(sam=False)
        yield "SAM", variants_noise, seed, dict(rho=rho)


def selection(runs_dir, fixed_rho=None, timeout_seconds=3 * 3600):
    """`select(noise, rhos, name)`: the ρ whose seed-0 run of `name` had the
    best validation accuracy at `noise`, waiting for runs that other shards
    still train; with `timeout_seconds=None`, None while runs are missing."""

    def select(noise, rhos, name="SAM"):
        if fixed_rho is not None:
            return fixed_rho
        deadline = time.time() + (timeout_seconds or 0)
        while True:
            scores = {
                r: finished(
                    os.path.join(
                        runs_dir, run_name(name, noise, 0, dict(rho=r))
                    )
                )
                for r in rhos
            }
            if all(scores.values()):
                return max(rhos, key=lambda r: scores[r]["validation_accuracy"])
            if timeout_seconds is None:
                return None
            if time.time() > deadline:
                missing = [r for r in rhos if not scores[r]]
                raise RuntimeError(
                    f"No seed-0 {name} runs at label noise {noise} for ρ in "
                    f"{missing} in {runs_dir}: run its study first."
                )
            time.sleep(30)

    return select


def run_name(name, noise, seed, overrides):
    slug = name.lower().replace(" ", "_").replace("=", "")
    slug = slug.replace("ρ", "rho").replace("α", "alpha")
    if "rho" in overrides:
        slug += f"-rho{overrides['rho']}"
    return f"{slug}-noise{noise}-seed{seed}"


def finished(output_dir):
    """The results of a run that trained to the end, or None."""
    path = os.path.join(output_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if results["train_steps"] != results["requested_train_steps"]:
        return None
    return results


@contextlib.contextmanager
def claimed(output_dir):
    """Yields whether this process may train the run in `output_dir`.

    Several study processes (shards, or the variants study beside the noise
    study, which share runs) must never train one run at once. A lock file
    holds the owner's PID; a lock whose process is gone is taken over.
    """
    os.makedirs(output_dir, exist_ok=True)
    lock = os.path.join(output_dir, ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(lock) as f:
            owner = int(f.read().strip() or 0)
        if owner and _alive(owner):
            yield False
            return
        os.remove(lock)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield True
    finally:
        os.remove(lock)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def run(flags_obj):
    index, count = (int(v) for v in flags_obj.shard.split("/"))
    results = []
    select = selection(
        flags_obj.runs_dir,
        flags_obj.variants_rho,
        timeout_seconds=3 * 3600 if flags_obj.train else None,
    )
    complete = True
    cnn = CNN_STUDIES.get(flags_obj.study)
    if cnn:
        runs = cnn_configurations(select, flags_obj.study)
        regime = cnn["regime"]
    else:
        runs = configurations(
            flags_obj.study,
            flags_obj.seeds,
            [float(r) for r in flags_obj.noise_rates],
            [float(r) for r in flags_obj.rhos],
            flags_obj.variants_noise,
            select,
        )
        regime = {
            k: getattr(flags_obj, k)
            for k in compare_sgd_sam.MEMORIZATION_REGIME
        }
    for i, (name, noise, seed, overrides) in enumerate(runs):
        output_dir = os.path.join(
            flags_obj.runs_dir, run_name(name, noise, seed, overrides)
        )
        r = finished(output_dir)
        complete = complete and r is not None
        if r is None and (i % count != index or not flags_obj.train):
            continue
        values = dict(flags_obj.flag_values_dict())
        values.update(regime)
        values.update(overrides)
        values.update(seed=seed, label_noise=noise, output_dir=output_dir)
        if r is None:
            with claimed(output_dir) as mine:
                if not mine:
                    print(f"=== {output_dir}: another process trains it ===")
                    continue
                print(f"=== {name} {overrides}, noise {noise}, seed {seed} ===")
                r = fashion_mnist.run(types.SimpleNamespace(**values))
        results.append(
            dict(
                optimizer=name,
                label_noise=noise,
                seed=seed,
                rho=values["rho"] if values["sam"] else 0.0,
                # The method's settings over the study's (LookSAM's α, by
                # which the report chooses among its rows).
                settings=overrides,
                test_accuracy=r["test_accuracy"],
                validation_accuracy=r["validation_accuracy"],
                train_accuracy_flipped=r.get("train_accuracy_flipped"),
                train_accuracy_unflipped=r["train_accuracy_unflipped"],
                train_steps=r["train_steps"],
                # A resumed run's history and training times cover every
                # epoch (the earlier ones come from its checkpoint); its
                # wall_time_seconds covers its last process only.
                resumed_from_step=r.get("resumed_from_step", 0),
                wall_time_seconds=r["wall_time_seconds"],
                # Missing from the runs that the first version of this
                # study trained (before the trainer recorded them).
                train_cpu_seconds=r.get("train_cpu_seconds"),
                train_wall_seconds=r.get("train_wall_seconds"),
                history=r["history"],
            )
        )
    if flags_obj.output and count == 1:
        summary = {
            "study": flags_obj.study,
            "regime": regime,
            # False for a study in progress (--notrain).
            "complete": complete,
            "runs": results,
        }
        if cnn:
            summary["grids"] = {
                name: rhos
                for name, (_, rhos, _) in cnn["methods"].items()
                if rhos
            }
        checkpoint.write_json(flags_obj.output, summary)
    return results


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
