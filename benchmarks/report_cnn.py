"""The CNN regime's section of docs/results.md (issue #28).

Its runs are `benchmarks.generalization --study=cnn`'s; a study in
progress is collected with `--notrain` and reported as far as it goes:
each question is answered once its runs exist, and says which are missing
until then.
"""

import numpy as np

from benchmarks import report_common as common

# The SAM paper, not a measurement: Fashion-MNIST, WRN-28-10, 200 epochs,
# basic augmentation, test error (%) of SGD and SAM.
PAPER_FASHION_MNIST = {
    "model": "WRN-28-10",
    "epochs": 200,
    "sgd": 4.57,
    "sam": 3.98,
}
# The paper's Table 4 at 40 % noise, beside the CNN's: SGD → SAM.
PAPER_NOISE = dict(
    noise=common.percent(0.4),
    setting="{data} {model}".format(**common.PAPER_TABLE4),
    epochs=common.PAPER_TABLE4["epochs"],
    sgd=common.PAPER_NOISE[0.4][0],
    sam=common.PAPER_NOISE[0.4][1],
)
# SGD memorizes when it fits more of the flipped examples' wrong labels
# than this (chance: about a tenth, a random label).
MEMORIZING = 0.5
COMMANDS = {
    "study": "KERAS_BACKEND=tensorflow python -m benchmarks.generalization "
    "--study=cnn --runs_dir=docs/results_cnn --output=docs/results_cnn.json",
    "probe": "KERAS_BACKEND=tensorflow python -m benchmarks.generalization "
    "--study=cnn_memorizing --runs_dir=docs/results_cnn_memorizing "
    "--output=docs/results_cnn_memorizing.json",
}
# The study's command collects its finished runs, training none.
COMMANDS["collect"] = COMMANDS["study"] + " --notrain"
LOOKSAM = "LookSAM k=5"
# The tables' first rows; the study's other methods follow in the order it
# trained them.
METHODS = ("SGD", "SAM", "ASAM", "Momentum-SAM", "SAM-ON", "AE-SAM", LOOKSAM)
# Each method's cell in the per-step cost table (docs/performance.md).
PRICED_ON = "resnet20/graph"
CELLS = {"SAM": "sam", "Momentum-SAM": "momentum_sam", "SAM-ON": "sam_on"}


def _methods(runs):
    """`METHODS`, then the other methods of `runs` in their order."""
    return list(dict.fromkeys([*METHODS, *(r["optimizer"] for r in runs)]))


def _alpha(run):
    """LookSAM's α of `run`, None for another method."""
    return run.get("settings", {}).get("looksam_alpha")


def _training_cpu(runs):
    """{seed: CPU seconds of the training batches} of the runs that timed
    those alone (the trainer records each epoch's figure in the history)."""
    timed = [r for r in runs if "epoch_train_cpu_seconds" in r["history"]]
    return common.by_seed(timed, "train_cpu_seconds", 1.0)


def rows(runs, noise, performance, grids=None):
    """One dict per method at `noise` that has runs: accuracy, paired gain
    over SGD, share of SAM's gain, counted and measured cost (per step from
    `performance`, per run from the runs' training CPU time over SGD's of
    the same seed), and how many of the ρ in its grid (`grids[name]`) seed
    0 has tried so far."""
    sgd_runs = common.select(runs, "SGD", noise)
    sgd, sgd_cpu = common.by_seed(sgd_runs), _training_cpu(sgd_runs)
    sam_group, _ = common.chosen(runs, "SAM", noise)
    sam_gain = {"n": 0}
    if set(sgd) & set(common.by_seed(sam_group)):
        sam_gain = common.paired_difference(sgd, common.by_seed(sam_group))
    costs = common.step_costs(performance, PRICED_ON)
    out = []
    for name in _methods(runs):
        group, rho = common.chosen(runs, name, noise)
        if not group:
            continue
        row = dict(name=name, rho=rho, seeds=len(group))
        tried = {
            r["rho"] for r in common.select(runs, name, noise) if r["seed"] == 0
        }
        row["grid"] = (len(tried), len((grids or {}).get(name, ())))
        row["by_seed"] = common.by_seed(group)
        row["accuracy"] = common.mean_sd(row["by_seed"].values())
        one_pass = name in ("SGD", "Momentum-SAM")
        row["cost"] = 1.0 + (0.0 if one_pass else common.sam_fraction(group))
        row["measured"] = costs.get(CELLS.get(name))
        cpu = _training_cpu(group)
        ratios = [cpu[s] / sgd_cpu[s] for s in set(cpu) & set(sgd_cpu)]
        row["run_cpu"] = float(np.mean(ratios)) if ratios else None
        if name != "SGD" and set(sgd) & set(row["by_seed"]):
            gain = common.paired_difference(sgd, row["by_seed"])
            row.update(gain=gain["mean"], ci=gain["ci"], pairs=gain["n"])
            # A share of a gain that may be noise (one pair, or an
            # interval reaching 0) would read as a finding.
            if _significant(sam_gain):
                row["share"] = gain["mean"] / sam_gain["mean"]
        out.append(row)
    return out


def _significant(gain):
    """Whether a `common.paired_difference` is over more than one seed and
    significantly above 0."""
    return gain["n"] > 1 and _verdict(gain["mean"], gain["ci"], "") == "yes"


def _paired(row):
    """Whether `row`'s gain is paired over more than one seed."""
    return row is not None and row.get("pairs", 0) > 1


def _beats_sgd(row):
    """Whether `row`'s gain over SGD is paired and significant."""
    return _paired(row) and _verdict(row["gain"], row["ci"], "SGD") == "yes"


def _against_sgd(row):
    """The verdict on `row`'s gain over SGD with its mean and interval in
    points, once paired over more than one seed; None before then."""
    if not _paired(row):
        return None
    verdict = _verdict(row["gain"], row["ci"], "SGD")
    return (
        f"{verdict[0].upper()}{verdict[1:]}: {row['gain']:+.2f} ± "
        f"{row['ci']:.2f} points"
    )


def _verdict(mean, ci, other):
    """Whether a paired difference (its mean and 95 % half-width) is ahead
    of `other`: "yes", "not significantly" or "no, `other` is ahead"."""
    if mean - ci > 0:
        return "yes"
    if mean + ci < 0:
        return f"no, {other} is ahead"
    return "not significantly"


def _table(rows):
    lines = []
    for r in rows:
        gain = "—"
        if "gain" in r:
            ci = "" if np.isnan(r["ci"]) else f" (± {r['ci']:.2f})"
            pairs = f"{r['pairs']} pair" + "s" * (r["pairs"] != 1)
            gain = f"{r['gain']:+.2f}{ci}, {pairs}"
        lines.append(
            common.row(
                r["name"],
                "—" if r["name"] == "SGD" else _rho_cell(r),
                r["seeds"],
                r["accuracy"],
                gain,
                common.percent(r["share"]) if "share" in r else "—",
                f"{r['cost']:.2f}×",
                "—" if r["measured"] is None else f"{r['measured']:.2f}×",
                "—" if r["run_cpu"] is None else f"{r['run_cpu']:.2f}×",
            )
        )
    return "\n".join(lines)


def grids(runs, noise):
    """Seed 0's validation / test accuracy at each ρ of each method's
    grid, the choice in bold."""
    lines = []
    sgd = [r for r in common.select(runs, "SGD", noise) if r["seed"] == 0]
    for name in _methods(runs):
        first = [r for r in common.select(runs, name, noise) if r["seed"] == 0]
        if len({r["rho"] for r in first}) < 2:
            continue
        _, rho = common.chosen(runs, name, noise)
        cells = _cells(
            sorted(first, key=lambda r: r["rho"]),
            "ρ",
            lambda r: r["rho"],
            lambda r: np.isclose(r["rho"], rho),
        )
        rhos = sorted(r["rho"] for r in first)
        edge = _edge(rhos, rho, "ρ")
        if len(rhos) > 2 and rho == rhos[0] and sgd and name != LOOKSAM:
            # Below the grid lies ρ = 0, SGD itself; not for LookSAM, whose
            # reused direction is as long at every ρ > 0.
            edge = common.snippet(
                "results",
                "cnn_grid_edge_smallest",
                sgd=common.accuracies(sgd[0]),
            )
        lines.append(f"- {name}: {cells}{edge}")
    alphas, best = looksam_alphas(runs, noise)
    if best:
        cells = _cells(alphas, "α", _alpha, lambda r: r is best)
        edge = _edge([_alpha(r) for r in alphas], _alpha(best), "α")
        lines.append(
            f"- {LOOKSAM} over α at ρ = {best['rho']:g}: {cells}{edge}"
        )
    return "\n".join(lines)


def _cells(ordered, symbol, value, is_chosen):
    """Each run's validation / test accuracy at its `value` of a grid,
    the chosen one in bold."""
    return ", ".join(
        ("**{}**" if is_chosen(r) else "{}").format(
            f"{symbol} = {value(r):g}: {common.accuracies(r)}"
        )
        for r in ordered
    )


def _edge(values, value, symbol):
    """The note that `value` is at an end of a grid of more than two
    (sorted) `values`, where the best may lie beyond; "" elsewhere."""
    if len(values) > 2 and value in (values[0], values[-1]):
        return common.snippet(
            "results",
            "cnn_grid_edge",
            end="smallest" if value == values[0] else "largest",
            symbol=symbol,
        )
    return ""


def looksam_alphas(runs, noise):
    """Seed 0's LookSAM runs at `noise` at SAM's chosen ρ, one per α, and
    the one of the best validation accuracy (a tie goes to the smallest
    α); None with fewer than two α."""
    _, rho = common.chosen(runs, "SAM", noise)
    if rho is None:
        return [], None
    alphas = sorted(
        (
            r
            for r in common.select(runs, None, noise, rho)
            if r["seed"] == 0 and _alpha(r) is not None
        ),
        key=_alpha,
    )
    if len(alphas) < 2:
        return alphas, None
    return alphas, common.best_on_validation(alphas)


def _looksam_fits(runs):
    """LookSAM's training accuracy on clean labels at each α, at its
    chosen ρ, smallest α first."""
    groups = [common.chosen(runs, name, 0.0)[0] for name in _methods(runs)]
    groups = [g for g in groups if g and _alpha(g[0]) is not None]
    return ", ".join(
        f"{common.mean_percent(g, 'train_accuracy_unflipped')} at "
        f"α = {_alpha(g[0]):g}"
        for g in sorted(groups, key=lambda g: _alpha(g[0]))
    )


def _looksam_choice(runs, by_noise):
    """At each noise rate, the α that seed 0's validation split chooses
    for LookSAM (`looksam_alphas`) and that row's gain over SGD."""
    said = []
    for noise, rows in sorted(by_noise.items()):
        _, best = looksam_alphas(runs, noise)
        if not best:
            continue
        row = _row(rows, best["optimizer"])
        gain = (
            f" ({row['gain']:+.2f} ± {row['ci']:.2f} points over SGD)"
            if _paired(row)
            else ""
        )
        said.append(f"α = {_alpha(best):g} at {common.percent(noise)}{gain}")
    return ", ".join(said) or common.snippet("results", "cnn_missing")


def _later_session(facts):
    """What the training-CPU column of methods trained in a later session
    is measured against (`docs/report_facts.json`'s `cnn_sgd_rerun`)."""
    rerun = (facts or {}).get("cnn_sgd_rerun")
    if not rerun:
        return ""
    ratio = rerun["rerun_cpu_seconds"] / rerun["committed_cpu_seconds"]
    return " " + common.snippet(
        "results",
        "cnn_later_session",
        methods=", ".join(rerun["later_methods"]),
        ratio=ratio,
        **rerun,
    )


def _rho_cell(row):
    tried, grid = row["grid"]
    if tried < grid:  # a study in progress: the choice may change
        return f"{row['rho']:g} ({tried} of {grid} tried)"
    return f"{row['rho']:g}"


def _row(rows, name):
    return next((r for r in rows if r["name"] == name), None)


def answers(by_noise):
    """The issue's four questions, each answered from the rows it needs."""
    missing = common.snippet("results", "cnn_missing")
    clean = by_noise.get(0.0, [])
    q1 = _against_sgd(_row(clean, "SAM")) or missing
    q2, q3, q4, behind = [], [], [], []
    for noise, rows in sorted(by_noise.items()):
        at = common.percent(noise)
        losing = [
            f"{r['name']} ({r['gain']:+.2f} ± {r['ci']:.2f} points)"
            for r in rows
            if _paired(r) and r["gain"] + r["ci"] < 0
        ]
        if losing:
            behind.append(f"At {at}: {', '.join(losing)}")
        msam, sam, sam_on = (
            _row(rows, n) for n in ("Momentum-SAM", "SAM", "SAM-ON")
        )
        if _paired(msam) and _paired(sam):
            cost = msam["measured"] or msam["cost"]
            if "share" in msam:
                keeps = (
                    msam["share"] >= common.SHARE_TARGET
                    and cost <= common.COST_TARGET
                )
                q2.append(
                    f"At {at}: {'yes' if keeps else 'no'} "
                    f"({common.percent(msam['share'])} of SAM's gain at "
                    f"{cost:.2f}×)"
                )
            else:
                q2.append(
                    f"At {at}: SAM has no significant gain to keep "
                    f"({sam['gain']:+.2f} ± {sam['ci']:.2f} points); "
                    f"Momentum-SAM {msam['gain']:+.2f} ± {msam['ci']:.2f} "
                    f"at {cost:.2f}×"
                )
        if _paired(sam_on) and _paired(sam):
            d = common.paired_difference(sam["by_seed"], sam_on["by_seed"])
            verdict = _verdict(d["mean"], d["ci"], "SAM")
            q3.append(
                f"At {at}: {verdict} (SAM-ON {d['mean']:+.2f} ± "
                f"{d['ci']:.2f} points against SAM, paired over "
                f"{d['n']} seeds)"
            )
        # Gain per cost ranks only real gains: a loss divided by a larger
        # cost would rank the dearer of two losing methods first.
        gains = [r for r in rows if _beats_sgd(r) and r["run_cpu"]]
        if gains:
            best = max(gains, key=lambda r: r["gain"] / r["run_cpu"])
            per_cost = best["gain"] / best["run_cpu"]
            q4.append(
                f"At {at}: {best['name']} ({per_cost:+.2f} points per SGD "
                "run's training CPU time)"
            )
        elif any(_paired(r) for r in rows):
            top = max(filter(_paired, rows), key=lambda r: r["gain"])
            q4.append(
                f"At {at}: none, no method beats SGD significantly, so SGD, "
                f"the cheapest, is the best buy (the largest mean gain: "
                f"{top['name']}, {top['gain']:+.2f} ± {top['ci']:.2f} points)"
            )
    return dict(
        q1=q1,
        q2=". ".join(q2) or missing,
        q3=". ".join(q3) or missing,
        q4=". ".join(q4) or missing,
        behind=". ".join(behind)
        or (
            "none"
            if any(_paired(r) for rows in by_noise.values() for r in rows)
            else missing
        ),
    )


def plot(runs, noise_rates, path):
    fig, axes = common.pyplot().subplots(
        1, len(noise_rates), figsize=(3.4 * len(noise_rates), 3.2)
    )
    for ax, noise in zip(np.atleast_1d(axes), noise_rates):
        for name, color in (("SGD", "tab:red"), ("SAM", "tab:blue")):
            group, _ = common.chosen(runs, name, noise)
            for key, style in (
                ("validation_accuracy", "-"),
                ("train_accuracy_flipped", ":"),
            ):
                curves = [r["history"][key] for r in group]
                if not curves or (key.endswith("flipped") and noise == 0):
                    continue
                curve = 100 * np.mean(curves, axis=0)
                label = f"{name}, {key.replace('_', ' ')}"
                epochs = range(1, len(curve) + 1)
                ax.plot(epochs, curve, style, color=color, label=label)
        ax.set_title(f"{common.percent(noise)} noise")
        ax.set_xlabel("epoch")
    np.atleast_1d(axes)[0].set_ylabel("accuracy on the given labels, %")
    np.atleast_1d(axes)[-1].legend(fontsize=6)
    common.save(fig, path)


def _study(study, performance, figure):
    """The fields that a CNN study's section and the probe's share: its
    rows by noise rate, their tables, SGD's regime, its status; the curves
    drawn to `figure`."""
    runs = study["runs"]
    noise_rates = sorted({r["label_noise"] for r in runs}, reverse=True)
    by_noise = {
        n: rows(runs, n, performance, study.get("grids")) for n in noise_rates
    }
    tables = "\n\n".join(
        common.snippet(
            "results",
            "cnn_table",
            noise=common.percent(n),
            rows=_table(by_noise[n]),
            grids=grids(runs, n) or common.snippet("results", "cnn_no_grid"),
            first_seed=min(r["seed"] for r in runs),
            priced_on=PRICED_ON,
        )
        for n in noise_rates
    )
    plot(runs, noise_rates, figure)
    noisy = common.select(runs, "SGD", max(noise_rates))
    flipped = [r["train_accuracy_flipped"] for r in noisy]
    memorizes = bool(flipped) and np.mean(flipped) > MEMORIZING
    return dict(
        study["regime"],
        by_noise=by_noise,
        tables=tables,
        memorizes=memorizes,
        noise_rates=", ".join(common.percent(n) for n in noise_rates[::-1]),
        noisiest=common.percent(max(noise_rates)),
        sgd_flipped=common.mean_percent(noisy, "train_accuracy_flipped"),
        sgd_unflipped=common.mean_percent(noisy, "train_accuracy_unflipped"),
        status=common.snippet(
            "results",
            "cnn_complete" if study.get("complete") else "cnn_in_progress",
            runs=len(runs),
        ),
        sgd_regime=common.snippet(
            "results",
            "cnn_memorizes" if memorizes else "cnn_does_not_memorize",
        ),
        priced_on=PRICED_ON,
        first_seed=min(r["seed"] for r in runs),
    )


def _has_runs(data, study):
    return bool((data.get(study) or {}).get("runs"))


def probe_section(data):
    """The fields of the `cnn_memorizing` block: the CNN regime again where
    SGD memorizes (`generalization.CNN_MEMORIZING`); None before its
    first run has finished."""
    if not _has_runs(data, "cnn_memorizing"):
        return None
    fields = _study(
        data["cnn_memorizing"],
        data["performance"],
        data["figure"]("cnn_memorizing"),
    )
    by_noise = fields.pop("by_noise")
    answers_ = answers(by_noise)
    noisy = by_noise[max(by_noise)]
    missing = common.snippet("results", "cnn_missing")
    return dict(
        fields,
        command=COMMANDS["probe"],
        paper_epochs=PAPER_NOISE["epochs"],
        sam=_against_sgd(_row(noisy, "SAM")) or missing,
        q2=answers_["q2"],
    )


def section(data):
    """The fields of the `cnn` block of templates/results.md."""
    study, performance = data["cnn"], data["performance"]
    runs = study["runs"]
    fields = _study(study, performance, data["figure"]("cnn"))
    by_noise = fields.pop("by_noise")
    noise_rates = sorted(by_noise, reverse=True)
    backends = ""
    if data.get("cnn_epoch_time"):
        epochs = data["cnn_epoch_time"]["epochs"]
        backends = common.snippet(
            "results",
            "cnn_backends",
            timed=", ".join(
                f"{mode} {e['cpu_seconds']:.1f} CPU s ({e['wall_seconds']:.1f}"
                " s wall)"
                for mode, e in epochs.items()
            ),
            fastest=min(epochs, key=lambda m: epochs[m]["cpu_seconds"]),
        )
    clean = common.select(runs, "SGD", 0.0)
    sgd_cpu = [
        seconds
        for n in noise_rates
        for seconds in _training_cpu(common.select(runs, "SGD", n)).values()
    ] or [0]
    needs = ""
    sam = _row(by_noise[max(noise_rates)], "SAM")
    if (
        noise_rates[0] > 0
        and not fields["memorizes"]
        and _paired(sam)
        and not _beats_sgd(sam)
    ):
        needs = "\n\n" + common.snippet(
            "results",
            "cnn_needs_memorization",
            noisiest=common.percent(max(noise_rates)),
            gain=f"{sam['gain']:+.2f} ± {sam['ci']:.2f} points",
            paper=PAPER_NOISE,
            probe=common.snippet(
                "results",
                "cnn_probe_below"
                if _has_runs(data, "cnn_memorizing")
                else "cnn_no_probe",
            ).rstrip("\n"),
        ).rstrip("\n")
    return dict(
        fields,
        command=COMMANDS["study"],
        needs=needs,
        collect=COMMANDS["collect"],
        backends=backends,
        sgd_clean_train=common.mean_percent(clean, "train_accuracy_unflipped"),
        later=_later_session(data.get("facts")),
        looksam_clean_train=_looksam_fits(runs),
        looksam_choice=_looksam_choice(runs, by_noise),
        sgd_cpu_low=min(sgd_cpu),
        sgd_cpu_high=max(sgd_cpu),
        paper=PAPER_FASHION_MNIST,
        paper_sgd_accuracy=100 - PAPER_FASHION_MNIST["sgd"],
        paper_sam_accuracy=100 - PAPER_FASHION_MNIST["sam"],
        paper_noise=PAPER_NOISE,
        **answers(by_noise),
    )
