"""What the report scripts share: JSON, templates, tables and statistics.

A report is a list of sections. A section is a block of
`benchmarks/templates/<report>.md`, which starts at a line
`<!-- section: <name> -->`, and a function that computes its fields from
the loaded JSON. `render` fills each block with `str.format` (so a field
may carry a format spec, `{gain:+.2f}`; `TARGETS` are fields of every
block) and leaves a section out when its function returns None: a study
whose JSON is missing has no section. To add one, write its block and
its function, and list the pair in the report's `SECTIONS`.

Prose holds no measured figure: every number comes from the JSON that a
measurement wrote, and the few figures a report quotes that no benchmark
JSON records are in `docs/report_facts.json`, each with its source.
"""

import json
import os
import re
import textwrap

import numpy as np

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
FACTS = "report_facts.json"
# The SAM paper's Table 4 (Foret et al., 2021), not a measurement: clean
# test accuracy (%) of SGD and SAM by label noise.
PAPER_TABLE4 = dict(table=4, data="CIFAR-10", model="ResNet-32", epochs=200)
PAPER_NOISE = {
    0.2: (84.8, 95.1),
    0.4: (68.8, 93.4),
    0.6: (48.2, 90.5),
    0.8: (26.2, 77.9),
}
# The SAM paper's sharpness at convergence (Foret et al., 2021), not a
# measurement: the top Hessian eigenvalue of a WRN.
PAPER_SHARPNESS = dict(model="WRN without BatchNorm", sgd=24, sam=1.0)
# The question a cheaper variant answers: a cost of at most COST_TARGET
# SGD steps keeping at least SHARE_TARGET of exact SAM's gain.
COST_TARGET = 1.25
SHARE_TARGET = 0.8
# Two-sided 95 % critical values of Student's t by degrees of freedom (a
# printed table's three decimals), for up to 31 seeds.
T_CRITICAL_95 = dict(
    enumerate(
        [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]
        + [2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101]
        + [2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052]
        + [2.048, 2.045, 2.042],
        start=1,
    )
)


def load(*path):
    """The JSON at `os.path.join(*path)`, or None when it is missing."""
    path = os.path.join(*path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def blocks(report):
    """{section name: template text} of `templates/<report>.md`."""
    with open(os.path.join(TEMPLATES, report + ".md")) as f:
        parts = re.split(r"^<!-- section: (\w+) -->\n", f.read(), flags=re.M)
    return {n: t.strip("\n") for n, t in zip(parts[1::2], parts[2::2])}


def render(report, sections, data):
    """The document: each `(block, needs, fields)` of `sections` filled in
    with `fields(data)`, one blank line apart, its paragraphs wrapped; a
    section is left out when its JSON (`data[n]` for each `n` in `needs`)
    is missing or `fields` returns None."""
    templates, texts = blocks(report), []
    for name, needs, fields in sections:
        values = all(data[n] is not None for n in needs) and fields(data)
        if values is not None and values is not False:
            text = templates[name].format_map(dict(TARGETS, **values))
            texts.append(text.strip("\n"))
    return wrap("\n\n".join(texts)) + "\n"


def wrap(text, width=76):
    """Wraps the paragraphs of markdown `text`; leaves code, tables,
    headings, lists, quotes and images as they are."""
    out, paragraph, code = [], [], False

    def flush():
        lines = textwrap.wrap(
            " ".join(paragraph),
            width,
            break_long_words=False,
            break_on_hyphens=False,
        )
        for i, line in enumerate(lines):
            # A line that would read as a list item stays on the one before.
            if i and re.match(r"([-+*]|\d+[.)]) ", line):
                out[-1] += " " + line
            else:
                out.append(line)
        paragraph.clear()

    for line in text.split("\n"):
        if line.startswith("```"):
            code = not code
        if code or not line.strip() or re.match(r"[|#>!`]|- ", line):
            flush()
            out.append(line)
        else:
            paragraph.append(line.strip())
    flush()
    return "\n".join(out)


def snippet(report, block, /, **fields):
    """One block filled in, for a sentence that a section chooses."""
    return blocks(report)[block].format_map(dict(TARGETS, **fields))


def row(*cells):
    """A row of a markdown table."""
    return "| " + " | ".join(f"{c}" for c in cells) + " |"


def table(header, rows):
    """A markdown table: its header's cells, then its rows (`row`)."""
    return "\n".join([row(*header), "|" + "---|" * len(header)] + rows)


def percent(fraction):
    return f"{100 * fraction:.0f} %"


# Fields that every block may quote: the targets, as its prose states them.
TARGETS = dict(cost_target=COST_TARGET, share_target=percent(SHARE_TARGET))


def accuracies(run):
    """A run's validation / test accuracy (%), as a grid of ρ shows it."""
    validation, test = run["validation_accuracy"], run["test_accuracy"]
    return f"{100 * validation:.1f} / {100 * test:.1f}"


def mean_percent(group, key):
    """The mean of `key` (a fraction) over the runs of `group` that
    recorded it, in %; "—" when none did."""
    values = [r[key] for r in group if r.get(key) is not None]
    return f"{100 * np.mean(values):.1f} %" if values else "—"


def mean_sd(values):
    v = np.array(list(values))
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.2f} ± {sd:.2f}"


def paired_difference(a, b):
    """b − a over the seeds both have: mean, 95 % CI half-width, wins.

    A paired comparison: the same seed gives both runs the same initial
    weights, label noise and data order, so the per-seed differences are
    the samples (Student's t interval). `wins` counts the seeds where b is
    above a.
    """
    seeds = sorted(set(a) & set(b))
    d = np.array([b[s] - a[s] for s in seeds])
    half = float("nan")
    if len(d) - 1 > max(T_CRITICAL_95):
        raise ValueError(
            "A paired difference has Student's t for up to "
            f"{max(T_CRITICAL_95) + 1} seeds. Received: {len(d)} seeds"
        )
    if len(d) > 1:
        half = T_CRITICAL_95[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
    return dict(
        mean=float(d.mean()), ci=float(half), wins=int(np.sum(d > 0)), n=len(d)
    )


def select(runs, optimizer, noise=None, rho=None):
    """The runs of `optimizer` (of every method when None), at label noise
    `noise` and radius `rho` when given."""
    return [
        r
        for r in runs
        if optimizer in (None, r["optimizer"])
        and (noise is None or np.isclose(r["label_noise"], noise))
        and (rho is None or np.isclose(r["rho"], rho))
    ]


def first_seed(runs):
    return min(r["seed"] for r in runs)


def on_first_seed(group, runs):
    """The runs of `group` on the first seed of the study's `runs`."""
    return [r for r in group if r["seed"] == first_seed(runs)]


def best_on_validation(runs):
    """The run of `runs` with the best validation accuracy, the first of
    them on a tie: the one rule by which every report chooses a setting
    (ρ, LookSAM's α), never on the test set."""
    return max(runs, key=lambda r: r["validation_accuracy"])


def chosen(runs, name, noise=None):
    """`name`'s runs (at label noise `noise` when given) at the ρ of its
    best validation accuracy on the first seed of `runs`, and that ρ.
    ([], None) when `name` has no run on that seed."""
    group = select(runs, name, noise)
    first = on_first_seed(group, runs)
    if not first:
        return [], None
    rho = best_on_validation(first)["rho"]
    return [r for r in group if np.isclose(r["rho"], rho)], rho


def sam_fraction(group):
    """The mean fraction of steps that ran the perturbed pass over the
    runs of `group` that logged it (`sam_fraction`; 1 when none did: SAM,
    GSAM, ASAM take it on every step)."""
    fractions = [
        np.mean(r["history"]["sam_fraction"])
        for r in group
        if "sam_fraction" in r["history"]
    ]
    return float(np.mean(fractions)) if fractions else 1.0


def step_costs(performance, key):
    """{contender: its median CPU time per step over SGD's} in the cell
    `key` (model/mode) of `benchmarks.step_time`'s JSON; {} without it."""
    if performance is None or key not in performance["timings"]:
        return {}
    contenders = performance["timings"][key]["contenders"]
    return {n: c["cpu"]["median_ratio_to_sgd"] for n, c in contenders.items()}


def by_seed(runs, key="test_accuracy", scale=100.0):
    """{seed: scale · run[key]} of the runs that recorded `key`."""
    return {r["seed"]: scale * r[key] for r in runs if r.get(key) is not None}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
