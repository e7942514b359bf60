"""Writes docs/performance.md and its plot from benchmarks.step_time's JSON.

python -m benchmarks.step_time --output=docs/performance.json
python -m benchmarks.step_time --models=small_cnn --pipeline=false \
    --contenders=sam,asam,gsam,sam_on,periodic_2,periodic_5,randomized_0.5,\
randomized_0.2,ae_sam,looksam_5 --output=docs/performance_variants.json
python -m benchmarks.report_performance
"""

import json
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS

COMMAND = "python -m benchmarks.step_time --output=docs/performance.json"
VARIANTS_COMMAND = (
    "python -m benchmarks.step_time --models=small_cnn --modes=graph \\\n"
    "    --contenders=sam,asam,gsam,sam_on,periodic_2,periodic_5,"
    "randomized_0.5,\\\nrandomized_0.2,ae_sam,looksam_5 "
    "--output=docs/performance_variants.json"
)

LABELS = {
    "sgd": "SGD (plain `fit`)",
    "sam": "`SAMModel` (SAM)",
    "floor_two_passes": "floor: two plain forward/backward passes",
    "sam_micro_batches_2": "`SAMModel(micro_batches=2)`",
    "sam_sync": "`SAMModel(sync_perturbations=True)`",
    "naive_assign_subtract": "naive port (assign ε, recompute, subtract)",
}
VARIANT_LABELS = {
    "sgd": "SGD (plain `fit`)",
    "sam": "SAM",
    "asam": "ASAM",
    "gsam": "GSAM (α = 0.1)",
    "sam_on": "SAM-ON (normalization layers)",
    "periodic_2": "SAM every 2nd step",
    "periodic_5": "SAM every 5th step",
    "randomized_0.5": "randomized, p = 0.5",
    "randomized_0.2": "randomized, p = 0.2",
    "ae_sam": "AE-SAM (gradient-norm outliers)",
    "looksam_5": "LookSAM (k = 5, α = 0.7)",
}


def define_flags():
    flags.DEFINE_string("input", "docs/performance.json", "Benchmark JSON.")
    flags.DEFINE_string(
        "variants_input",
        "docs/performance_variants.json",
        "Benchmark JSON of the variants (skipped if missing).",
    )
    flags.DEFINE_string("output_dir", "docs", "Where to write the report.")


def _table(results, labels=LABELS):
    keys = list(results["timings"])
    lines = [
        "| contender | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for contender, label in labels.items():
        cells = []
        for key in keys:
            c = results["timings"][key]["contenders"].get(contender)
            cells.append(
                "—"
                if c is None
                else f"{c['median_ratio_to_sgd']:.2f}× "
                f"({c['ratio_min']:.2f}–{c['ratio_max']:.2f})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| SGD step, ms (median) | "
        + " | ".join(
            f"{results['timings'][k]['contenders']['sgd']['median_step_ms']:.0f}"
            for k in keys
        )
        + " |"
    )
    return "\n".join(lines)


def _memory_table(results):
    memory = results.get("peak_rss_mb", {})
    if not memory:
        return ""
    contenders = ["sgd", "sam", "naive_assign_subtract"]
    lines = [
        "| model | parameters (MB, float32) | "
        + " | ".join(LABELS[c] for c in contenders)
        + " |",
        "|---|---|" + "---|" * len(contenders),
    ]
    for model, values in memory.items():
        params = next(
            t["params"]
            for k, t in results["timings"].items()
            if k.startswith(model + "/")
        )
        lines.append(
            f"| {model} | {4 * params / 2**20:.1f} | "
            + " | ".join(f"{values[c]:.1f}" for c in contenders)
            + " |"
        )
    return "\n".join(lines)


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    keys = list(results["timings"])
    present = results["timings"][keys[0]]["contenders"]
    contenders = [c for c in LABELS if c != "sgd" and c in present]
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, contender in enumerate(contenders):
        stats = [results["timings"][k]["contenders"][contender] for k in keys]
        median = np.array([s["median_ratio_to_sgd"] for s in stats])
        low = median - np.array([s["ratio_min"] for s in stats])
        high = np.array([s["ratio_max"] for s in stats]) - median
        ax.bar(
            np.arange(len(keys)) + i * width,
            median,
            width,
            yerr=[low, high],
            label=LABELS[contender].replace("`", ""),
            capsize=2,
        )
    ax.axhline(2.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
    ax.set_xticklabels(keys)
    ax.set_ylabel("step time / SGD step time")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _flat_modes(results):
    """The model/mode keys whose contenders all take about the same time."""
    flat = []
    for key, timing in results["timings"].items():
        times = [c["median_step_ms"] for c in timing["contenders"].values()]
        if max(times) < 1.1 * min(times):
            flat.append((key, min(times), max(times)))
    return flat


def _flat_note(results):
    flat = _flat_modes(results)
    if not flat:
        return ""
    cases = "; ".join(f"{k}: {lo:.0f}–{hi:.0f} ms" for k, lo, hi in flat)
    return f"""
**A caveat on XLA here.** In these cases every contender, SGD included,
takes the same time per step ({cases}), several times a graph-mode SGD step.
Two passes or one make no difference, so the XLA CPU runtime is waiting on
something rather than computing; on this machine those columns say nothing
about what SAM costs.
"""


QUANTUM_NOTE = """
**A caveat on this machine.** Step times here come in multiples of about
128 ms once a step is longer than that (10 XLA steps of the small CNN took
1.27 s once and 2.55 s the next time; ResNet-20 steps take 255 or 511 ms),
which points at the sandbox's CPU scheduling. Ratios of long steps are
therefore coarse (2.0× may be anything from about 1.8× to 2.2×); the small
CNN in graph mode, whose steps are shorter than the quantum, gives the
finest reading.
"""


def _overhead_table(results):
    lines = [
        "| model / mode | SAM / floor | SAM overhead over the floor, ms |",
        "|---|---|---|",
    ]
    for key, timing in results["timings"].items():
        c = timing["contenders"]
        if "floor_two_passes" not in c:
            continue
        sam, floor = c["sam"]["median_step_ms"], c["floor_two_passes"]
        lines.append(
            f"| {key} | {sam / floor['median_step_ms']:.2f} | "
            f"{sam - floor['median_step_ms']:.1f} |"
        )
    return "\n".join(lines)


def _pipeline_section(results):
    pipeline = results.get("pipeline")
    if not pipeline:
        return ""
    real = pipeline["contenders"]["real_pipeline"]
    memory = pipeline["contenders"]["in_memory_batch"]
    return f"""## Input pipeline

The Fashion-MNIST trainer's tf.data pipeline on the real data (gather a
step's examples, scale, one-hot, prefetch) against one cached in-memory
batch, training the small CNN with SGD at batch 128 (the cheapest step the
trainer takes, so the hardest to keep fed): the real-data step takes
**{real["median_ratio_to_sgd"]:.2f}×** the in-memory step (range
{real["ratio_min"]:.2f}–{real["ratio_max"]:.2f}; in-memory step
{memory["median_step_ms"]:.0f} ms). On its own the pipeline produces a batch
in {pipeline["pipeline_alone_ms_per_batch"]:.2f} ms, far below a step, and
prefetching overlaps it with training, so the step never waits for data;
what difference there is comes, we think, from the pipeline's threads
sharing the 2 cores with the step. SAM's steps are twice as long, so the
pipeline's share of them is smaller still.
"""


def _variants_section(path):
    if not path or not os.path.exists(path):
        return ""
    with open(path) as f:
        variants = json.load(f)
    return f"""## The variants

The cost half of `docs/results.md`'s cost-versus-gain chart: the same
protocol, small CNN, every variant of `SAMModel` against plain SGD.

```sh
{VARIANTS_COMMAND}
```

{_table(variants, VARIANT_LABELS)}

Switching policies skip the perturbed pass on the steps they leave to SGD
(a `tf.cond`), so a policy taking SAM on a fraction f of the steps should
cost about 1 + f · (SAM − 1) SGD steps. On this machine the spread of these
timings (the ranges above, and the step quantum noted earlier) is too wide
to confirm that: medians below 1.0× are noise, not speed-ups.
"""


def run(flags_obj):
    with open(flags_obj.input) as f:
        results = json.load(f)
    os.makedirs(flags_obj.output_dir, exist_ok=True)
    plot = os.path.join(flags_obj.output_dir, "step_time.png")
    _plot(results, plot)
    machine = results["machine"]
    text = f"""# What SAM costs

Measured by

```sh
{COMMAND}
python -m benchmarks.report_performance --input=docs/performance.json
```

on {machine["cpus"]} CPU cores, TensorFlow {machine["tensorflow"]}, Keras
{machine["keras"]}, batch size {results["batch_size"]}, random data. Every
contender is compiled once, then all are timed in interleaved rounds in one
process; each cell is the median over rounds of (contender step time / SGD
step time in the same round), with the range over rounds in parentheses.
Exact SAM runs two forward/backward passes, so 2.0× is its floor.

{"".join(chr(10) + "> " + n + chr(10) for n in results.get("notes", []))}
## Step time over SGD

{_table(results)}
{QUANTUM_NOTE}{_flat_note(results)}
![step time ratios](step_time.png)

## Memory

Growth of the resident set while training (MB, after warm-up; measured in a
fresh process per contender). SAM holds the clean gradient, ε and w + ε
during a step: at most one extra parameter-sized buffer beyond SGD's.

{_memory_table(results)}

## Where the time goes

The floor runs two plain forward/backward passes (the second on the batch
reversed, so no graph optimization can merge them) and one optimizer
update: it is what exact SAM cannot avoid. What `SAMModel` adds on top is
the ε computation (one global norm, one scaled add per variable) and the
bookkeeping of its stateless passes (state handed in as tensors, changed
state written back once).

{_overhead_table(results)}

{_pipeline_section(results)}
{_variants_section(flags_obj.variants_input)}"""
    with open(os.path.join(flags_obj.output_dir, "performance.md"), "w") as f:
        f.write(text)


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
