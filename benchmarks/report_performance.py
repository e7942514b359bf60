"""Writes docs/performance.md and its plot from benchmarks.step_time's JSON.

python -m benchmarks.step_time --output=docs/performance.json
python -m benchmarks.report_performance --input=docs/performance.json
"""

import json
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS

COMMAND = "python -m benchmarks.step_time --output=docs/performance.json"

LABELS = {
    "sgd": "SGD (plain `fit`)",
    "sam": "`SAMModel` (SAM)",
    "sam_micro_batches_2": "`SAMModel(micro_batches=2)`",
    "sam_sync": "`SAMModel(sync_perturbations=True)`",
    "naive_assign_subtract": "naive port (assign ε, recompute, subtract)",
}


def define_flags():
    flags.DEFINE_string("input", "docs/performance.json", "Benchmark JSON.")
    flags.DEFINE_string("output_dir", "docs", "Where to write the report.")


def _table(results):
    keys = list(results["timings"])
    lines = [
        "| contender | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for contender, label in LABELS.items():
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
    contenders = [c for c in LABELS if c != "sgd"]
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


def run(flags_obj):
    with open(flags_obj.input) as f:
        results = json.load(f)
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

## Step time over SGD

{_table(results)}

![step time ratios](step_time.png)

## Memory

Growth of the resident set while training (MB, after warm-up; measured in a
fresh process per contender). SAM holds the clean gradient, ε and w + ε
during a step: at most one extra parameter-sized buffer beyond SGD's.

{_memory_table(results)}
"""
    with open(os.path.join(flags_obj.output_dir, "performance.md"), "w") as f:
        f.write(text)


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
