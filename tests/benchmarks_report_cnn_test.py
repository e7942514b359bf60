"""The CNN regime's section: its answers, from runs whose numbers are known."""

import numpy as np
import pytest

from benchmarks import report_cnn
from tests import backends

pytestmark = backends.tensorflow_only


# Training CPU seconds per run: each method's passes, SGD's being 100.
CPU = {"SGD": 100, "SAM": 200, "Momentum-SAM": 103, "SAM-ON": 210}


def _run(name, noise, seed, test, validation=0.5, rho=0.0, **history):
    cpu = CPU.get(name, 150)
    return dict(
        optimizer=name,
        label_noise=noise,
        seed=seed,
        rho=rho,
        test_accuracy=test,
        validation_accuracy=validation,
        train_accuracy_flipped=0.05 if noise else None,
        train_accuracy_unflipped=0.9,
        train_cpu_seconds=cpu,
        history=dict(
            validation_accuracy=[0.4, validation],
            train_accuracy_flipped=[0.1, 0.05],
            epoch_train_cpu_seconds=[cpu / 2, cpu / 2],
            **history,
        ),
    )


def _study(noise_rates=(0.4, 0.0)):
    runs = []
    for noise in noise_rates:
        for seed in range(3):
            runs.append(_run("SGD", noise, seed, 0.80 + 0.01 * seed))
            # SAM: ρ = 0.1 validates best on seed 0 (and only it has seeds
            # 1 and 2); ρ = 0.2 would be better on test.
            runs.append(_run("SAM", noise, seed, 0.83 + 0.01 * seed, 0.7, 0.1))
            runs.append(
                _run("Momentum-SAM", noise, seed, 0.825 + 0.01 * seed, 0.6, 1)
            )
        runs.append(_run("SAM", noise, 0, 0.90, 0.6, 0.2))
        for seed in range(2):
            runs.append(_run("SAM-ON", noise, seed, 0.84 + 0.01 * seed, 0.6))
            runs.append(
                _run(
                    "AE-SAM",
                    noise,
                    seed,
                    0.82 + 0.01 * seed,
                    0.6,
                    0.1,
                    sam_fraction=[0.5, 0.5],
                )
            )
    return {"regime": {}, "complete": True, "runs": runs}


PERFORMANCE = {
    "timings": {
        "resnet20/graph": {
            "contenders": {
                name: {"cpu": {"median_ratio_to_sgd": ratio}}
                for name, ratio in (("sam", 2.0), ("momentum_sam", 1.03))
            }
        }
    }
}


def test_rows_choose_rho_on_validation_and_pair_gains_by_seed():
    rows = {r["name"]: r for r in report_cnn.rows(_study()["runs"], 0.4, None)}
    assert rows["SAM"]["rho"] == 0.1 and rows["SAM"]["seeds"] == 3
    # Differences 3, 3, 3 points: no spread, a zero-width interval.
    assert rows["SAM"]["gain"] == pytest.approx(3.0)
    assert rows["SAM"]["ci"] == pytest.approx(0.0, abs=1e-9)
    assert rows["Momentum-SAM"]["share"] == pytest.approx(2.5 / 3.0)
    assert rows["Momentum-SAM"]["cost"] == 1.0
    # AE-SAM ran SAM on half of its steps.
    assert rows["AE-SAM"]["cost"] == pytest.approx(1.5)
    assert rows["SAM-ON"]["pairs"] == 2
    assert rows["SAM-ON"]["gain"] == pytest.approx(4.0)
    assert rows["SAM"]["run_cpu"] == pytest.approx(2.0)
    assert rows["AE-SAM"]["run_cpu"] == pytest.approx(1.5)
    assert rows["SGD"]["run_cpu"] == pytest.approx(1.0)


def test_training_cpu_pairs_seeds_and_skips_runs_that_timed_evaluation():
    runs = _study(noise_rates=(0.4,))["runs"]
    for r in runs:
        if r["optimizer"] == "SGD" and r["seed"] == 1:
            r["train_cpu_seconds"] = 50  # seed 1 of SAM: 4.0×
        if r["optimizer"] == "SAM" and r["seed"] == 2:
            # An earlier trainer's figure, evaluation included.
            del r["history"]["epoch_train_cpu_seconds"]
    rows = {r["name"]: r for r in report_cnn.rows(runs, 0.4, None)}
    # Seeds 0 and 1 only: (2.0 + 4.0) / 2.
    assert rows["SAM"]["run_cpu"] == pytest.approx(3.0)


def test_answers_follow_the_rows_and_the_measured_costs():
    study = _study()
    by_noise = {
        n: report_cnn.rows(study["runs"], n, PERFORMANCE) for n in (0.0, 0.4)
    }
    answers = report_cnn.answers(by_noise)
    assert answers["q1"] == "Yes: +3.00 ± 0.00 points"
    assert answers["q2"].startswith("At 0 %: yes (83 % of SAM's gain at 1.03×)")
    assert answers["q3"].endswith(
        "At 40 %: yes (SAM-ON +1.00 ± 0.00 points against SAM, paired over "
        "2 seeds)"
    )
    # Gain over training CPU: Momentum-SAM 2.5 / 1.03, SAM-ON 4 / 2.1,
    # SAM 3 / 2, AE-SAM 2 / 1.5.
    assert (
        "At 0 %: Momentum-SAM (+2.43 points per SGD run's training CPU time)"
        in answers["q4"]
    )


def test_sam_on_against_sam_is_paired_by_seed_with_its_interval():
    runs = _study(noise_rates=(0.4,))["runs"]
    for r in runs:
        if r["optimizer"] == "SAM-ON" and r["seed"] == 1:
            r["test_accuracy"] = 0.82  # -2 points against SAM's seed 1
    rows = report_cnn.rows(runs, 0.4, PERFORMANCE)
    # Differences +1, -2: mean -0.5, interval 12.706 · 2.1213 / √2.
    assert report_cnn.answers({0.4: rows})["q3"] == (
        "At 40 %: not significantly (SAM-ON -0.50 ± 19.06 points against "
        "SAM, paired over 2 seeds)"
    )


def test_gain_per_cost_ranks_only_significant_gains():
    runs = _study(noise_rates=(0.4,))["runs"]
    for r in runs:
        if r["optimizer"] != "SGD":
            r["test_accuracy"] -= 0.05  # every method 1 to 3 points behind
    rows = report_cnn.rows(runs, 0.4, PERFORMANCE)
    q4 = report_cnn.answers({0.4: rows})["q4"]
    # Not SAM-ON's -1 / 2.1, the least bad ratio: no gain to rank, only
    # the largest mean gain named (SAM-ON's -1, against SAM's -2,
    # Momentum-SAM's -2.5 and AE-SAM's -3).
    assert q4 == (
        "At 40 %: none, no method beats SGD significantly, so SGD, the "
        "cheapest, is the best buy (the largest mean gain: SAM-ON, -1.00 ± "
        "0.00 points)"
    )


def test_no_share_or_answer_from_one_seed_or_a_gain_within_noise():
    # Seed 0 alone: SAM +3, Momentum-SAM +2.5, but one pair proves nothing.
    runs = [r for r in _study()["runs"] if r["seed"] == 0]
    rows = report_cnn.rows(runs, 0.4, PERFORMANCE)
    assert all("share" not in r for r in rows)
    answers = report_cnn.answers({0.4: rows})
    assert all(a.startswith("Not yet measured") for a in answers.values())
    # Three seeds where SAM's gains are +3, -3, +3 points: its interval
    # reaches 0, so Momentum-SAM has no share of it.
    runs = _study(noise_rates=(0.4,))["runs"]
    for r in runs:
        if r["optimizer"] == "SAM" and r["seed"] == 1 and r["rho"] == 0.1:
            r["test_accuracy"] = 0.78
    rows = report_cnn.rows(runs, 0.4, PERFORMANCE)
    assert all("share" not in r for r in rows)
    q2 = report_cnn.answers({0.4: rows})["q2"]
    assert q2.startswith("At 40 %: SAM has no significant gain to keep (+1.00")
    assert "Momentum-SAM +2.50 ± 0.00 at 1.03×" in q2


def test_a_grid_not_yet_tried_whole_is_said_in_the_rho_cell():
    runs = _study()["runs"]
    rows = report_cnn.rows(runs, 0.4, None, {"SAM": [0.05, 0.1, 0.2]})
    assert "| SAM | 0.1 (2 of 3 tried) | 3 |" in report_cnn._table(rows)
    rows = report_cnn.rows(runs, 0.4, None, {"SAM": [0.1, 0.2]})
    assert "| SAM | 0.1 | 3 |" in report_cnn._table(rows)


def test_a_study_in_progress_says_what_is_missing():
    study = _study(noise_rates=(0.4,))
    study["runs"] = [r for r in study["runs"] if r["optimizer"] == "SGD"]
    answers = report_cnn.answers(
        {0.4: report_cnn.rows(study["runs"], 0.4, None)}
    )
    assert all(a.startswith("Not yet measured") for a in answers.values())


def _regime(study):
    study["regime"] = dict(
        model="resnet20",
        train_examples=8000,
        validation_examples=2000,
        augmentation="basic",
        epochs=2,
        batch_size=128,
        learning_rate=0.1,
        lr_schedule="cosine",
        weight_decay=5e-4,
        eval_every_epochs=1,
    )
    return study


def _section(study, tmp_path, probe=None):
    return report_cnn.section(
        dict(
            cnn=_regime(study),
            cnn_memorizing=probe,
            performance=PERFORMANCE,
            cnn_epoch_time=dict(
                epochs=dict(
                    tensorflow_graph=dict(cpu_seconds=29.1, wall_seconds=16.1),
                    jax_jit=dict(cpu_seconds=49.4, wall_seconds=32.2),
                )
            ),
            figure=lambda name: str(tmp_path / f"{name}.png"),
        )
    )


def test_the_section_renders_with_its_plot(tmp_path):
    study = _study()
    # SGD's CPU time spread over both noise rates, seed 0 included at each.
    study["runs"][0]["train_cpu_seconds"] = 90
    fields = _section(study, tmp_path)
    assert (tmp_path / "cnn.png").stat().st_size > 1000
    # SAM's gain at 40 % is significant (+3 points on every seed).
    assert fields["needs"] == ""
    assert fields["status"] == "All 28 runs finished."
    assert (fields["sgd_cpu_low"], fields["sgd_cpu_high"]) == (90, 100)
    assert "does not memorize" in fields["sgd_regime"]
    assert "tensorflow_graph 29.1 CPU s (16.1 s wall)" in fields["backends"]
    assert fields["backends"].endswith("the fastest, tensorflow_graph.")
    assert np.isclose(fields["paper_sam_accuracy"], 96.02)
    # SAM's grid on seed 0: ρ = 0.1 chosen (validation 70 %), not 0.2
    # (validation 60 %, test 90 %).
    assert (
        "- SAM: **ρ = 0.1: 70.0 / 83.0**, ρ = 0.2: 60.0 / 90.0\n"
        in fields["tables"]
    )


def test_a_choice_at_the_edge_of_a_grid_is_said():
    runs = [
        _run("SAM", 0.4, 0, 0.8, validation, rho)
        for rho, validation in ((0.05, 0.6), (0.1, 0.5), (0.2, 0.4))
    ]
    assert report_cnn.grids(runs, 0.4).endswith(
        "(the smallest ρ of the grid: the best may lie beyond it)"
    )


def test_a_choice_at_the_grid_edge_is_said_with_sgd_below_it():
    runs = _study(noise_rates=(0.4,))["runs"]
    widest = _run("SAM", 0.4, 0, 0.81, 0.5, 0.4)
    runs.append(widest)
    line = report_cnn.grids(runs, 0.4).splitlines()[0]
    # ρ = 0.1 is the smallest of 0.1, 0.2, 0.4; SGD's seed 0 is 50 / 80.
    assert line.endswith(
        "(the smallest ρ of the grid; below it lies SGD itself: 50.0 / 80.0)"
    )
    widest["validation_accuracy"] = 0.9
    line = report_cnn.grids(runs, 0.4).splitlines()[0]
    assert line.endswith(
        "(the largest ρ of the grid: the best may lie beyond it)"
    )


def test_sgd_is_not_said_to_lie_below_looksams_grid():
    runs = _study(noise_rates=(0.4,))["runs"] + [
        _run("LookSAM k=5", 0.4, 0, 0.7, validation, rho)
        for rho, validation in ((0.02, 0.5), (0.1, 0.4), (0.5, 0.3))
    ]
    line = report_cnn.grids(runs, 0.4).splitlines()[-1]
    assert line.startswith("- LookSAM k=5: **ρ = 0.02: 50.0 / 70.0**")
    assert line.endswith(
        "(the smallest ρ of the grid: the best may lie beyond it)"
    )


def test_no_memorization_and_no_significant_gain_say_what_the_regime_needs(
    tmp_path,
):
    study = _study()
    for r in study["runs"]:
        if r["optimizer"] == "SAM" and r["seed"] == 1 and r["label_noise"]:
            r["test_accuracy"] = 0.78  # gains +3, -3, +3 points at 40 %
    needs = " ".join(_section(study, tmp_path)["needs"].split())
    assert "SAM's gain at 40 % noise is not significant (+1.00 ±" in needs
    assert "SGD to fall to 68.8 % at 40 % noise" in needs
    assert needs.endswith("No such longer run was measured here.")
    probe = _study(noise_rates=(0.4,))
    needs = " ".join(_section(study, tmp_path, probe)["needs"].split())
    assert needs.endswith(
        "The probe below tests the mechanism at a CPU's budget instead, by "
        "shrinking the data where the paper lengthens the training."
    )
    # Where SGD memorizes, the section does not say it.
    for r in study["runs"]:
        r["train_accuracy_flipped"] = 0.9 if r["label_noise"] else None
    assert _section(study, tmp_path)["needs"] == ""


def test_sam_behind_sgd_on_clean_labels_is_said_so():
    runs = _study(noise_rates=(0.0,))["runs"]
    for r in runs:
        if r["optimizer"] == "SAM":
            r["test_accuracy"] -= 0.05  # 2 points behind SGD on every seed
    rows = report_cnn.rows(runs, 0.0, PERFORMANCE)
    q1 = report_cnn.answers({0.0: rows})["q1"]
    assert q1 == "No, SGD is ahead: -2.00 ± 0.00 points"


def test_the_probe_answers_where_sgd_memorizes(tmp_path):
    probe = _regime(_study(noise_rates=(0.4,)))
    for r in probe["runs"]:
        if r["optimizer"] == "SGD":
            r["train_accuracy_flipped"] = 0.95
    fields = report_cnn.probe_section(
        dict(
            cnn_memorizing=probe,
            performance=PERFORMANCE,
            figure=lambda name: str(tmp_path / f"{name}.png"),
        )
    )
    assert (tmp_path / "cnn_memorizing.png").stat().st_size > 1000
    assert fields["sgd_flipped"] == "95.0 %"
    assert "memorizes much of the noise" in fields["sgd_regime"]
    # SAM at ρ = 0.1 (chosen on validation): +3 points on every seed.
    assert fields["sam"] == "Yes: +3.00 ± 0.00 points"
    # Momentum-SAM's +2.5 of SAM's +3 at its measured 1.03× per step.
    assert fields["q2"] == "At 40 %: yes (83 % of SAM's gain at 1.03×)"
    assert fields["status"] == "All 14 runs finished."
    # Before SAM has a second seed, the question says it is not measured.
    probe["runs"] = [
        r for r in probe["runs"] if r["seed"] == 0 or r["optimizer"] == "SGD"
    ]
    fields = report_cnn.probe_section(
        dict(
            cnn_memorizing=probe,
            performance=PERFORMANCE,
            figure=lambda name: str(tmp_path / f"{name}.png"),
        )
    )
    assert fields["sam"].startswith("Not yet measured")
    # No run finished yet: no section.
    probe["runs"] = []
    assert report_cnn.probe_section(dict(cnn_memorizing=probe)) is None


def _looksam(alpha, noise, seed, test, validation, rho=0.1, fit=0.9):
    name = "LookSAM k=5" if alpha == 0.7 else f"LookSAM k=5 α={alpha}"
    run = _run(name, noise, seed, test, validation, rho)
    run.update(
        settings=dict(looksam_alpha=alpha, rho=rho),
        train_accuracy_unflipped=fit,
    )
    return run


def test_looksams_alpha_is_chosen_on_validation_at_sams_rho(tmp_path):
    study = _study(noise_rates=(0.4, 0.0))
    for noise in (0.4, 0.0):
        for seed in range(2):
            # α = 0.3 validates best and tests worst; α = 0.7 at a ρ other
            # than SAM's chosen 0.1 validates better still, but is not on
            # the α grid.
            study["runs"] += [
                _looksam(0.7, noise, seed, 0.84, 0.5, fit=0.7),
                _looksam(0.1, noise, seed, 0.83, 0.6, fit=0.88),
                _looksam(0.3, noise, seed, 0.79 + 0.01 * seed, 0.65),
            ]
        study["runs"].append(
            _looksam(0.7, noise, 0, 0.84, 0.9, rho=0.02, fit=0.6)
        )
    rows = report_cnn.rows(study["runs"], 0.4, None)
    # A method the study added is reported without an entry of its own.
    assert [r["name"] for r in rows][-2:] == [
        "LookSAM k=5 α=0.1",
        "LookSAM k=5 α=0.3",
    ]
    line = report_cnn.grids(study["runs"], 0.4).splitlines()[-1]
    assert line == (
        "- LookSAM k=5 over α at ρ = 0.1: α = 0.1: 60.0 / 83.0, "
        "**α = 0.3: 65.0 / 79.0**, α = 0.7: 50.0 / 84.0"
    )
    # At the end of the grid, the best α may lie beyond it.
    runs = [dict(r) for r in study["runs"]]
    for r in runs:
        if r["optimizer"] == "LookSAM k=5 α=0.1":
            r["validation_accuracy"] = 0.7
    assert (
        report_cnn.grids(runs, 0.4)
        .splitlines()[-1]
        .endswith(
            "**α = 0.1: 70.0 / 83.0**, α = 0.3: 65.0 / 79.0, α = 0.7: 50.0 / "
            "84.0 (the smallest α of the grid: the best may lie beyond it)"
        )
    )
    fields = _section(study, tmp_path)
    # Paired against SGD (80, 81 %): α = 0.3's gain is -1 point each seed.
    assert fields["looksam_choice"] == (
        "α = 0.3 at 0 % (-1.00 ± 0.00 points over SGD), "
        "α = 0.3 at 40 % (-1.00 ± 0.00 points over SGD)"
    )
    # Each α's fit on clean labels at its chosen ρ (α = 0.7's is 0.02).
    assert fields["looksam_clean_train"] == (
        "88.0 % at α = 0.1, 90.0 % at α = 0.3, 60.0 % at α = 0.7"
    )


def test_runs_of_a_later_session_are_set_against_sgd_trained_again():
    assert report_cnn._later_session(None) == ""
    rerun = dict(
        run="sgd-noise0.4-seed0",
        committed_cpu_seconds=300.0,
        rerun_cpu_seconds=450.0,
        later_methods=["A", "B"],
    )
    text = report_cnn._later_session(dict(cnn_sgd_rerun=rerun))
    # A sentence of its own after the paragraph's last.
    assert text.startswith(" The runs of A, B were trained in a later")
    text = " ".join(text.split())
    assert "took 450 CPU s against the committed run's 300 (1.50×)" in text
