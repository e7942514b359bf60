"""Writes docs/performance.md and its plot from benchmarks.step_time's JSON.

    taskset -c 0 python -m benchmarks.step_time \
        --output=docs/performance.json
    taskset -c 0 python -m benchmarks.step_time --pipeline=false \
        --output=docs/performance_repeat.json
    python -m benchmarks.report_performance

The first run gives the tables; the second, run after it on the same core
of an otherwise idle machine, repeats the timings and the memory, and the
report says, cell by cell, how far the two runs are apart. The prose is
`benchmarks/templates/performance.md`; see `benchmarks.report_common`.
"""

import os

import numpy as np
from absl import app
from absl import flags

from benchmarks import report_common as common

FLAGS = flags.FLAGS

COMMANDS = """\
taskset -c 0 python -m benchmarks.step_time --output=docs/performance.json
taskset -c 0 python -m benchmarks.step_time --pipeline=false \\
    --output=docs/performance_repeat.json
python -m benchmarks.report_performance"""
# How far two runs may be apart, per cell, for the table to be trusted;
# SAM's target over the two-pass floor; and over SGD, in parameter copies.
AGREEMENT = 0.05
FLOOR_TARGET = 1.05
MEMORY_TARGET = 1.0

LABELS = {
    "sgd": "SGD (plain `fit`)",
    "sam": "`SAMModel` (SAM)",
    "floor_two_passes": "floor: two plain forward/backward passes",
    "naive_assign_subtract": "naive port (assign ε, recompute, subtract)",
    "sam_rho_0": "`SAMModel(rho=0)`",
    "sam_micro_batches_2": "`micro_batches=2`",
    "sam_sync": "`sync_perturbations=True`",
    "asam": "ASAM",
    "gsam": "GSAM (α = 0.1)",
    "sam_on": "SAM-ON (normalization layers)",
    "momentum_sam": "Momentum-SAM",
    "late_phase_before": "late-phase SAM, before its phase",
    "late_phase_during": "late-phase SAM, during its phase",
    "periodic_2": "SAM every 2nd step",
    "periodic_5": "SAM every 5th step",
    "randomized_0.5": "randomized, p = 0.5",
    "randomized_0.2": "randomized, p = 0.2",
    "ae_sam": "AE-SAM (c = 0)",
    "looksam_5": "LookSAM (k = 5, α = 0.7)",
}
MEMORY_LABELS = {
    "sam": "SAM",
    "floor_two_passes": "floor",
    "momentum_sam": "Momentum-SAM",
    "naive_assign_subtract": "naive port",
}


def define_flags():
    flags.DEFINE_string("input", "docs/performance.json", "Benchmark JSON.")
    flags.DEFINE_string(
        "repeat_input",
        "docs/performance_repeat.json",
        "The repeated run's JSON (its agreement section is left out if the "
        "file is missing).",
    )
    flags.DEFINE_string("output_dir", "docs", "Where to write the report.")


def _snippet(name, **fields):
    return common.snippet("performance", name, **fields)


def _cell(results, key, contender, clock="cpu"):
    timing = results["timings"].get(key, {}).get("contenders", {})
    return timing.get(contender, {}).get(clock)


def _ratio(results, key, contender):
    cell = _cell(results, key, contender)
    return cell and cell["median_ratio_to_sgd"]


def _both_clocks(results, key, contender, form):
    """A cell's CPU-time figure, and its wall-time one in parentheses."""
    cpu, wall = (_cell(results, key, contender, c) for c in ("cpu", "wall"))
    return f"{form.format(**cpu)} ({form.format(**wall)})" if cpu else "—"


def _ratio_table(results, mode, title):
    keys = [k for k in results["timings"] if k.endswith("/" + mode)]
    rows = []
    for contender, label, form in [
        *(
            (c, label, "{median_ratio_to_sgd:.2f}×")
            for c, label in LABELS.items()
        ),
        ("sgd", "SGD step, CPU ms (wall ms)", "{median_step_ms:.0f}"),
    ]:
        cells = [_both_clocks(results, k, contender, form) for k in keys]
        if any(c != "—" for c in cells):
            rows.append(common.row(label, *cells))
    header = ["contender"] + [k.split("/")[0] for k in keys]
    return dict(title=title, table=common.table(header, rows)) if keys else None


def agreement(first, second, clock="cpu"):
    """Per model/mode: the largest relative gap between two runs' ratios.

    Returns `{key: (gap, contender)}` over the cells both runs have.
    """
    gaps = {}
    for key, timing in first["timings"].items():
        worst = (-1.0, None)
        for contender in timing["contenders"]:
            a = _cell(first, key, contender, clock)
            b = _cell(second, key, contender, clock)
            if a is None or b is None or contender == "sgd":
                continue
            gap = abs(a["median_ratio_to_sgd"] / b["median_ratio_to_sgd"] - 1)
            worst = max(worst, (gap, contender))
        if worst[1] is not None:
            gaps[key] = worst
    return gaps


def _agreement(data):
    first, second = data["results"], data["repeat"]
    cpu, wall = agreement(first, second), agreement(first, second, "wall")
    rows = [
        common.row(
            key,
            *(f"{100 * g:.1f} % ({LABELS[c]})" for g, c in (gap, wall[key])),
        )
        for key, gap in cpu.items()
    ]
    over = [k for k, (gap, _) in cpu.items() if gap > AGREEMENT]
    limit = common.percent(AGREEMENT)
    verdict = _snippet("agree_all", limit=limit)
    if over:
        verdict = _snippet("agree_not", limit=limit, cells=", ".join(over))
    unrepeated = [k for k in first["timings"] if k not in cpu]
    if unrepeated:
        verdict += " " + _snippet("not_repeated", cells=", ".join(unrepeated))
    return dict(rows="\n".join(rows), verdict=verdict)


def _floor_ratios(results):
    """{key: (SAM / floor, SAM − floor CPU ms)} over the cells with both."""
    ratios = {}
    for key in results["timings"] if results else ():
        sam = _cell(results, key, "sam")
        floor = _cell(results, key, "floor_two_passes")
        if sam and floor:
            ratios[key] = (
                sam["median_ratio_to_sgd"] / floor["median_ratio_to_sgd"],
                sam["median_step_ms"] - floor["median_step_ms"],
            )
    return ratios


def _overhead(data):
    results = data["results"]
    first, again = _floor_ratios(results), _floor_ratios(data["repeat"])
    rows = [
        common.row(
            key,
            f"{ratio:.3f}",
            f"{again[key][0]:.3f}" if key in again else "—",
            f"{ms:.1f}",
        )
        for key, (ratio, ms) in first.items()
    ]
    both = [r for r, _ in list(first.values()) + list(again.values())]
    low, high, middle = min(both), max(both), float(np.median(both))
    verdict = _snippet("overhead_within", high=high)
    if high > FLOOR_TARGET:
        verdict = _snippet(
            "overhead_range",
            low=low,
            high=high,
            middle=middle,
            target=FLOOR_TARGET,
        )
    one_pass = [
        _ratio(results, key, c)
        for key in results["timings"]
        for c in ("sam_rho_0", "late_phase_before")
        if _cell(results, key, c)
    ]
    return dict(
        rows="\n".join(rows),
        verdict=verdict,
        low=min(one_pass),
        high=max(one_pass),
    )


def _switching(data):
    """Periodic SAM predicted from late-phase SAM's two kinds of step."""
    results, rows = data["results"], []
    for key in results["timings"]:
        before = _ratio(results, key, "late_phase_before")
        during = _ratio(results, key, "late_phase_during")
        for k, nth in ((2, "2nd"), (5, "5th")):
            periodic = _ratio(results, key, f"periodic_{k}")
            if before and during and periodic:
                predicted = (during + (k - 1) * before) / k
                rows.append(
                    common.row(
                        key,
                        f"every {nth} step",
                        f"{periodic:.2f}×",
                        f"{predicted:.2f}×",
                    )
                )
    return dict(rows="\n".join(rows)) if rows else None


def _cells(results, **where):
    """{name: the CPU cell of (key, contender)}, or None if one is missing."""
    cells = {n: _cell(results, *place) for n, place in where.items()}
    return cells if all(cells.values()) else None


def _dropout(data):
    return _cells(
        data["results"],
        xla=("small_cnn/xla", "sgd"),
        graph=("small_cnn/graph", "sgd"),
        no_dropout=("small_cnn_no_dropout/xla", "sgd"),
        sam=("small_cnn/xla", "sam"),
        sam_no_dropout=("small_cnn_no_dropout/xla", "sam"),
    )


def _decile_span(cell):
    low, high = np.percentile(cell["step_ms"], [10, 90])
    return f"{low:.0f}–{high:.0f}"


def _switching_xla(data):
    key = "small_cnn_no_dropout/xla"
    cells = _cells(
        data["results"],
        during=(key, "late_phase_during"),
        sam=(key, "sam"),
        sgd=(key, "sgd"),
        graph=("small_cnn_no_dropout/graph", "late_phase_during"),
    )
    if cells:
        cells.update(span=_decile_span(cells["during"]))
        cells.update(sgd_span=_decile_span(cells["sgd"]))
    return cells


def memory_rows(results, figure="tensors"):
    """Per model/mode: the parameters' MB (float32) and each contender's
    `figure` (MB; see `step_time.peak_memory_mb`), one per process."""
    rows = {}
    for model, measured in (results or {}).get("peak_memory_mb", {}).items():
        size = 4 * measured["params"] / 2**20
        for mode, processes in measured["modes"].items():
            rows[f"{model}/{mode}"] = (
                size,
                {c: [p[figure] for p in runs] for c, runs in processes.items()},
            )
    return rows


def _copies_above_sgd(size, peaks, contender="sam"):
    """A contender's highest peak beyond SGD's highest, in copies."""
    return (max(peaks[contender]) - max(peaks["sgd"])) / size


def _spread(peaks):
    """The largest gap between the processes of one contender (MB)."""
    return max(max(mb) - min(mb) for mb in peaks.values())


def _repeat_gap(peaks, repeated):
    """The largest gap between two runs' highest peaks (MB)."""
    return max(abs(max(peaks[c]) - max(repeated[c])) for c in peaks)


def _contender_cells(key, size, peaks):
    return [key, f"{size:.1f}", f"{max(peaks['sgd']):.1f}"] + [
        f"{max(peaks[c]):.1f} ({_copies_above_sgd(size, peaks, c):+.2f})"
        for c in MEMORY_LABELS
    ]


def _memory_verdict(rows):
    """Where SAM's highest peak is more than a copy above SGD's highest,
    and whether even SAM's lowest process is."""
    copies = {k: _copies_above_sgd(*row) for k, row in rows.items()}
    within = [k for k, c in copies.items() if c <= MEMORY_TARGET]
    verdict = []
    if within:
        worst = max(within, key=copies.get)
        keys = ", ".join(within)
        verdict.append(
            _snippet("within", keys=keys, copies=copies[worst], worst=worst)
        )
    for key, c in copies.items():
        if c > MEMORY_TARGET:
            size, peaks = rows[key]
            lowest = (min(peaks["sam"]) - max(peaks["sgd"])) / size
            verdict.append(_snippet("over", key=key, copies=c, lowest=lowest))
    return "\n\n".join(verdict)


def _memory(data):
    rows, again = memory_rows(data["results"]), memory_rows(data["repeat"])
    allocators = memory_rows(data["results"], "allocator")
    lines = []
    for key, (size, peaks) in rows.items():
        gap = "not repeated"
        if key in again:
            gap = f"{_repeat_gap(peaks, again[key][1]):.2f}"
        unused = [
            a - t
            for c, runs in allocators[key][1].items()
            for a, t in zip(runs, peaks[c])
        ]
        cells = _contender_cells(key, size, peaks)
        cells += [f"{_spread(peaks):.2f}", gap]
        lines.append(common.row(*cells, f"{min(unused):.1f}–{max(unused):.1f}"))
    processes = {}
    for key, (_, p) in rows.items():
        mode = key.split("/")[1]
        processes[mode] = max(processes.get(mode, 0), *map(len, p.values()))
    # The row where SAM's tensors are furthest above SGD's, and whether
    # the allocator's peaks there show less than half that gap.
    xla = [k for k in rows if k.endswith("/xla")] or list(rows)
    gaps = {k: max(rows[k][1]["sam"]) - max(rows[k][1]["sgd"]) for k in xla}
    far = max(gaps, key=gaps.get)
    held = allocators[far][1]
    hidden = ""
    if max(held["sam"]) - max(held["sgd"]) < gaps[far] / 2:
        every = [mb for runs in held.values() for mb in runs]
        hidden = _snippet(
            "hidden", key=far, low=min(every), high=max(every), gap=gaps[far]
        )
    graph_allocators = [p for k, (_, p) in allocators.items() if "/graph" in k]
    return dict(
        graph_processes=processes.get("graph", 0),
        xla_processes=processes.get("xla", 0),
        graph_spread=max(map(_spread, graph_allocators), default=0.0),
        hidden=hidden.replace("\n", " "),
        rows="\n".join(lines),
        verdict=_memory_verdict(rows),
    )


def _in_layers_at_highest(tensors, outside_model):
    """In the process with the highest peak, the MB in the model's layers."""
    highest = int(np.argmax(tensors))
    return tensors[highest] - outside_model[highest]


def _over_row(key, size, peaks, held):
    """A row where SAM's peak is more than a copy above SGD's: what else
    peaks there and (in graph mode) whether SAM holds the excess outside
    the model's layers or in them."""
    held_text = ""
    if key.endswith("/graph"):
        in_layers = [
            _in_layers_at_highest(peaks[c], held[c]) for c in ("sam", "sgd")
        ]
        held_text = _snippet(
            "over_row_held",
            copies=_copies_above_sgd(size, held),
            in_layers=in_layers[0] - in_layers[1],
        )
    others = ", ".join(
        f"{MEMORY_LABELS[c]} {_copies_above_sgd(size, peaks, c):+.2f}"
        for c in list(MEMORY_LABELS)[1:]
    )
    copies = _copies_above_sgd(size, peaks)
    held_text = held_text.replace("\n", " ")
    return _snippet(
        "over_row", key=key, copies=copies, others=others, held=held_text
    )


def _held(data):
    """Graph mode's tensors outside the model's layers at each peak, and
    what the tables resolve: how well the figures repeat, and the rows
    more than a copy above SGD."""
    rows, again = memory_rows(data["results"]), memory_rows(data["repeat"])
    held = memory_rows(data["results"], "outside_model")
    gaps = [
        _repeat_gap(p, again[k][1]) for k, (_, p) in rows.items() if k in again
    ]
    over = [
        _over_row(key, size, peaks, held[key][1])
        for key, (size, peaks) in rows.items()
        if _copies_above_sgd(size, peaks) > MEMORY_TARGET
    ]
    graph = [k for k in held if k.endswith("/graph")]
    return dict(
        rows="\n".join(
            common.row(*_contender_cells(k, *held[k])) for k in graph
        ),
        spread=max(_spread(peaks) for _, peaks in rows.values()),
        repeat_gap=_snippet("repeat_gap", mb=max(gaps)) if gaps else "",
        over=_snippet("over_rows", rows="\n".join(over)) if over else "",
    )


def _cut(data):
    fact = data["facts"].get("sam_peak_before_update_order")
    rows = memory_rows(data["results"])
    if fact is None or fact["key"] not in rows:
        return None
    copies = (fact["sam_mb"] - fact["sgd_mb"]) / rows[fact["key"]][0]
    return dict(fact, copies=copies)


def _pipeline(data):
    pipeline = data["results"].get("pipeline")
    if not pipeline:
        return None
    cells = {k: c["cpu"] for k, c in pipeline["contenders"].items()}
    return dict(cells, alone_ms=pipeline["pipeline_alone_cpu_ms_per_batch"])


def _plot(results, path):
    keys = list(results["timings"])
    contenders = ["sam", "floor_two_passes", "naive_assign_subtract"]
    contenders += ["momentum_sam", "late_phase_before", "sam_rho_0"]
    width = 1 / (len(contenders) + 1)
    x = np.arange(len(keys))
    fig, ax = common.pyplot().subplots(figsize=(9, 3.8))
    for i, contender in enumerate(contenders):
        cells = [_cell(results, k, contender) or {} for k in keys]
        median, low, high = (
            np.array([c.get(field, 0) for c in cells])
            for field in ("median_ratio_to_sgd", "ratio_min", "ratio_max")
        )
        label = LABELS[contender].replace("`", "")
        errors = [median - low, high - median]
        ax.bar(
            x + i * width, median, width, yerr=errors, label=label, capsize=2
        )
    ax.axhline(y=2, color="k", lw=0.8, ls="--")
    ax.axhline(y=1, color="k", lw=0.8, ls=":")
    ax.set_xticks(x + (len(contenders) - 1) * width / 2)
    ax.set_xticklabels(keys, fontsize=7, rotation=15)
    ax.set_ylabel("CPU time / SGD step's")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    common.save(fig, path)


def _span(results, key):
    counts = [t[key] for t in results["timings"].values()]
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low} to {high}"


def _intro(data):
    results, iqr = data["results"], []
    for timing in results["timings"].values():
        steps = timing["contenders"]["sgd"]["cpu"]["step_ms"]
        q1, median, q3 = np.percentile(steps, [25, 50, 75])
        iqr.append(100 * (q3 - q1) / median)
    return dict(
        results["machine"],
        commands=COMMANDS,
        batch_size=results["batch_size"],
        threads=results["threads"],
        rounds=_span(results, "rounds"),
        steps_per_round=_span(results, "steps_per_round"),
        iqr_low=min(iqr),
        iqr_high=max(iqr),
        notes="".join(f"\n> {n}\n" for n in results.get("notes", [])),
    )


# (template, the JSON it needs, its fields); a section is left out when
# its JSON is missing or its fields are None.
SECTIONS = [
    ("intro", (), _intro),
    ("ratios", (), lambda d: _ratio_table(d["results"], "graph", "graph mode")),
    (
        "ratios",
        (),
        lambda d: _ratio_table(d["results"], "xla", "XLA (`jit_compile=True`)"),
    ),
    ("dropout", (), _dropout),
    ("switching_xla", (), _switching_xla),
    ("plot", (), lambda d: {}),
    ("agreement", ("repeat",), _agreement),
    ("no_repeat", (), lambda d: {} if d["repeat"] is None else None),
    ("overhead", (), _overhead),
    ("switching", (), _switching),
    ("memory", (), lambda d: _memory(d) if memory_rows(d["results"]) else None),
    ("held", (), lambda d: _held(d) if memory_rows(d["results"]) else None),
    ("cut", ("facts",), _cut),
    ("left", ("facts",), lambda d: d["facts"].get("xla_maxpool_index_arrays")),
    ("pipeline", (), _pipeline),
]


def run(flags_obj):
    data = dict(
        results=common.load(flags_obj.input),
        repeat=common.load(flags_obj.repeat_input),
        facts=common.load(os.path.dirname(flags_obj.input), common.FACTS),
    )
    os.makedirs(flags_obj.output_dir, exist_ok=True)
    _plot(data["results"], os.path.join(flags_obj.output_dir, "step_time.png"))
    text = common.render("performance", SECTIONS, data)
    with open(os.path.join(flags_obj.output_dir, "performance.md"), "w") as f:
        f.write(text)
    return text


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
