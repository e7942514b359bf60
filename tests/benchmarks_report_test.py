"""The report scripts on small synthetic results: tables, verdicts, plots."""

import ast
import json
import os
import re
import shutil
import types

import numpy as np
import pytest

from benchmarks import report_common as common
from benchmarks import report_results
from tests import backends


def _flat(text):
    """The text with its line breaks as spaces: reports wrap paragraphs."""
    return " ".join(text.split())


# NumPy and matplotlib only: run once, in the TensorFlow pass.
pytestmark = backends.tensorflow_only


def test_paired_difference_gives_a_student_t_interval_and_wins():
    a = {0: 80.0, 1: 82.0, 2: 81.0}
    b = {0: 81.0, 1: 83.5, 2: 80.5}
    diff = common.paired_difference(a, b)
    d = np.array([1.0, 1.5, -0.5])
    assert diff["mean"] == pytest.approx(2.0 / 3.0)
    # t(2) at 97.5 % is 4.303.
    assert diff["ci"] == pytest.approx(4.303 * d.std(ddof=1) / np.sqrt(3))
    assert diff["wins"] == 2 and diff["n"] == 3


def test_the_t_table_matches_scipy_and_reaches_31_seeds():
    # It had stopped at 10 seeds: `--seeds=11` failed with a KeyError.
    stats = pytest.importorskip("scipy.stats")
    for freedom, value in common.T_CRITICAL_95.items():
        assert value == pytest.approx(stats.t.ppf(0.975, freedom), abs=6e-4)
    assert max(common.T_CRITICAL_95) == 30
    seeds = {s: 80.0 + (s % 3) for s in range(31)}
    common.paired_difference(seeds, {s: v + 1 for s, v in seeds.items()})
    with pytest.raises(ValueError, match="up to 31 seeds. Received: 32"):
        common.paired_difference({**seeds, 31: 80.0}, {**seeds, 31: 81.0})


def _run(
    optimizer, noise, seed, test, validation, rho=0.0, flipped=0.5, **settings
):
    epochs = 3
    return dict(
        optimizer=optimizer,
        label_noise=noise,
        seed=seed,
        rho=rho,
        settings=dict(rho=rho, **settings),
        test_accuracy=test,
        validation_accuracy=validation,
        train_accuracy_flipped=flipped,
        train_accuracy_unflipped=0.95,
        train_cpu_seconds=100.0,
        history=dict(
            loss=[1.0] * epochs,
            train_accuracy_flipped=list(np.linspace(0.1, flipped, epochs)),
            train_accuracy_unflipped=[0.8, 0.9, 0.95],
        ),
    )


def _noise_study():
    runs = []
    for noise in (0.0, 0.4):
        # Seed 0 has every ρ; ρ = 0.1 wins on validation but loses on test,
        # so a report that chose on test would pick ρ = 0.05.
        runs.append(_run("SGD", noise, 0, 0.70, 0.50, flipped=0.9))
        runs.append(_run("SAM", noise, 0, 0.76, 0.58, rho=0.05, flipped=0.3))
        runs.append(_run("SAM", noise, 0, 0.75, 0.60, rho=0.1, flipped=0.2))
        for seed, gain in ((1, 0.04), (2, 0.06)):
            runs.append(_run("SGD", noise, seed, 0.70, 0.5, flipped=0.9))
            runs.append(
                _run("SAM", noise, seed, 0.70 + gain, 0.6, 0.1, flipped=0.2)
            )
    return runs


def test_rho_is_chosen_on_seed_zero_validation_not_on_test():
    assert report_results.selected_rhos(_noise_study()) == {0.0: 0.1, 0.4: 0.1}


def test_noise_table_compares_at_the_chosen_rho_paired_by_seed():
    table = report_results.noise_table(_noise_study())
    d = np.array([5.0, 4.0, 6.0])
    ci = 4.303 * d.std(ddof=1) / np.sqrt(3)
    assert (
        f"| 40 % | 70.00 ± 0.00 | 75.00 ± 1.00 | 0.1 | +5.00 (± {ci:.2f})"
        in table
    )
    assert f"+5.00 (± {ci:.2f}) | 3 of 3 | 68.8 → 93.4 |" in table


def test_memorization_table_reports_flipped_and_other_examples():
    table = report_results.memorization_table(_noise_study())
    assert "| 40 % | 90.0 % | 20.0 % | 95.0 % | 95.0 % |" in table
    assert "| 0 % |" not in table


def test_rho_table_marks_the_choice():
    table = report_results.rho_table(_noise_study())
    assert "| 40 % | 50.0 / 70.0 | 58.0 / 76.0 | **60.0 / 75.0** |" in table


def test_clean_verdict_says_when_the_interval_excludes_zero():
    runs = _noise_study()
    assert "SAM is ahead, and the interval excludes zero" in (
        report_results.clean_verdict(runs)
    )
    for r in runs:
        if r["optimizer"] == "SAM" and r["seed"] == 1:
            r["test_accuracy"] = 0.60
    assert "within the noise" in report_results.clean_verdict(runs)


def _variants_study():
    runs = []
    for seed in range(2):
        runs.append(_run("SGD", 0.4, seed, 0.70, 0.5))
        sam = _run("SAM", 0.4, seed, 0.80, 0.6, rho=0.1)
        sam["train_cpu_seconds"] = 300.0
        runs.append(sam)
        cheap = _run("periodic k=5", 0.4, seed, 0.785, 0.6, rho=0.1)
        cheap["train_cpu_seconds"] = 140.0
        cheap["history"]["sam_fraction"] = [0.2, 0.2, 0.2]
        runs.append(cheap)
        # LookSAM at two α: α = 0.1 validates better on seed 0 and tests
        # worse, so a report that chose on test would take α = 0.7.
        for name, alpha, test, validation in (
            ("LookSAM k=5", 0.7, 0.75, 0.6),
            ("LookSAM k=5 α=0.1", 0.1, 0.72, 0.62),
        ):
            weak = _run(
                name, 0.4, seed, test, validation, 0.1, looksam_alpha=alpha
            )
            weak["train_cpu_seconds"] = 150.0
            weak["history"]["sam_fraction"] = [0.2, 0.2, 0.2]
            runs.append(weak)
        # Momentum-SAM at two ρ: ρ = 1 validates better on seed 0.
        for rho, test, validation in ((0.3, 0.71, 0.55), (1.0, 0.79, 0.58)):
            runs.append(
                _run(f"Momentum-SAM ρ={rho}", 0.4, seed, test, validation, rho)
            )
    # A resumed run's CPU time covers only part of it: left out of costs.
    resumed = _run("SAM", 0.4, 2, 0.80, 0.6, rho=0.1)
    resumed.update(train_cpu_seconds=1.0, resumed_from_step=5)
    runs.append(resumed)
    runs.append(_run("SGD", 0.4, 2, 0.70, 0.5))
    return {"study": "variants", "runs": runs}


def test_variants_cost_counts_the_extra_passes():
    sam_gain, rows, choices = report_results.variants_rows(_variants_study())
    assert sam_gain == pytest.approx(10.0)
    by_name = {r["name"]: r for r in rows}
    assert by_name["SAM"]["cost"] == pytest.approx(2.0)
    periodic = by_name["periodic k=5"]
    assert periodic["cost"] == pytest.approx(1.2)
    assert periodic["share"] == pytest.approx(0.85)
    assert periodic["sam_steps"] == pytest.approx(0.2)
    # LookSAM: one row, at the α chosen on validation.
    assert choices["LookSAM k=5"] == (0.1, {0.7: 0.6, 0.1: 0.62}, 2)
    assert by_name["LookSAM k=5 α=0.1"]["share"] == pytest.approx(0.2)
    assert [n for n in by_name if n.startswith("LookSAM")] == [
        "LookSAM k=5 α=0.1"
    ]
    # Momentum-SAM: the ρ chosen on validation, one pass per step.
    assert choices["Momentum-SAM"] == (1.0, {0.3: 0.55, 1.0: 0.58}, 2)
    assert [n for n in by_name if n.startswith("Momentum")] == [
        "Momentum-SAM ρ=1"
    ]
    assert by_name["Momentum-SAM ρ=1"]["cost"] == pytest.approx(1.0)
    assert by_name["Momentum-SAM ρ=1"]["share"] == pytest.approx(0.9)


def test_report_writes_sections_plots_and_answers_the_target(tmp_path):
    from trainers import compare_sgd_sam

    regime = dict(compare_sgd_sam.MEMORIZATION_REGIME, epochs=3)
    (tmp_path / "results_noise.json").write_text(
        json.dumps({"study": "noise", "regime": regime, "runs": _noise_study()})
    )
    (tmp_path / "results_variants.json").write_text(
        json.dumps(_variants_study())
    )
    text = report_results.run(types.SimpleNamespace(docs=str(tmp_path)))
    assert (tmp_path / "results.md").read_text() == text
    text = _flat(text)
    for png in ("label_noise", "memorization", "rho", "variants"):
        assert (tmp_path / "results" / f"{png}.png").stat().st_size > 1000
    assert "python -m benchmarks.generalization --study=noise" in text
    assert "keep ≥ 80 %" in text
    assert "Yes: periodic k=5, Momentum-SAM ρ=1." in text
    assert "ρ = 1 was chosen" in text and "one pass |" in text
    assert "The GPU results' JSON is missing" in text


def _compared(sgd_accuracy, sam_accuracy):
    def run(accuracy, sharpness, cpu):
        return dict(
            test_accuracy=accuracy,
            train_accuracy_flipped=0.5,
            train_accuracy_unflipped=0.9,
            sharpness=sharpness,
            train_wall_seconds=6.0,
            train_cpu_seconds=cpu,
            epochs=3,
            rho=0.2,
        )

    return dict(
        label_noise=0.4,
        SGD=run(sgd_accuracy, 40.0, 3.0),
        SAM=run(sam_accuracy, 4.0, 6.0),
    )


def _analysis(loss, edge, top, m_sharpness, accuracy):
    grid = [[edge] * 3, [edge, loss, edge], [edge] * 3]
    return dict(
        top_eigenvalues=[top],
        m_sharpness=m_sharpness,
        landscape_1d=[edge, loss, edge],
        landscape_2d=grid,
        alphas=[-0.5, 0.0, 0.5],
        loss=loss,
        test_accuracy=accuracy,
    )


def test_make_train_and_its_sharpness_render_from_their_json(tmp_path):
    from trainers import compare_sgd_sam

    regime = dict(compare_sgd_sam.MEMORIZATION_REGIME, epochs=3)
    (tmp_path / "results_noise.json").write_text(
        json.dumps({"study": "noise", "regime": regime, "runs": _noise_study()})
    )
    (tmp_path / "make_train.json").write_text(json.dumps(_compared(0.6, 0.8)))
    text = _flat(report_results.run(types.SimpleNamespace(docs=str(tmp_path))))
    assert "## What `make train` prints" in text
    assert "| test accuracy (clean test set) | 60.00% | 80.00% |" in text
    assert "SAM ends 20.0 points above SGD" in text
    assert (
        "(its Table 4: CIFAR-10, 40 % noise, SGD 68.8 % → SAM 93.4 %)" in text
    )
    # Without the analysis there is no sharpness page.
    assert not (tmp_path / "sharpness.md").exists()
    (tmp_path / "sharpness").mkdir()
    settings = dict(
        top_k=1,
        max_iterations=30,
        rho=0.05,
        m=128,
        landscape_radius=0.5,
        landscape_points=3,
        spectrum_steps=16,
        examples=2000,
        labels="the run's",
    )
    models = dict(
        sgd=_analysis(0.1, 2.1, 40.0, 0.08, 0.6),
        sam=_analysis(0.5, 1.0, 5.0, 0.02, 0.8),
    )
    (tmp_path / "sharpness" / "analysis.json").write_text(
        json.dumps(dict(settings=settings, models=models))
    )
    report_results.run(types.SimpleNamespace(docs=str(tmp_path)))
    page = _flat((tmp_path / "sharpness.md").read_text())
    assert "| SGD | 60.00 % | 40.0 | 0.080 | 0.100 |" in page
    assert "| SAM | 80.00 % | 5.0 | 0.020 | 0.500 |" in page
    assert "the first 2,000 training examples with the labels they" in page
    assert "a top Hessian eigenvalue 8.0× smaller than SGD's" in page
    assert "an m-sharpness 75 % smaller" in page
    assert "test accuracies 60.00 % and 80.00 %." in page
    assert "was 40.0 (SGD) and 4.0 (SAM)" in page
    # The edge of the 3 × 3 grid: 2.1 − 0.1 for SGD, 1.0 − 0.5 for SAM.
    assert "lies 2.00 above SGD's minimum and 0.50 above SAM's" in page


def test_make_train_runs_the_noise_studys_regime_at_its_chosen_rho():
    from trainers import compare_sgd_sam

    study = common.load(DOCS, "results_noise.json")
    assert study["regime"] == compare_sgd_sam.MEMORIZATION_REGIME
    _, rho = common.chosen(study["runs"], "SAM", noise=0.4)
    assert rho == compare_sgd_sam.SELECTED_RHO
    compared = common.load(DOCS, "make_train.json")
    assert compared["label_noise"] == 0.4
    assert compared["SAM"]["rho"] == rho


def test_variants_are_priced_by_the_measured_step_costs(tmp_path):
    ms = dict(
        sgd=10.0,
        sam=20.0,
        momentum_sam=10.5,
        late_phase_before=11.0,
        late_phase_during=21.0,
        looksam_5=14.0,
    )
    performance = {"timings": {"small_cnn/graph": _timing(ms)}}
    sam_gain, rows, _ = report_results.variants_rows(_variants_study())
    by_name = {r["name"]: r for r in rows}
    cost = report_results.measured_step_cost
    assert cost(by_name["SAM"], performance) == pytest.approx(2.0)
    assert cost(by_name["Momentum-SAM ρ=1"], performance) == pytest.approx(1.05)
    assert cost(by_name["LookSAM k=5 α=0.1"], performance) == pytest.approx(1.4)
    # 20 % of the steps at 2.1, the others at 1.1.
    periodic = by_name["periodic k=5"]
    assert cost(periodic, performance) == pytest.approx(0.2 * 2.1 + 0.8 * 1.1)
    assert cost(periodic, None) is None
    (tmp_path / "performance.json").write_text(json.dumps(performance))
    text = _flat(
        report_results.variants_section(
            _variants_study(), str(tmp_path), performance
        )
    )
    assert "| 1.20× | 1.30× |" in text  # periodic: counted, priced
    assert "Momentum-SAM ρ=1 1.05×, periodic k=5 1.30×" in text
    # Counted, periodic k=5 costs 1.2×; priced, 1.30×: over the target.
    assert "Yes: periodic k=5, Momentum-SAM ρ=1." in text
    assert "keep ≥ 80 % are: Momentum-SAM ρ=1." in text


def test_report_without_the_noise_study_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="--study=noise"):
        report_results.run(types.SimpleNamespace(docs=str(tmp_path)))


def _timing(ms, wall_factor=1.0):
    """A step_time cell per contender from CPU ms; wall ms = factor × CPU."""

    def clock(value, sgd):
        return {
            "median_step_ms": value,
            "median_ratio_to_sgd": value / sgd,
            "ratio_min": 0.9 * value / sgd,
            "ratio_max": 1.1 * value / sgd,
            "step_ms": [0.9 * value, value, 1.1 * value],
        }

    return {
        "params": 2**18,  # 1 MB of float32
        "rounds": 3,
        "steps_per_round": 1,
        "contenders": {
            name: {
                "cpu": clock(value, ms["sgd"]),
                "wall": clock(wall_factor * value, wall_factor * ms["sgd"]),
            }
            for name, value in ms.items()
        },
    }


def _processes(tensors, outside_model=None):
    """step_time's memory figures of one contender's processes (MB); the
    allocator held 0.5 to 1.5 MB more than the tensors."""
    outside_model = outside_model or [0.0] * len(tensors)
    return [
        {"tensors": t, "outside_model": o, "allocator": t + 0.5 + i / 2}
        for i, (t, o) in enumerate(zip(tensors, outside_model))
    ]


def _performance(sam_ms, wall_factor=1.0, sam_memory_mb=10.5):
    graph = dict(
        sgd=20.0,
        sam=sam_ms,
        floor_two_passes=40.0,
        sam_rho_0=20.4,
        late_phase_before=21.0,
        late_phase_during=44.0,
        periodic_5=25.0,
    )
    return {
        "machine": {"cpus": 2, "tensorflow": "2.21", "keras": "3.15"},
        "batch_size": 64,
        "threads": 1,
        "timings": {
            "small_cnn/graph": _timing(graph, wall_factor),
            "small_cnn/xla": _timing(dict(sgd=100.0, sam=110.0)),
            "small_cnn_no_dropout/graph": _timing(graph),
            "small_cnn_no_dropout/xla": _timing(
                dict(sgd=50.0, sam=100.0, late_phase_during=300.0)
            ),
        },
        "peak_memory_mb": {
            "small_cnn": {
                "params": 2**18,  # 1 MB of float32
                "modes": {
                    "graph": {
                        "sgd": _processes([10.0, 9.8, 9.9], [2.0] * 3),
                        "sam": _processes(
                            [sam_memory_mb, 10.2, 10.3], [2.5, 2.6, 2.4]
                        ),
                        "floor_two_passes": _processes(
                            [11.2, 11.2, 11.1], [2.0] * 3
                        ),
                        "momentum_sam": _processes([10.0] * 3, [2.5] * 3),
                        "naive_assign_subtract": _processes(
                            [13.0, 12.9, 13.0], [3.0] * 3
                        ),
                    },
                    "xla": {
                        "sgd": _processes([20.0]),
                        "sam": _processes([20.2]),
                        "floor_two_passes": _processes([30.0]),
                        "momentum_sam": _processes([20.0]),
                        "naive_assign_subtract": _processes([20.1]),
                    },
                },
            }
        },
        "pipeline": {
            "contenders": {
                "real_pipeline": _timing(dict(sgd=50.0, r=51.0))["contenders"][
                    "r"
                ],
                "in_memory_batch": _timing(dict(sgd=50.0))["contenders"]["sgd"],
            },
            "pipeline_alone_cpu_ms_per_batch": 0.2,
        },
    }


def _performance_report(tmp_path, first, repeat):
    from benchmarks import report_performance

    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(repeat))
    report_performance.run(
        types.SimpleNamespace(
            input=str(tmp_path / "a.json"),
            repeat_input=str(tmp_path / "b.json"),
            output_dir=str(tmp_path),
        )
    )
    return _flat((tmp_path / "performance.md").read_text())


def test_performance_report_gives_cpu_and_wall_ratios_and_the_floor(tmp_path):
    text = _performance_report(
        tmp_path, _performance(42.0, wall_factor=2.0), _performance(41.0)
    )
    # CPU-time ratio, then the wall ratio (equal here: both scale alike).
    assert "| `SAMModel` (SAM) | 2.10× (2.10×) | 2.10× (2.10×) |" in text
    assert "| SGD step, CPU ms (wall ms) | 20 (40) | 20 (20) |" in text
    assert "| small_cnn/graph | 1.050 | 1.025 | 2.0 |" in text
    assert "SAM takes at most 1.050× the floor's CPU time" in text
    # 42 / 41 apart: 2.4 %, within 5 %.
    assert "| small_cnn/graph | 2.4 % (`SAMModel` (SAM)) |" in text
    assert "agrees within 5 %" in text
    # (44 + 4 × 21) / 5 / 20 = 1.28 predicted, 25 / 20 measured.
    assert "| small_cnn/graph | every 5th step | 1.25× | 1.28× |" in text
    assert "range over 1.02–1.05×" in text
    # (10.5 − 10.0) MB over SGD is half a copy of the 1 MB of parameters;
    # the runs' SAM peaks are 10.5 and 10.5 MB.
    assert (
        "| small_cnn/graph | 1.0 | 10.0 | 10.5 (+0.50) | 11.2 (+1.20) | "
        "10.0 (+0.00) | 13.0 (+3.00) | 0.30 | 0.00 | 0.5–1.5 |"
    ) in text
    # Outside the layers, SAM's highest 2.6 MB against SGD's 2.0.
    assert (
        "| small_cnn/graph | 1.0 | 2.0 | 2.6 (+0.60) | 2.0 (+0.00) | "
        "2.5 (+0.50) | 3.0 (+1.00) |"
    ) in text
    assert (
        "Within the target of one copy: small_cnn/graph, small_cnn/xla" in text
    )
    assert "(at most +0.50 copies, small_cnn/graph)" in text
    # SAM's processes read 10.5, 10.2 and 10.3 MB.
    assert (
        "Identical processes differ by at most 0.30 MB, the two runs by at "
        "most 0.00 MB." in text
    )
    assert "More than a copy above SGD" not in text
    assert "3 processes per contender in graph mode, 1 under XLA" in text
    # Under XLA SAM's tensors are furthest above SGD's on small_cnn/xla,
    # by 0.2 MB, and so are the allocator's peaks: nothing hidden to say.
    assert "between identical processes." in text
    assert "did not show" not in text
    assert "costs 1.10× SGD with dropout and 2.00× without" in text
    assert "costs 6.00× SGD under XLA" in text
    # Deciles of 270, 300, 330 ms, and of SGD's 45, 50, 55 ms.
    assert "its steps span 276–324 ms" in text
    assert "SGD's beside them 46–54 ms" in text
    assert "**1.02×** the CPU time" in text
    assert (tmp_path / "step_time.png").stat().st_size > 1000


def test_performance_report_says_when_runs_disagree_or_sam_exceeds_the_floor(
    tmp_path,
):
    text = _performance_report(
        tmp_path,
        _performance(46.0, sam_memory_mb=11.5),
        _performance(42.0, sam_memory_mb=11.0),
    )
    assert "**Not every cell agrees within 5 %**: small_cnn/graph" in text
    # The highest of each contender's processes, SAM's 11.5 and 11.0 MB.
    assert "| 13.0 (+3.00) | 1.30 | 0.50 |" in text
    # SAM's processes peak at 11.5, 10.2 and 10.3 MB; SGD's at most 10.0.
    assert (
        "**Over the target: small_cnn/graph**, SAM's highest peak +1.50 "
        "copies above SGD's highest, its lowest +0.20."
    ) in text
    assert "Not repeated" not in text
    assert "SAM / floor ranges over 1.05–1.15 across the cells of" in text
    assert "both runs, median 1.10" in text


def test_performance_report_names_the_columns_the_repeat_lacks(tmp_path):
    repeat = _performance(42.0)
    del repeat["timings"]["small_cnn/xla"]
    text = _performance_report(tmp_path, _performance(42.0), repeat)
    assert "agrees within 5 %. **Not repeated**, so not checked: " in text
    assert "not checked: small_cnn/xla." in text


def test_a_run_is_claimed_by_one_study_process_at_a_time(tmp_path):
    from benchmarks import generalization

    run = str(tmp_path / "run")
    with generalization.claimed(run) as first:
        assert first
        with generalization.claimed(run) as second:
            assert not second
    # A lock left by a process that is gone is taken over.
    (tmp_path / "run" / ".lock").write_text("999999999")
    with generalization.claimed(run) as third:
        assert third
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_choice_at_the_edge_of_the_grid_is_said():
    note = report_results.grid_edge_note(_noise_study())
    assert note.startswith("\n\nAt 0 %, 40 % noise the chosen ρ is the largest")


def test_memory_report_says_where_sam_is_more_than_a_copy_above_sgd(tmp_path):
    first = _performance(42.0)
    graph = first["peak_memory_mb"]["small_cnn"]["modes"]["graph"]
    # SGD's processes: 10.0, 9.8, 9.9 MB, 2.0 of them outside the layers.
    graph["sam"] = _processes([11.5, 11.2, 12.0], [2.5, 2.9, 2.6])
    # Under XLA SAM's tensors 10 MB above SGD's, its allocator's peak as
    # SGD's (20.5 MB): a gap the allocator's figure hides.
    xla = first["peak_memory_mb"]["small_cnn"]["modes"]["xla"]
    xla["sam"] = [dict(tensors=30.0, outside_model=0.0, allocator=20.5)]
    text = _performance_report(tmp_path, first, _performance(42.0))
    # In the layers, in each one's highest process: 12.0 − 2.6 for SAM,
    # 10.0 − 2.0 for SGD.
    assert (
        "More than a copy above SGD: - small_cnn/graph: SAM +2.00 copies "
        "above SGD (floor +1.20, Momentum-SAM +0.00, naive port +3.00); "
        "outside the model's layers SAM holds +0.90 copies beyond SGD, in "
        "them +1.4 MB."
    ) in text
    assert (
        "under XLA a step's one large buffer takes a whole chunk, so on "
        "small_cnn/xla every contender read 20.5–30.5 MB and a 10 MB "
        "difference between SGD's and SAM's tensors did not show."
    ) in text


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def test_committed_reports_regenerate_byte_for_byte(tmp_path):
    from benchmarks import report_performance
    from benchmarks import sharded_step
    from benchmarks import torch_memory
    from benchmarks import xla_peak

    for name in os.listdir(DOCS):
        if name.endswith(".json"):
            shutil.copy(os.path.join(DOCS, name), tmp_path)
    analysis = os.path.join("sharpness", "analysis.json")
    (tmp_path / "sharpness").mkdir()
    shutil.copy(os.path.join(DOCS, analysis), tmp_path / analysis)
    report_results.run(types.SimpleNamespace(docs=str(tmp_path)))
    report_performance.run(
        types.SimpleNamespace(
            input=str(tmp_path / "performance.json"),
            repeat_input=str(tmp_path / "performance_repeat.json"),
            output_dir=str(tmp_path),
        )
    )
    torch_memory.write_markdown(
        common.load(DOCS, "torch_memory.json"), tmp_path / "torch_memory.md"
    )
    (tmp_path / "sharded_step.md").write_text(
        sharded_step.report(common.load(DOCS, "sharded_step.json"))
    )
    (tmp_path / "xla_peak.md").write_text(
        xla_peak.report(common.load(DOCS, "xla_peak.json"))
    )
    for name in (
        "results",
        "performance",
        "torch_memory",
        "sharded_step",
        "xla_peak",
        "sharpness",
    ):
        with open(os.path.join(DOCS, name + ".md")) as f:
            assert (tmp_path / f"{name}.md").read_text() == f.read(), name
    plots = ["step_time.png"] + [
        f"results/{name}.png"
        for name in ("label_noise", "memorization", "rho", "variants")
    ]
    for png in plots:
        assert (tmp_path / png).stat().st_size > 1000, png


# What may look like a measured figure in a report's code or templates:
# a number with a unit, or any decimal number.
MEASURED = re.compile(
    r"\d+(?:[.,]\d+)*\s*(?:%|MB|KB|GB|ms|×|copies|points|seconds|minutes)"
    r"|\d+\.\d+"
)
# Constants that are no measurement: the SAM paper's table, Student's t,
# the targets the reports judge against, and the contenders' settings.
ALLOWED_NAMES = {
    "PAPER_TABLE4",
    "PAPER_NOISE",
    "PAPER_SHARPNESS",
    "T_CRITICAL_95",
    "AGREEMENT",
    "FLOOR_TARGET",
    "MEMORY_TARGET",
    "COST_TARGET",
    "SHARE_TARGET",
    "LITTLE_SHARE",
    "LABELS",
    "PAPER_FASHION_MNIST",
    "MEMORIZING",
}
ALLOWED_FLOATS = {0.0, 1.0, 100.0}
# Words of the templates with digits in them that are names, not figures.
ALLOWED_WORDS = re.compile(
    r"ResNet-20|WRN-16-4|WRN-28-10|float32|int32|jax(?:-ml/jax#|/issues/)12868"
    r"|10th|90th|k − 1|1 \+ (?:f|SAM)|95 %|rho=0|L2|bfloat16|H100|H200|#12"
    r"|landscape_[12]d"
)


def measured_literals_in_code(source):
    """The string parts and decimal constants of Python `source` that
    look measured, outside ALLOWED_NAMES' values and keyword arguments
    (a plot's style)."""
    tree = ast.parse(source)
    parents = {
        child: node
        for node in ast.walk(tree)
        for child in ast.iter_child_nodes(node)
    }

    def context(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.keyword):
                return "keyword"
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in ALLOWED_NAMES
                for t in node.targets
            ):
                return "allowed"
        return None

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or context(node) == "allowed":
            continue
        if isinstance(node.value, str):
            text = node.value.replace("95 %", "")
            found += [f"{node.lineno}: {m}" for m in MEASURED.findall(text)]
        elif isinstance(node.value, float) and context(node) != "keyword":
            if node.value not in ALLOWED_FLOATS:
                found.append(f"{node.lineno}: {node.value!r}")
    return found


def measured_literals_in_template(text):
    """The digits of a template outside its fields and ALLOWED_WORDS."""
    text = ALLOWED_WORDS.sub("", re.sub(r"\{[^{}]*\}", "", text))
    return re.findall(r".{0,20}\d.{0,20}", text)


def test_the_literal_scan_finds_typed_figures():
    assert measured_literals_in_code('x = "took 73 MB, +3.87 copies"\n') == [
        "1: 73 MB",
        "1: 3.87 copies",
    ]
    assert measured_literals_in_code("y = f(a, 0.46)\n") == ["1: 0.46"]
    allowed = 'COST_TARGET = 1.25\nplot(x, alpha=0.4, label="{:.2f}×")\n'
    assert measured_literals_in_code(allowed) == []
    assert measured_literals_in_template("SAM {gain:+.2f} on ResNet-20") == []
    assert measured_literals_in_template("SGD 73.3 %, SAM") == [
        "SGD 73.3 %, SAM"
    ]


def test_no_measured_literal_in_the_reports_or_their_templates():
    benchmarks = os.path.join(ROOT, "benchmarks")
    found = {}
    for name in sorted(os.listdir(benchmarks)):
        if name.startswith("report_") and name.endswith(".py"):
            with open(os.path.join(benchmarks, name)) as f:
                found[name] = measured_literals_in_code(f.read())
    templates = os.path.join(benchmarks, "templates")
    for name in sorted(os.listdir(templates)):
        with open(os.path.join(templates, name)) as f:
            found[name] = measured_literals_in_template(f.read())
    assert {k: v for k, v in found.items() if v} == {}
    assert len(found) >= 4


_REGIME = dict(
    model="mlp",
    train_examples=40,
    validation_examples=20,
    epochs=3,
    batch_size=8,
    learning_rate=0.05,
    weight_decay=5e-4,
)


def test_a_missing_json_leaves_its_section_out(tmp_path):
    (tmp_path / "results_noise.json").write_text(
        json.dumps(
            {"study": "noise", "regime": _REGIME, "runs": _noise_study()}
        )
    )
    text = report_results.run(types.SimpleNamespace(docs=str(tmp_path)))
    assert "## Test accuracy against label noise" in text
    assert "## Variants" not in text
    # Without docs/report_facts.json, the paragraphs that quote it go.
    text = _performance_report(tmp_path, _performance(42.0), None)
    assert "What was cut" not in text and "What is left" not in text
    assert "The repeated run is missing" in text
    with open(os.path.join(DOCS, "performance.md")) as f:
        assert "What was cut" in f.read()


def test_wrapping_keeps_tables_code_and_lists_and_starts_no_list_item():
    text = (
        "aaaa bbbb + cccc dddd eeee 12. ffff\n\n| a | b |\n|---|---|\n"
        "\n```sh\nlong command line that stays whole\n```\n- an item"
    )
    # Broken at 9 columns, "+ cccc" and "12. ffff" would start list items.
    assert common.wrap(text, 9) == (
        "aaaa bbbb + cccc\ndddd eeee 12. ffff\n\n| a | b |\n|---|---|\n"
        "\n```sh\nlong command line that stays whole\n```\n- an item"
    )
