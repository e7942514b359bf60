"""The GPU section of docs/results.md: `benchmarks.gpu_step_time`'s and
`benchmarks.gpu_pair`'s JSON, and the lease they ran on
(`docs/report_facts.json`'s `gpu_lease`)."""

import numpy as np

from benchmarks import report_cnn
from benchmarks import report_common as common

COMMANDS = {
    "gpu_step_time": "KERAS_BACKEND=jax python -m benchmarks.gpu_step_time "
    "--models=wrn_16_4,wrn_28_10 --output=docs/gpu_step_time.json",
    "gpu_pair": "KERAS_BACKEND=jax python -m benchmarks.gpu_pair "
    "--data_dir=<dir of the IDX files> --output=docs/gpu_pair.json",
}


def step_rows(rows):
    """The step-time table's rows, each against the anchor where it has
    one: SAM's and SGD's milliseconds over the anchor's."""
    lines = []
    for r in rows:
        against = ["—"] * 3
        if r["anchor_ms"]:
            sgd, sam = r["anchor_ms"]
            against = [
                f"{sgd} → {sam} ({sam / sgd:.2f}×)",
                f"{r['sam_ms'] / sam:.2f}",
                f"{r['sgd_ms'] / sgd:.2f}",
            ]
        lines.append(
            common.row(
                r["model"],
                r["precision"],
                r["batch_size"],
                f"{r['sgd_ms']:.2f}",
                f"{r['sam_ms']:.2f}",
                f"{r['ratio_median']:.2f}× ({r['ratio_min']:.2f}–"
                f"{r['ratio_max']:.2f})",
                *against,
            )
        )
    return "\n".join(lines)


def pair_fields(pair):
    """The pair's table (test accuracy at each quarter of its epochs),
    its final difference and the median seconds of an epoch after the
    first (which compiles)."""
    history = pair["history"]
    done = pair["finished_epochs"]
    epochs = sorted({max(1, round(q * done / 4)) for q in range(1, 5)})
    rows = [
        common.row(
            e,
            *(
                f"{100 * history[k][e - 1]['test_accuracy']:.2f}"
                for k in ("sgd", "sam")  # the template's columns
            ),
        )
        for e in epochs
    ]
    seconds = {
        k: float(np.median([e["seconds"] for e in history[k][1:]]))
        for k in history
    }
    final = {k: 100 * history[k][done - 1]["test_accuracy"] for k in history}
    labels = "clean labels"
    if pair["label_noise"]:
        labels = f"{common.percent(pair['label_noise'])} label noise"
    return dict(
        {k: v for k, v in pair.items() if k != "history"},
        labels=labels,
        rows="\n".join(rows),
        difference=final["sam"] - final["sgd"],
        sgd_seconds=seconds["sgd"],
        sam_seconds=seconds["sam"],
        epoch_ratio=seconds["sam"] / seconds["sgd"],
    )


def missing(data):
    """The fields of the `gpu` block, which says how to run the scripts,
    while their JSON is missing."""
    if data["gpu_step_time"] is not None:
        return None
    return dict(step_time=COMMANDS["gpu_step_time"], pair=COMMANDS["gpu_pair"])


def section(data):
    """The fields of the `gpu_results` block."""
    steps = data["gpu_step_time"]
    ratios = [r["ratio_median"] for r in steps]
    paper = report_cnn.PAPER_FASHION_MNIST
    pair = ""
    if data["gpu_pair"]:
        pair = common.snippet(
            "results",
            "gpu_pair",
            command=COMMANDS["gpu_pair"],
            paper=paper,
            paper_sgd=100 - paper["sgd"],
            paper_sam=100 - paper["sam"],
            longer=paper["epochs"] / data["gpu_pair"]["finished_epochs"],
            **pair_fields(data["gpu_pair"]),
        ).strip("\n")
    return dict(
        data["facts"]["gpu_lease"],
        command=COMMANDS["gpu_step_time"],
        rows=step_rows(steps),
        low=min(ratios),
        high=max(ratios),
        pair=pair,
    )
