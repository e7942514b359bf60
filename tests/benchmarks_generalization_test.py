"""The CNN study's plan: which runs, which seeds, ρ chosen on validation."""

import collections
import json
import os

import pytest

from benchmarks import generalization


def _write_run(runs_dir, name, noise, seed, rho, validation_accuracy):
    path = os.path.join(
        runs_dir, generalization.run_name(name, noise, seed, dict(rho=rho))
    )
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(
            dict(
                train_steps=10,
                requested_train_steps=10,
                validation_accuracy=validation_accuracy,
            ),
            f,
        )


def test_every_method_gets_its_seeds_and_its_grid_only_on_seed_0():
    chosen = {}

    def select(noise, rhos, name="SAM"):
        chosen[name, noise] = rhos[-1]
        return rhos[-1]

    runs = list(generalization.cnn_configurations(select))
    seeds = collections.defaultdict(set)
    grid = collections.defaultdict(set)
    for name, noise, seed, overrides in runs:
        seeds[name, noise].add(seed)
        own = generalization.CNN_METHODS[name][1]
        if name == "SGD":
            assert "rho" not in overrides
        elif seed == 0 and own:
            grid[name, noise].add(overrides["rho"])
        else:
            # At the ρ chosen for the method, SAM's for AE-SAM (it has
            # no grid of its own).
            key = (name if own else "SAM", noise)
            assert overrides["rho"] == chosen[key], (name, seed)
    for name, (_, rhos, count) in generalization.CNN_METHODS.items():
        for noise in generalization.CNN_NOISE_RATES:
            assert seeds[name, noise] == set(range(count)), name
            if rhos:
                assert grid[name, noise] == set(rhos), name
    # 2 noise rates × (SGD 3, SAM 4+2, Momentum-SAM 4+2, ASAM 4+1,
    # SAM-ON 3+1, AE-SAM 2, LookSAM 3+1, LookSAM at α = 0.1 and 0.3 2 each).
    assert len(runs) == 2 * (3 + 6 + 6 + 5 + 4 + 2 + 4 + 2 + 2)
    names = {generalization.run_name(*r) for r in runs}
    assert len(names) == len(runs)
    # Folder names a shell types: ρ and α spelled out.
    assert all(n.isascii() for n in names), names
    # Every method in one group of the order; the groups run one after the
    # other, SGD, SAM and Momentum-SAM (every seed) first, then SAM-ON.
    groups = generalization.CNN_ORDER
    assert sorted(n for g in groups for n in g) == sorted(
        generalization.CNN_METHODS
    )
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    order = [group_of[name] for name, *_ in runs]
    assert order == sorted(order)
    assert {name for name, *_ in runs[: order.count(0)]} == {
        "SGD",
        "SAM",
        "Momentum-SAM",
    }
    assert runs[order.count(0)][0] == "SAM-ON"


def test_the_memorizing_probe_is_the_cnn_regime_where_sgd_memorizes():
    probe = generalization.CNN_MEMORIZING
    changed = {
        k: v
        for k, v in probe["regime"].items()
        if generalization.CNN_REGIME[k] != v
    }
    # Model, schedule, batch, weight decay and validation split unchanged.
    assert changed == dict(
        train_examples=2000,
        augmentation="none",
        epochs=40,
        eval_every_epochs=10,
    )
    runs = list(
        generalization.cnn_configurations(
            lambda noise, rhos, name="SAM": rhos[0], "cnn_memorizing"
        )
    )
    # 40 % noise only: SGD 3, SAM 4 + 2, Momentum-SAM 3 + 2.
    assert len(runs) == 14
    assert {noise for _, noise, *_ in runs} == {0.4}
    assert ("SAM", 0.4, 2, dict(rho=0.05)) in runs
    assert (
        "Momentum-SAM",
        0.4,
        0,
        dict(perturbation="momentum", rho=3.0),
    ) in runs


def test_rho_is_chosen_by_seed_0_validation_accuracy(tmp_path):
    runs_dir = str(tmp_path)
    for rho, accuracy in ((0.05, 0.61), (0.1, 0.64), (0.2, 0.62)):
        _write_run(runs_dir, "SAM", 0.4, 0, rho, accuracy)
    select = generalization.selection(runs_dir, timeout_seconds=None)
    assert select(0.4, (0.05, 0.1, 0.2), "SAM") == 0.1
    # A study in progress (--notrain): a grid not yet trained chooses none.
    assert select(0.0, (0.05, 0.1, 0.2), "SAM") is None
    with pytest.raises(RuntimeError, match="No seed-0 ASAM runs"):
        generalization.selection(runs_dir, timeout_seconds=0)(
            0.4, (0.5,), "ASAM"
        )


def test_collected_runs_carry_their_methods_settings(tmp_path):
    import subprocess
    import sys

    # Two finished runs of the variants study; --notrain collects them.
    for name, overrides in (
        ("SGD", dict(sam=False)),
        ("LookSAM k=5 α=0.3", generalization.VARIANTS["LookSAM k=5 α=0.3"]),
    ):
        path = tmp_path / generalization.run_name(
            name, 0.4, 0, dict(overrides, rho=0.2) if name != "SGD" else {}
        )
        path.mkdir()
        (path / "results.json").write_text(
            json.dumps(
                dict(
                    train_steps=10,
                    requested_train_steps=10,
                    test_accuracy=0.7,
                    validation_accuracy=0.5,
                    train_accuracy_unflipped=0.9,
                    wall_time_seconds=1.0,
                    history={},
                )
            )
        )
    output = tmp_path / "variants.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.generalization"]
        + ["--study=variants", "--seeds=1", "--variants_rho=0.2"]
        + [f"--runs_dir={tmp_path}", f"--output={output}", "--notrain"],
        check=True,
        capture_output=True,
    )
    summary = json.loads(output.read_text())
    assert not summary["complete"]
    settings = {r["optimizer"]: r["settings"] for r in summary["runs"]}
    assert settings == {
        "SGD": dict(sam=False),
        "LookSAM k=5 α=0.3": dict(
            rho=0.2, switching="periodic", sam_every=5, looksam_alpha=0.3
        ),
    }


def test_epoch_timing_runs_the_study_regime_on_each_backend():
    from benchmarks import cnn_epoch_time

    cmd, env = cnn_epoch_time.command("jax_jit", "/tmp/x", 0.1)
    assert env["KERAS_BACKEND"] == "jax"
    assert "--jit_compile=true" in cmd and "--model=resnet20" in cmd
    assert "--epochs=2" in cmd and "--augmentation=basic" in cmd
    cmd, env = cnn_epoch_time.command("tensorflow_graph", "/tmp/x", 0.1)
    assert env["KERAS_BACKEND"] == "tensorflow"
    assert "--jit_compile=false" in cmd
