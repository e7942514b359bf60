"""Writes docs/results.md and docs/sharpness.md from the studies' JSON.

    python -m benchmarks.report_results

reads docs/results_noise.json, docs/results_variants.json,
docs/results_cnn.json, docs/performance.json, docs/make_train.json and
the others `run` names (a section whose JSON is missing is left out) and
writes docs/results.md and docs/results/*.png, and from
docs/sharpness/analysis.json docs/sharpness.md. The prose is
`benchmarks/templates/{results,sharpness}.md`; see
`benchmarks.report_common`.
"""

import os

import numpy as np
from absl import app
from absl import flags

from benchmarks import report_cnn
from benchmarks import report_common as common
from benchmarks import report_gpu
from trainers import checkpoint
from trainers import compare_sgd_sam

FLAGS = flags.FLAGS

# Below this share of SAM's gain, a method keeps little of it.
LITTLE_SHARE = 0.5
COMMANDS = {
    "noise": "python -m benchmarks.generalization --study=noise "
    "--output=docs/results_noise.json",
    "variants": "python -m benchmarks.generalization --study=variants "
    "--seeds=5 --output=docs/results_variants.json",
    "report": "python -m benchmarks.report_results",
    "make_train": "make train && cp runs/compare_sgd_sam/comparison.json "
    "docs/make_train.json",
    "sharpness": "python -m trainers.analyze --run_data \\\n"
    "    --checkpoint=runs/compare_sgd_sam/sgd/model.keras \\\n"
    "    --compare=runs/compare_sgd_sam/sam/model.keras \\\n"
    "    --data_dir=/usr/share/datasets/fashion-mnist --num_examples=2000 \\\n"
    "    --max_iterations=30 --spectrum_steps=16 --landscape_points=11 \\\n"
    "    --output_dir=docs/sharpness",
}
MOMENTUM_SAM = "Momentum-SAM"
LOOKSAM = "LookSAM k=5"
# The variants trained at several values of one setting: each is one row,
# at the value of its best first-seed validation accuracy, named with it;
# its runs are those whose names start with the variant's. {variant:
# (setting, its symbol, the template block that states the choice)}
CHOSEN_SETTINGS = {
    MOMENTUM_SAM: ("rho", "ρ", "momentum_note"),
    LOOKSAM: ("looksam_alpha", "α", "looksam_note"),
}
# The per-step cost table the variants are priced with, and its cells.
PRICED_ON = "small_cnn/graph"


def define_flags():
    flags.DEFINE_string(
        "docs", "docs", "Where the JSON is and the report goes."
    )


def _whole(runs):
    """The runs that trained in one process: their history covers every
    epoch and their times the whole run (a resumed run's cover the rest)."""
    return [r for r in runs if not r.get("resumed_from_step")]


def _grid(runs):
    return sorted({r["rho"] for r in common.select(runs, "SAM")})


def _rates(runs):
    return sorted({r["label_noise"] for r in runs})


def selected_rhos(runs):
    """{noise: SAM's `common.chosen` ρ} at each rate that has SAM's runs."""
    chosen = {n: common.chosen(runs, "SAM", n)[1] for n in _rates(runs)}
    return {n: rho for n, rho in chosen.items() if rho is not None}


def _groups(runs, noise, rho):
    """SGD's runs at `noise`, and SAM's at `rho`."""
    return common.select(runs, "SGD", noise), common.select(
        runs, "SAM", noise, rho
    )


def noise_table(runs):
    """The rows of the analogue of the paper's Table 4, one per rate."""
    rows = []
    for noise, rho in selected_rhos(runs).items():
        sgd, sam = (common.by_seed(g) for g in _groups(runs, noise, rho))
        d = common.paired_difference(sgd, sam)
        paper = common.PAPER_NOISE.get(round(noise, 2))
        rows.append(
            common.row(
                common.percent(noise),
                common.mean_sd(sgd.values()),
                common.mean_sd(sam.values()),
                rho,
                f"{d['mean']:+.2f} (± {d['ci']:.2f})",
                f"{d['wins']} of {d['n']}",
                f"{paper[0]} → {paper[1]}" if paper else "—",
            )
        )
    return "\n".join(rows)


def memorization_table(runs):
    """Final training accuracy on the flipped and on the other examples."""
    return "\n".join(
        common.row(
            common.percent(noise),
            *(
                common.mean_percent(group, key)
                for key in (
                    "train_accuracy_flipped",
                    "train_accuracy_unflipped",
                )
                for group in _groups(runs, noise, rho)
            ),
        )
        for noise, rho in selected_rhos(runs).items()
        if noise > 0
    )


def rho_table(runs):
    """First seed's validation and test accuracy at every ρ, by noise."""
    chosen = selected_rhos(runs)
    rows = []
    for noise in _rates(runs):
        cells = [common.percent(noise)]
        for rho in [None] + _grid(runs):
            name = "SGD" if rho is None else "SAM"
            first = common.on_first_seed(
                common.select(runs, name, noise, rho), runs
            )
            cell = common.accuracies(first[0]) if first else "—"
            if rho is not None and np.isclose(chosen.get(noise, -1), rho):
                cell = f"**{cell}**"
            cells.append(cell)
        rows.append(common.row(*cells))
    header = ["label noise", "SGD"] + [f"ρ = {rho}" for rho in _grid(runs)]
    return common.table(header, rows)


def grid_edge_note(runs):
    """Says, as a paragraph of its own, where the chosen ρ is the largest
    of the grid; "" where it is nowhere."""
    top = _grid(runs)[-1]
    edge = [n for n, rho in selected_rhos(runs).items() if rho == top]
    if not edge:
        return ""
    rates = ", ".join(common.percent(n) for n in edge)
    note = common.snippet("results", "edge_note", rates=rates, rho=top)
    return "\n\n" + note.rstrip("\n")


def clean_verdict(runs):
    rhos = selected_rhos(runs)
    if 0.0 not in rhos:
        return "The clean-label runs are missing."
    sgd, sam = (common.by_seed(g) for g in _groups(runs, 0.0, rhos[0.0]))
    d = common.paired_difference(sgd, sam)
    if d["mean"] - d["ci"] > 0:
        verdict = "SAM is ahead, and the interval excludes zero"
    elif d["mean"] + d["ci"] < 0:
        verdict = "SAM is behind, and the interval excludes zero"
    else:
        verdict = f"the difference is within the noise of {d['n']} seeds"
    return common.snippet(
        "results", "clean_verdict", rho=rhos[0.0], verdict=verdict, **d
    )


def plot_noise(runs, regime, path):
    fig, ax = common.pyplot().subplots(figsize=(5, 3.5))
    for name, marker in (("SGD", "o"), ("SAM", "s")):
        xs, means = [], []
        for noise, rho in selected_rhos(runs).items():
            group = _groups(runs, noise, rho)[name == "SAM"]
            values = [100 * r["test_accuracy"] for r in group]
            xs.append(100 * noise)
            means.append(np.mean(values))
            ax.scatter([xs[-1]] * len(values), values, marker=marker, alpha=0.4)
        ax.plot(xs, means, marker=marker, label=name)
    ax.set_xlabel("label noise, %")
    ax.set_ylabel("clean test accuracy, %")
    ax.set_title(
        f"Fashion-MNIST, {regime['model'].upper()}, "
        f"{regime['train_examples']:,} examples, {regime['epochs']} epochs"
    )
    ax.legend()
    common.save(fig, path)


def plot_memorization(runs, path):
    rhos = {n: r for n, r in selected_rhos(runs).items() if n > 0}
    fig, axes = common.pyplot().subplots(
        1, len(rhos), figsize=(3.2 * len(rhos), 3.2), sharey=True
    )
    axes = np.atleast_1d(axes)
    for ax, (noise, rho) in zip(axes, rhos.items()):
        for name, group, color in zip(
            ("SGD", "SAM"), _groups(runs, noise, rho), ("tab:red", "tab:blue")
        ):
            for what, style in (("flipped", "-"), ("unflipped", "--")):
                key = f"train_accuracy_{what}"
                history = [r["history"][key] for r in _whole(group)]
                curve = 100 * np.mean(history, axis=0)
                label = f"{name}, {'other' if what == 'unflipped' else what}"
                epochs = range(1, len(curve) + 1)
                ax.plot(epochs, curve, style, color=color, label=label)
        ax.set_title(f"{common.percent(noise)} noise")
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("training accuracy on the given labels, %")
    axes[-1].legend(fontsize=7)
    common.save(fig, path)


def plot_rho(runs, path):
    fig, ax = common.pyplot().subplots(figsize=(5, 3.5))
    for noise in _rates(runs):
        values = []
        for rho in _grid(runs):
            first = common.on_first_seed(
                common.select(runs, "SAM", noise, rho), runs
            )
            values.append(
                100 * first[0]["validation_accuracy"] if first else np.nan
            )
        label = common.percent(noise)
        line = ax.plot(_grid(runs), values, marker="o", label=label)[0]
        sgd = common.on_first_seed(common.select(runs, "SGD", noise), runs)
        if sgd:
            y = 100 * sgd[0]["validation_accuracy"]
            ax.axhline(y, color=line.get_color(), linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("ρ")
    ax.set_ylabel("validation accuracy (noisy labels), %")
    ax.set_title(f"SAM by ρ, seed {common.first_seed(runs)} (dotted: SGD)")
    ax.legend(title="label noise", fontsize=7)
    common.save(fig, path)


def variants_rows(variants):
    """Gain and cost of every method of the variants study against SGD.

    Gains are paired differences of test accuracy to SGD (points). The
    cost is counted, not timed: `1 + f`, with `f` the fraction of steps
    that ran the perturbed pass (the logged `sam_fraction`; 1 for SAM and
    GSAM), in SGD steps: what a compute-bound step pays.
    """
    runs, choices = _with_chosen_settings(variants["runs"])
    sgd = common.by_seed(common.select(runs, "SGD"))
    sam_gain = common.paired_difference(
        sgd, common.by_seed(common.select(runs, "SAM"))
    )
    sam_gain = sam_gain["mean"]
    rows = []
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        if name == "SGD":
            continue
        group = common.select(runs, name)
        gain = common.paired_difference(sgd, common.by_seed(group))
        sam_steps = common.sam_fraction(group)
        # Momentum-SAM's only pass is its perturbed pass.
        one_pass = _variant(name) == MOMENTUM_SAM
        rows.append(
            dict(
                name=name,
                accuracy=common.mean_sd(common.by_seed(group).values()),
                gain=gain["mean"],
                gain_ci=gain["ci"],
                share=gain["mean"] / sam_gain if sam_gain > 0 else np.nan,
                sam_steps=np.nan if one_pass else sam_steps,
                cost=1.0 if one_pass else 1.0 + sam_steps,
            )
        )
    return sam_gain, rows, choices


def _variant(name):
    """The variant of `CHOSEN_SETTINGS` that a row's name starts with, or
    the name."""
    return next((v for v in CHOSEN_SETTINGS if name.startswith(v)), name)


def _with_chosen_settings(runs):
    """The runs with each variant of `CHOSEN_SETTINGS` at its chosen value
    only, renamed to the variant, its setting's symbol and that value;
    and the choices, `{variant: (value, {value: validation accuracy on
    the first seed}, seeds)}`. A tie goes to the first value trained."""
    choices = {}
    for name, (setting, symbol, _) in CHOSEN_SETTINGS.items():
        runs = [
            dict(r, optimizer=name) if r["optimizer"].startswith(name) else r
            for r in runs
        ]
        first = common.on_first_seed(common.select(runs, name), runs)
        if not first:
            continue
        value = common.best_on_validation(first)["settings"][setting]
        row = f"{name} {symbol}={value:g}"
        runs = [
            dict(r, optimizer=row) if r["optimizer"] == name else r
            for r in runs
            if r["optimizer"] != name or r["settings"][setting] == value
        ]
        candidates = {
            r["settings"][setting]: r["validation_accuracy"] for r in first
        }
        seeds = len(common.select(runs, row))
        choices[name] = (value, candidates, seeds)
    return runs, choices


def measured_step_cost(row, performance):
    """A method's CPU time per step over SGD's, from the per-step table.

    SAM, GSAM, Momentum-SAM and LookSAM (k = 5, as in the study) have
    cells of their own; a switching policy that took SAM on a fraction f
    of the steps costs f SAM steps behind its switch (late-phase SAM
    during its phase) and 1 − f declined steps (before it). None when the
    table lacks the cells.
    """
    cells = common.step_costs(performance, PRICED_ON)
    own = {
        "SAM": "sam",
        "GSAM": "gsam",
        MOMENTUM_SAM: "momentum_sam",
        LOOKSAM: "looksam_5",
    }
    variant = _variant(row["name"])
    if variant in own:
        return cells.get(own[variant])
    if "late_phase_during" not in cells or "late_phase_before" not in cells:
        return None
    f = row["sam_steps"]
    return f * cells["late_phase_during"] + (1 - f) * cells["late_phase_before"]


def plot_variants(rows, path):
    fig, ax = common.pyplot().subplots(figsize=(5, 3.5))
    for row in rows:
        ax.scatter(row["cost"], row["gain"])
        ax.annotate(row["name"], (row["cost"], row["gain"]), fontsize=7)
    sam = next(r for r in rows if r["name"] == "SAM")
    ax.axvline(common.COST_TARGET, color="grey", linestyle=":")
    ax.axhline(common.SHARE_TARGET * sam["gain"], color="grey", linestyle=":")
    ax.set_xlabel("cost, SGD steps (1 + fraction of SAM steps)")
    ax.set_ylabel("test accuracy gain over SGD, points")
    ax.set_title("Variants: cost against gain (target: upper left)")
    common.save(fig, path)


def _variants_table(rows):
    return "\n".join(
        common.row(
            r["name"],
            r["accuracy"],
            f"{r['gain']:+.2f} (± {r['gain_ci']:.2f})",
            common.percent(r["share"]),
            "one pass"
            if np.isnan(r["sam_steps"])
            else common.percent(r["sam_steps"]),
            f"{r['cost']:.2f}×",
            "—" if r["step_cost"] is None else f"{r['step_cost']:.2f}×",
        )
        for r in rows
    )


def _reaching(rows, cost="cost"):
    return [
        r["name"]
        for r in rows
        if r["name"] != "SAM"
        and r[cost] <= common.COST_TARGET
        and r["share"] >= common.SHARE_TARGET
    ]


def _answer(rows, reached, sam_gain):
    """Yes or No, and whether the gains' intervals agree with a Yes."""
    if not reached:
        return "No"
    target = common.SHARE_TARGET * sam_gain
    unsure = [
        r["name"]
        for r in rows
        if r["name"] in reached and r["gain"] - r["gain_ci"] < target
    ]
    if not unsure:
        return "Yes: " + ", ".join(reached)
    return (
        f"On the point estimates, yes: {', '.join(reached)}; the 95 % "
        f"interval of the gain of {', '.join(unsure)} reaches below "
        f"{common.percent(common.SHARE_TARGET)} of SAM's"
    )


def _closest(rows):
    others = [r for r in rows if r["name"] not in ("SAM", "GSAM")]
    keeping = [r for r in others if r["share"] >= common.SHARE_TARGET]
    cheap = [r for r in others if r["cost"] <= common.COST_TARGET]
    late = [r["share"] for r in others if r["name"].startswith("late-phase")]
    said = []
    for name, group, best in (
        ("cheapest", keeping, lambda g: min(g, key=lambda r: r["cost"])),
        ("best_cheap", cheap, lambda g: max(g, key=lambda r: r["share"])),
    ):
        if group:
            r = best(group)
            said.append(
                common.snippet("results", name, name=r["name"])
                + f" ({common.percent(r['share'])} at {r['cost']:.2f}×)"
            )
    if late and max(late) < LITTLE_SHARE:
        said.append(common.snippet("results", "late_phase"))
    return ("Closest: " + "; ".join(said) + ".") if said else ""


def _priced_answer(rows):
    priced = sorted(
        (r for r in rows if r["step_cost"] is not None),
        key=lambda r: r["step_cost"],
    )
    if not priced:
        return ""
    return common.snippet(
        "results",
        "priced_answer",
        priced_on=PRICED_ON,
        listed=", ".join(f"{r['name']} {r['step_cost']:.2f}×" for r in priced),
        reached=", ".join(_reaching(priced, "step_cost")) or "none",
    )


def variants_section(variants, figures, performance=None):
    """The variants section's text; draws its plot."""
    data = dict(variants=variants, figures=figures, performance=performance)
    fields = _variants(data)
    return common.wrap(common.snippet("results", "variants", **fields))


def _variants(data):
    """The variants section."""
    variants = data["variants"]
    sam_gain, rows, choices = variants_rows(variants)
    for row in rows:
        row["step_cost"] = measured_step_cost(row, data["performance"])
    plot_variants(rows, os.path.join(data["figures"], "variants.png"))
    runs = variants["runs"]
    notes = {block: "" for _, _, block in CHOSEN_SETTINGS.values()}
    for name, (value, candidates, seeds) in choices.items():
        _, symbol, block = CHOSEN_SETTINGS[name]
        listed = ", ".join(
            f"{symbol} = {v:g}: {100 * a:.2f} %"
            for v, a in sorted(candidates.items())
        )
        notes[block] = common.snippet(
            "results",
            block,
            value=value,
            first_seed=common.first_seed(runs),
            seeds=seeds,
            candidates=listed,
        )
    reached = _reaching(rows)
    sam = next(r for r in rows if r["name"] == "SAM")
    return dict(
        noise=common.percent(runs[0]["label_noise"]),
        rho=common.select(runs, "SAM")[0]["rho"],
        seeds=len(common.select(runs, "SAM")),
        **notes,
        command=COMMANDS["variants"],
        report_command=COMMANDS["report"],
        rows=_variants_table(rows),
        priced_on=PRICED_ON,
        sam_cost=sam["cost"],
        sam_gain=sam_gain,
        answer=_answer(rows, reached, sam_gain),
        closest=_closest(rows),
        priced_answer=_priced_answer(rows),
    )


def _regime(data):
    runs = data["noise"]["runs"]
    seeds = sorted({r["seed"] for r in runs})
    return dict(
        data["noise"]["regime"],
        command=COMMANDS["noise"],
        grid=", ".join(f"{rho}" for rho in _grid(runs)),
        first_seed=seeds[0],
        other_seeds=" and ".join(f"{s}" for s in seeds[1:]),
        seeds=len(seeds),
    )


def _noise(data):
    runs = data["noise"]["runs"]
    plot_noise(runs, data["noise"]["regime"], data["figure"]("label_noise"))
    return dict(
        paper=common.PAPER_TABLE4,
        seeds=len({r["seed"] for r in runs}),
        rows=noise_table(runs),
    )


def _memorization(data):
    runs = data["noise"]["runs"]
    plot_memorization(runs, data["figure"]("memorization"))
    return dict(rows=memorization_table(runs))


def _make_train(data):
    compared = data["make_train"]
    noise = compared["label_noise"]
    paper = ""
    paper_row = common.PAPER_NOISE.get(round(noise, 2))
    if paper_row:
        sgd, sam = paper_row
        paper = common.snippet(
            "results",
            "make_train_paper",
            **common.PAPER_TABLE4,
            noise=common.percent(noise),
            sgd=sgd,
            sam=sam,
        )
    return dict(
        command=COMMANDS["make_train"],
        noise=common.percent(noise),
        table=compare_sgd_sam.format_table(compared),
        summary=compare_sgd_sam.summary(compared),
        paper=paper,
    )


def _sharpness(data):
    """docs/sharpness.md's fields: the analysis of `make train`'s models,
    with the settings it ran with."""
    analysis, compared = data["sharpness"], data["make_train"]
    settings, models = analysis["settings"], analysis["models"]
    sgd, sam = models["sgd"], models["sam"]
    rows = [
        common.row(
            name.upper(),
            f"{100 * m['test_accuracy']:.2f} %",
            f"{m['top_eigenvalues'][0]:.1f}",
            f"{m['m_sharpness']:.3f}",
            f"{m['loss']:.3f}",
        )
        for name, m in models.items()
    ]
    change = sam["m_sharpness"] / sgd["m_sharpness"] - 1
    smaller = "smaller" if change < 0 else "larger"
    m_change = f"{common.percent(abs(change))} {smaller}"

    def edge_rise(m):
        grid = np.array(m["landscape_2d"])
        edge = np.concatenate(
            [grid[0], grid[-1], grid[1:-1, 0], grid[1:-1, -1]]
        )
        return float(edge.mean() - m["loss"])

    labels = "their true labels"
    if settings["labels"] != "true":
        labels = "the labels they trained on, the random ones included"
    return dict(
        settings,
        commands="\n".join([COMMANDS["make_train"], COMMANDS["sharpness"]]),
        noise=common.percent(compared["label_noise"]),
        train_rho=compared["SAM"]["rho"],
        labels=labels,
        rows="\n".join(rows),
        make_train=compared,
        make_train_sgd_accuracy=100 * compared["SGD"]["test_accuracy"],
        make_train_sam_accuracy=100 * compared["SAM"]["test_accuracy"],
        ratio=sgd["top_eigenvalues"][0] / sam["top_eigenvalues"][0],
        m_change=m_change,
        paper=common.PAPER_SHARPNESS,
        rise_sgd=edge_rise(sgd),
        rise_sam=edge_rise(sam),
    )


def _rho(data):
    runs = data["noise"]["runs"]
    plot_rho(runs, data["figure"]("rho"))
    return dict(
        first_seed=common.first_seed(runs),
        table=rho_table(runs),
        edge_note=grid_edge_note(runs),
    )


# (template, the JSON it needs, its fields): a section for each study.
SECTIONS = [
    ("intro", (), lambda data: dict(command=COMMANDS["report"])),
    ("regime", ("noise",), _regime),
    ("noise", ("noise",), _noise),
    ("memorization", ("noise",), _memorization),
    ("make_train", ("make_train",), _make_train),
    ("rho", ("noise",), _rho),
    (
        "clean",
        ("noise",),
        lambda d: dict(text=clean_verdict(d["noise"]["runs"])),
    ),
    ("variants", ("variants",), _variants),
    ("cnn", ("cnn",), report_cnn.section),
    ("cnn_memorizing", ("cnn_memorizing",), report_cnn.probe_section),
    ("gpu", (), report_gpu.missing),
    ("gpu_results", ("gpu_step_time", "facts"), report_gpu.section),
]
SHARPNESS_SECTIONS = [("intro", ("sharpness", "make_train"), _sharpness)]


def run(flags_obj):
    docs = flags_obj.docs
    figures = os.path.join(docs, "results")
    data = dict(
        noise=common.load(docs, "results_noise.json"),
        variants=common.load(docs, "results_variants.json"),
        cnn=common.load(docs, "results_cnn.json"),
        cnn_memorizing=common.load(docs, "results_cnn_memorizing.json"),
        cnn_epoch_time=common.load(docs, "cnn_epoch_time.json"),
        make_train=common.load(docs, "make_train.json"),
        sharpness=common.load(docs, "sharpness", "analysis.json"),
        performance=common.load(docs, "performance.json"),
        gpu_step_time=common.load(docs, "gpu_step_time.json"),
        gpu_pair=common.load(docs, "gpu_pair.json"),
        facts=common.load(docs, common.FACTS),
        figures=figures,
        figure=lambda name: os.path.join(figures, name + ".png"),
    )
    if data["noise"] is None and data["variants"] is None:
        raise FileNotFoundError(
            f"{docs} has no study's JSON: run `{COMMANDS['noise']}` first."
        )
    os.makedirs(figures, exist_ok=True)
    text = common.render("results", SECTIONS, data)
    checkpoint.write_text(os.path.join(docs, "results.md"), text)
    if data["sharpness"] and data["make_train"]:
        checkpoint.write_text(
            os.path.join(docs, "sharpness.md"),
            common.render("sharpness", SHARPNESS_SECTIONS, data),
        )
    return text


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
