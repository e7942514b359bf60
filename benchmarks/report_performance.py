"""Writes docs/performance.md and its plot from benchmarks.step_time's JSON.

    taskset -c 0 python -m benchmarks.step_time \
        --output=docs/performance.json
    taskset -c 0 python -m benchmarks.step_time --pipeline=false \
        --output=docs/performance_repeat.json
    python -m benchmarks.report_performance

The first run gives the tables; the second, run after it on the same core
of an otherwise idle machine, repeats the timings and the memory, and the
report says, cell by cell, how far the two runs are apart.
"""

import json
import os

import numpy as np
from absl import app
from absl import flags

FLAGS = flags.FLAGS

COMMANDS = """\
taskset -c 0 python -m benchmarks.step_time --output=docs/performance.json
taskset -c 0 python -m benchmarks.step_time --pipeline=false \\
    --output=docs/performance_repeat.json
python -m benchmarks.report_performance"""

ORDINALS = {2: "2nd", 5: "5th"}
# How far two runs may be apart, per cell, for the table to be trusted.
AGREEMENT = 0.05

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


def _cell(results, key, contender, clock="cpu"):
    timing = results["timings"].get(key, {}).get("contenders", {})
    return timing.get(contender, {}).get(clock)


def _keys(results, mode):
    return [k for k in results["timings"] if k.endswith("/" + mode)]


def _ratio_table(results, mode):
    keys = _keys(results, mode)
    if not keys:
        return ""
    lines = [
        "| contender | " + " | ".join(k.split("/")[0] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for contender, label in LABELS.items():
        cells = []
        for key in keys:
            cpu = _cell(results, key, contender)
            wall = _cell(results, key, contender, "wall")
            cells.append(
                "—"
                if cpu is None
                else f"{cpu['median_ratio_to_sgd']:.2f}× "
                f"({wall['median_ratio_to_sgd']:.2f}×)"
            )
        if any(c != "—" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| SGD step, CPU ms (wall ms) | "
        + " | ".join(
            f"{_cell(results, k, 'sgd')['median_step_ms']:.0f} "
            f"({_cell(results, k, 'sgd', 'wall')['median_step_ms']:.0f})"
            for k in keys
        )
        + " |"
    )
    return "\n".join(lines)


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


def _agreement_section(first, second):
    if second is None:
        return (
            "The repeated run is missing, so the timings' agreement is not "
            "shown; run the second command above.\n"
        )
    cpu, wall = agreement(first, second), agreement(first, second, "wall")
    lines = [
        "| model / mode | largest gap, CPU-time ratios | largest gap, wall "
        "ratios |",
        "|---|---|---|",
    ]
    for key, (gap, contender) in cpu.items():
        wall_gap, wall_contender = wall[key]
        lines.append(
            f"| {key} | {100 * gap:.1f} % ({LABELS[contender]}) | "
            f"{100 * wall_gap:.1f} % ({LABELS[wall_contender]}) |"
        )
    over = [k for k, (gap, _) in cpu.items() if gap > AGREEMENT]
    verdict = (
        f"Every CPU-time cell of the two runs agrees within "
        f"{100 * AGREEMENT:.0f} %."
        if not over
        else f"**Not every cell agrees within {100 * AGREEMENT:.0f} %**: "
        + ", ".join(over)
        + "; read those columns as rough."
    )
    unrepeated = [k for k in first["timings"] if k not in cpu]
    if unrepeated:
        verdict += (
            " **Not repeated**, so not checked: " + ", ".join(unrepeated) + "."
        )
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def _overhead_table(results, repeat):
    lines = [
        "| model / mode | SAM / floor, CPU time | same, repeated run | "
        "SAM − floor, CPU ms a step |",
        "|---|---|---|---|",
    ]
    for key in results["timings"]:
        sam, floor = (
            _cell(results, key, "sam"),
            _cell(results, key, "floor_two_passes"),
        )
        if sam is None or floor is None:
            continue
        ratio = sam["median_ratio_to_sgd"] / floor["median_ratio_to_sgd"]
        again = "—"
        if repeat is not None and _cell(repeat, key, "floor_two_passes"):
            sam_again = _cell(repeat, key, "sam")["median_ratio_to_sgd"]
            floor_again = _cell(repeat, key, "floor_two_passes")
            again = f"{sam_again / floor_again['median_ratio_to_sgd']:.3f}"
        lines.append(
            f"| {key} | {ratio:.3f} | {again} | "
            f"{sam['median_step_ms'] - floor['median_step_ms']:.1f} |"
        )
    return "\n".join(lines)


def _overhead_verdict(results, repeat):
    """What the SAM / floor ratios of both runs say about the overhead."""
    ratios = []
    for run in (results, repeat):
        for key in (run or {"timings": {}})["timings"]:
            sam, floor = (
                _cell(run, key, "sam"),
                _cell(run, key, "floor_two_passes"),
            )
            if sam and floor:
                ratios.append(
                    sam["median_ratio_to_sgd"] / floor["median_ratio_to_sgd"]
                )
    if not ratios:
        return ""
    low, high, middle = min(ratios), max(ratios), float(np.median(ratios))
    earlier = (
        "An earlier version of this file read 1.3–1.5× the floor in graph "
        "mode (668 ms a WRN-16-4 step) from wall times"
    )
    if high <= 1.05:
        return (
            f"SAM takes at most {high:.3f}× the floor's CPU time. "
            f"{earlier}; measured in CPU time there is no such overhead to "
            "remove: it was the clock."
        )
    return (
        f"SAM / floor ranges over {low:.2f}–{high:.2f} across the cells of "
        f"both runs, median {middle:.2f}: on both sides of 1, as far as "
        "the two runs of one cell are apart, so no overhead over the floor "
        "stands out from this machine's noise, and the 1.05× target can "
        f"be neither confirmed nor refuted cell by cell here. {earlier}; "
        "in CPU time that overhead is gone."
    )


def _one_pass_verdict(results):
    ratios = [
        _cell(results, key, contender)["median_ratio_to_sgd"]
        for key in results["timings"]
        for contender in ("sam_rho_0", "late_phase_before")
        if _cell(results, key, contender)
    ]
    if not ratios:
        return ""
    return (
        f"Their ratios to SGD range over {min(ratios):.2f}–"
        f"{max(ratios):.2f}× across the models and modes."
    )


def memory_rows(results, figure="tensors"):
    """Per model/mode: the parameters' MB (float32) and each contender's
    `figure` (MB; see `step_time.peak_memory_mb`), one per process."""
    rows = {}
    for model, measured in results.get("peak_memory_mb", {}).items():
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


def _contender_cells(size, peaks):
    return [
        f"{max(peaks[c]):.1f} ({_copies_above_sgd(size, peaks, c):+.2f})"
        for c in MEMORY_LABELS
    ]


def _contender_header(first):
    return (
        f"| model / mode | parameters, MB | {first} | "
        + " | ".join(
            f"{label}, MB (copies)" for label in MEMORY_LABELS.values()
        )
        + " |"
    )


def _memory_table(results, repeat):
    rows = memory_rows(results)
    if not rows:
        return ""
    again = memory_rows(repeat or {})
    allocators = memory_rows(results, "allocator")
    lines = [
        _contender_header("SGD, MB")
        + " spread between processes, MB | largest gap to the repeated "
        "run, MB | allocator's peak beyond the tensors', MB |",
        "|---|---|---|" + "---|" * len(MEMORY_LABELS) + "---|---|---|",
    ]
    for key, (size, peaks) in rows.items():
        gap = "not repeated"
        if key in again:
            gap = f"{_repeat_gap(peaks, again[key][1]):.2f}"
        unused = [
            a - t
            for c, runs in allocators[key][1].items()
            for a, t in zip(runs, peaks[c])
        ]
        lines.append(
            f"| {key} | {size:.1f} | {max(peaks['sgd']):.1f} | "
            + " | ".join(_contender_cells(size, peaks))
            + f" | {_spread(peaks):.2f} | {gap} | "
            f"{min(unused):.1f}–{max(unused):.1f} |"
        )
    return "\n".join(lines)


def _held_table(results):
    """Graph mode: at each contender's peak, the tensors outside the
    model's layers."""
    rows = {
        key: row
        for key, row in memory_rows(results, "outside_model").items()
        if key.endswith("/graph")
    }
    if not rows:
        return ""
    lines = [
        _contender_header("SGD, MB"),
        "|---|---|---|" + "---|" * len(MEMORY_LABELS),
    ]
    for key, (size, held) in rows.items():
        lines.append(
            f"| {key} | {size:.1f} | {max(held['sgd']):.1f} | "
            + " | ".join(_contender_cells(size, held))
            + " |"
        )
    return "\n".join(lines)


def _memory_verdict(results):
    """Where SAM's highest peak is more than one parameter copy above
    SGD's, and whether even SAM's lowest process is."""
    rows = memory_rows(results)
    if not rows:
        return ""
    copies = {
        key: _copies_above_sgd(size, peaks)
        for key, (size, peaks) in rows.items()
    }
    within = [k for k, c in copies.items() if c <= 1.0]
    lines = []
    if within:
        worst = max(within, key=copies.get)
        lines.append(
            f"Within the target of one copy: {', '.join(within)} (at most "
            f"{copies[worst]:+.2f} copies, {worst})."
        )
    for key, c in copies.items():
        if c <= 1.0:
            continue
        size, peaks = rows[key]
        lowest = (min(peaks["sam"]) - max(peaks["sgd"])) / size
        lines.append(
            f"**Over the target: {key}**, SAM's highest peak {c:+.2f} "
            f"copies above SGD's highest, its lowest {lowest:+.2f}."
        )
    return "\n".join(lines)


def _in_layers_at_highest(tensors, outside_model):
    """In the process with the highest peak, the MB in the model's layers."""
    highest = int(np.argmax(tensors))
    return tensors[highest] - outside_model[highest]


def _memory_reading(results, repeat):
    """What the tables resolve: how well the figures repeat, and for each
    row where SAM's peak is more than a copy above SGD's, what else peaks
    there and (in graph mode) whether SAM holds the excess outside the
    model's layers or in them."""
    rows, again = memory_rows(results), memory_rows(repeat or {})
    held = memory_rows(results, "outside_model")
    if not rows:
        return ""
    spread = max(_spread(peaks) for _, peaks in rows.values())
    gaps = [
        _repeat_gap(peaks, again[key][1])
        for key, (_, peaks) in rows.items()
        if key in again
    ]
    repeats = f"Identical processes differ by at most {spread:.2f} MB" + (
        f", the two runs by at most {max(gaps):.2f} MB." if gaps else "."
    )
    lines = []
    for key, (size, peaks) in rows.items():
        if _copies_above_sgd(size, peaks) <= 1.0:
            continue
        others = ", ".join(
            f"{MEMORY_LABELS[c]} {_copies_above_sgd(size, peaks, c):+.2f}"
            for c in MEMORY_LABELS
            if c != "sam"
        )
        line = (
            f"{key}: SAM {_copies_above_sgd(size, peaks):+.2f} copies above "
            f"SGD ({others})"
        )
        if key.endswith("/graph"):
            in_layers = {
                c: _in_layers_at_highest(peaks[c], held[key][1][c])
                for c in ("sam", "sgd")
            }
            held_copies = _copies_above_sgd(size, held[key][1])
            line += (
                f"; outside the model's layers SAM holds {held_copies:+.2f} "
                "copies beyond SGD, in them "
                f"{in_layers['sam'] - in_layers['sgd']:+.1f} MB"
            )
        lines.append(f"- {line}.")
    if not lines:
        return repeats
    return repeats + " More than a copy above SGD:\n\n" + "\n".join(lines)


def _switching_check(results):
    """Periodic SAM predicted from late-phase SAM's two kinds of step."""
    lines = [
        "| model / mode | policy | measured | predicted from the two kinds "
        "of step |",
        "|---|---|---|---|",
    ]
    for key in results["timings"]:
        before = _cell(results, key, "late_phase_before")
        during = _cell(results, key, "late_phase_during")
        if before is None or during is None:
            continue
        for k in (2, 5):
            periodic = _cell(results, key, f"periodic_{k}")
            if periodic is None:
                continue
            predicted = (
                during["median_ratio_to_sgd"]
                + (k - 1) * before["median_ratio_to_sgd"]
            ) / k
            lines.append(
                f"| {key} | every {ORDINALS[k]} step | "
                f"{periodic['median_ratio_to_sgd']:.2f}× | {predicted:.2f}× |"
            )
    return "\n".join(lines)


def _xla_notes(results):
    notes = []
    with_dropout = _cell(results, "small_cnn/xla", "sgd")
    without = _cell(results, "small_cnn_no_dropout/xla", "sgd")
    graph = _cell(results, "small_cnn/graph", "sgd")
    sam = _cell(results, "small_cnn/xla", "sam")
    sam_without = _cell(results, "small_cnn_no_dropout/xla", "sam")
    if with_dropout and without and graph and sam and sam_without:
        notes.append(
            f"""**Dropout under XLA on a CPU.** The small CNN's SGD step takes
{with_dropout["median_step_ms"]:.0f} ms of CPU time under XLA against
{graph["median_step_ms"]:.0f} ms in graph mode; without its one dropout
layer, {without["median_step_ms"]:.0f} ms. XLA's CPU code for dropout's
random numbers is that slow, and SAM's two passes draw the same mask (one
seed), which XLA can compute once: so SAM costs
{sam["median_ratio_to_sgd"]:.2f}× SGD with dropout and
{sam_without["median_ratio_to_sgd"]:.2f}× without. The first
figure is not a cheap SAM but an expensive SGD; the dropout-free column is
the one to read for what SAM's second pass costs."""
        )
    during = _cell(results, "small_cnn_no_dropout/xla", "late_phase_during")
    graph_during = _cell(
        results, "small_cnn_no_dropout/graph", "late_phase_during"
    )
    if during and sam_without and graph_during:
        notes.append(
            f"""**Switching under XLA on a CPU.** A policy's SAM step runs
its perturbed pass inside a conditional, and XLA's CPU compiler runs the
weight-gradient convolutions in a conditional's branch far more slowly than
the same convolutions outside one (the same defect as
[jax-ml/jax#12868](https://github.com/jax-ml/jax/issues/12868); it shows on
TensorFlow's XLA and on JAX's). So a SAM step behind a switch costs
{during["median_ratio_to_sgd"]:.2f}× SGD under XLA, against
{sam_without["median_ratio_to_sgd"]:.2f}× for SAM without one (dropout-free
small CNN; {graph_during["median_ratio_to_sgd"]:.2f}× in graph mode). The
gap grows with the convolutions: on ResNet-20 and WRN-16-4 a switched SAM
step under XLA takes minutes, so those cells are not timed. On a CPU, use
switching policies in graph mode (`jit_compile=False`); the steps a policy
declines cost one pass in every mode.

This step's own CPU time is also the least steady of any cell: its steps
span {_decile_span(during)} ms (10th to 90th percentile), SGD's beside them
{_decile_span(_cell(results, "small_cnn_no_dropout/xla", "sgd"))} ms, so its
ratio moves more between runs than the others'."""
        )
    return "\n\n".join(notes)


def _decile_span(cell):
    low, high = np.percentile(cell["step_ms"], [10, 90])
    return f"{low:.0f}–{high:.0f}"


def _pipeline_section(results):
    pipeline = results.get("pipeline")
    if not pipeline:
        return ""
    real = pipeline["contenders"]["real_pipeline"]["cpu"]
    memory = pipeline["contenders"]["in_memory_batch"]["cpu"]
    return f"""## Input pipeline

The Fashion-MNIST trainer's tf.data pipeline on the real data (gather a
step's examples, scale, one-hot, prefetch) against one cached in-memory
batch, training the small CNN with SGD at batch 128: the real-data step
takes **{real["median_ratio_to_sgd"]:.2f}×** the CPU time of the in-memory
step (range {real["ratio_min"]:.2f}–{real["ratio_max"]:.2f}; in-memory step
{memory["median_step_ms"]:.0f} ms). On its own the pipeline produces a
batch in {pipeline["pipeline_alone_cpu_ms_per_batch"]:.2f} ms of CPU time,
far below a step.
"""


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keys = list(results["timings"])
    contenders = ["sam", "floor_two_passes", "naive_assign_subtract"]
    contenders += ["momentum_sam", "late_phase_before", "sam_rho_0"]
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for i, contender in enumerate(contenders):
        stats = [_cell(results, k, contender) for k in keys]
        median = np.array([s["median_ratio_to_sgd"] if s else 0 for s in stats])
        low = median - np.array([s["ratio_min"] if s else 0 for s in stats])
        high = np.array([s["ratio_max"] if s else 0 for s in stats]) - median
        ax.bar(
            np.arange(len(keys)) + i * width,
            median,
            width,
            yerr=[low, high],
            label=LABELS[contender].replace("`", ""),
            capsize=2,
        )
    ax.axhline(2.0, color="k", lw=0.8, ls="--")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
    ax.set_xticklabels(keys, fontsize=7, rotation=15)
    ax.set_ylabel("CPU time / SGD step's")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _span(results, key):
    counts = [t[key] for t in results["timings"].values()]
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low} to {high}"


def _load(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(flags_obj):
    results = _load(flags_obj.input)
    repeat = _load(flags_obj.repeat_input)
    os.makedirs(flags_obj.output_dir, exist_ok=True)
    _plot(results, os.path.join(flags_obj.output_dir, "step_time.png"))
    machine = results["machine"]
    overhead = _overhead_table(results, repeat)
    text = f"""# What SAM costs

Measured by

```sh
{COMMANDS}
```

on {machine["cpus"]} CPU cores, TensorFlow {machine["tensorflow"]}, Keras
{machine["keras"]}, batch size {results["batch_size"]}, random data,
TensorFlow on {results["threads"]} thread(s).

**What the columns measure.** For each model and mode every contender is
compiled once; then {_span(results, "rounds")} rounds each time
{_span(results, "steps_per_round")} step(s) of every contender (Keras' train
function called directly; the order rotates from round to round, and an
SGD step runs between every two contenders). A cell is the median over
rounds of (the contender's CPU time per step / the CPU time of the SGD
step beside it); the wall-time ratio is in parentheses. A step's CPU
time here varies by 10–15 % from one step to the next, so many short
rounds of neighbouring steps pin a ratio down better than a few long
ones. CPU time is the process's
(`time.process_time`): with TensorFlow on one thread it counts the step's
own work, and not the ~128 ms quanta in which this sandbox's wall clock
advances under load, which made earlier wall-clock tables of this file
unreadable (ratios of one row from 1.3× to 3.0×). A step on one thread is
slower than on two, but a ratio of work is what a cost decision needs. The
two runs ran one after the other on the same core of an otherwise idle
machine: side by side, one per core, they shared the cache and the memory
bus and disagreed by up to 30 %.
{"".join(chr(10) + "> " + note + chr(10) for note in results.get("notes", []))}
## Step time over SGD: graph mode

{_ratio_table(results, "graph")}

## Step time over SGD: XLA (`jit_compile=True`)

{_ratio_table(results, "xla")}

{_xla_notes(results)}

![step time ratios](step_time.png)

## Two runs agree

For each column, the largest gap between the two runs' ratios, and the
contender it belongs to.

{_agreement_section(results, repeat)}
## Where the time goes

The floor runs two plain forward/backward passes (the second on the batch
reversed, so no graph optimization can merge them) and one optimizer
update: it is what exact SAM cannot avoid. What `SAMModel` adds on top is
the ε computation (one global norm, one scaled add per variable) and the
bookkeeping of its stateless passes.

{overhead}

{_overhead_verdict(results, repeat)}

**`rho=0` and untaken switch steps cost one pass.** `SAMModel(rho=0)` skips
the perturbed pass when ρ is a number; a switching policy skips it on the
steps it declines (late-phase SAM before its phase is one of those on every
step). {_one_pass_verdict(results)}

## Switching policies: cost of a mix of steps

A policy that takes SAM on every k-th step should cost (one SAM step behind
the switch + (k − 1) declined steps) / k. Predicted from late-phase SAM's
two kinds of step, against the measurement:

{_switching_check(results)}

## Memory

The most bytes of live tensors at once while the contender trained (MB):
variables, optimizer slots, the cached batches and the step's tensors,
under XLA its buffers. TensorFlow's CPU allocator, made to record its
allocations (`TF_CPU_ALLOCATOR_USE_BFC=true`), reports each one to the
profiler with the bytes its op asked for; the figure sums those over the
tensors alive at each moment of six steps after warm-up, in a fresh
process per contender and mode (`benchmarks/allocations.py`): three
processes per contender in graph mode, one under XLA. In parentheses, the
peak beyond SGD's, highest against highest, in copies of the parameters
(float32). Exact SAM must hold one copy more than SGD: the whole clean
gradient at the end of its first backward pass (ε needs its norm, where
SGD frees each gradient when its update has run), then w + ε through its
second pass. The target is at most one copy beyond SGD. That the figures
resolve one copy is tested (`tests/benchmarks_step_time_test.py`): a step
that holds one copy of a 4 MB layer's weights through its pass reads 4 MB
above the plain step, within 1 %.

The allocator's own peak, which earlier versions of this table gave, is
not this figure: it counts the chunks the allocator hands out, and a
request takes a free chunk of less than twice its size whole. The last
column gives how far above the tensors' peak it lay: in graph mode it
moved by up to 24 MB between identical processes, and under XLA a step's
one large buffer takes a whole 128 MB chunk, so every contender on the
small CNNs read 133–134 MB and a 46 MB difference between SGD and SAM did
not show.

{_memory_table(results, repeat)}

{_memory_verdict(results)}

**Where graph mode's peak is.** At each contender's peak in graph mode,
the tensors made outside the model's layers (their name scope): weights,
optimizer slots, the batches, and what a training step adds around the
model (for SAM, w + ε and ε while they are alive). The rest are the
layers' activations and the gradients of the backward pass, the clean
gradient among them.

{_held_table(results)}

{_memory_reading(results, repeat)}

**What was cut.** In graph mode TensorFlow's executor runs an op as soon
as its inputs are ready, and an optimizer update's ops that need no
gradient are ready when the step starts: SGD's m · μ, one
parameter-sized tensor per variable, was computed before the first pass
and held through both. A two-pass step of `SAMModel` now lets no op of
the update run before the gradients exist (a control dependency; XLA,
JAX and PyTorch order the update themselves), which took ResNet-20's SAM
peak from +3.87 copies above SGD to the figure above; a test checks the
order (`test_a_sam_step_updates_after_both_passes`). Before it, ε's guard
against a non-finite norm held a zeros tensor per variable (+0.5 copies
on an MLP).

**What is left, and why.** Under XLA on a CPU, the gradient of a
max-pooling layer becomes four int32 index arrays of the layer's input
shape, which XLA's scheduler computes near the start of the step, before
they are needed; a second pass's arrays are then alive through the
first pass. On the small CNNs that is 16 arrays (73 MB) at SAM's peak
against SGD's 8 (37 MB): [xla_peak.md](xla_peak.md) lists what is alive
at each peak (`python -m benchmarks.xla_peak`). Every two-pass step has
it (the floor, the naive port); Momentum-SAM's one pass and the models
without max pooling (ResNet-20, WRN-16-4) do not. It is the compiler's
schedule, not state that SAM keeps. In graph mode the order of ops
still moves a peak: which activations and gradients the executor holds
when the step's largest transient (a convolution's weight gradient) is
allocated (the spread column). The floor is no model of SAM's memory
under XLA: its two passes do not depend on each other, so XLA runs both
forward passes before either backward pass and its peak nearly doubles;
SAM's second pass needs the first one's gradient.

{_pipeline_section(results)}"""
    with open(os.path.join(flags_obj.output_dir, "performance.md"), "w") as f:
        f.write(text)


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
