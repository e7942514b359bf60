"""What XLA keeps alive at the peak of a compiled training step.

    python -m benchmarks.xla_peak

XLA assigns every buffer of a compiled step when it compiles it, and its
buffer assignment (`--xla_dump_to`) names the buffers alive at the step's
peak. For each contender, in a fresh process, this compiles the step of
`benchmarks.step_time` under `jit_compile=True`, reads that list, and
groups it by the kind of instruction that made each buffer (its HLO name
without the numeric suffix). Writes the buffers to docs/xla_peak.json and
the report rendered from them to docs/xla_peak.md.
"""

import collections
import glob
import json
import os
import re
import tempfile

from absl import app
from absl import flags

from benchmarks import process

FLAGS = flags.FLAGS

COMMAND = "python -m benchmarks.xla_peak"
LABELS = {"sgd": "SGD", "sam": "SAM", "momentum_sam": "Momentum-SAM"}


def define_flags():
    flags.DEFINE_string(
        "model", "small_cnn_no_dropout", "A model of benchmarks.step_time."
    )
    flags.DEFINE_list("contenders", list(LABELS), "Contenders to compile.")
    flags.DEFINE_string(
        "output", "docs/xla_peak.json", "The buffers; the report goes beside."
    )


def peak_buffers(text):
    """From an XLA buffer assignment: the step's length in scheduled
    instructions, and per buffer alive at the peak, its bytes and the
    positions where its live range starts and ends."""
    ranges = {
        name: (int(start), int(end))
        for name, start, end in re.findall(
            r"^\s+(\S+?\{\S*\}):(\d+)-(\d+)$", text, re.M
        )
    }
    block = text.split("(peak):\n", 1)[1].split("Stack trace breakdown", 1)[0]
    buffers = [
        (name, int(size), *ranges.get(name, (None, None)))
        for name, size in re.findall(
            r"^\s+(\S+\{\S*\}): (\d+) bytes", block, re.M
        )
    ]
    return max(end for _, end in ranges.values()), buffers


def kind(buffer_name):
    """`wrapped_iota.12{}` -> `wrapped_iota`."""
    return re.sub(r"(\.\d+)?\{.*\}$", "", buffer_name)


def group(buffers):
    """Per kind of instruction: buffers, MB, and the span of their live
    ranges (earliest start, latest end); largest first."""
    groups = collections.defaultdict(list)
    for name, size, start, end in buffers:
        groups[kind(name)].append((size, start, end))
    rows = []
    for k, members in groups.items():
        starts = [m[1] for m in members if m[1] is not None]
        ends = [m[2] for m in members if m[2] is not None]
        rows.append(
            (
                k,
                len(members),
                sum(m[0] for m in members) / 2**20,
                f"{min(starts)}–{max(ends)}" if starts else "?",
            )
        )
    return sorted(rows, key=lambda row: -row[2])


def _print_peak(contender, model):
    # TensorFlow reads XLA_FLAGS once, when it starts: only the fresh
    # process that `measure` runs imports it.
    from benchmarks import step_time

    step_time._set_threads(1)
    compiled, _ = step_time.seeded_contender(contender, model)
    dataset = step_time._dataset(step_time.MODELS[model], 64)
    step_time._compiled_step(compiled, dataset, True)()
    paths = glob.glob(
        os.path.join(
            os.environ["XLA_DUMP"], "*one_step_on_data*buffer-assignment.txt"
        )
    )
    # One module per compilation of the train function (fit's, then the
    # iterator's); they are the same step.
    measured = []
    for path in paths:
        with open(path) as f:
            length, buffers = peak_buffers(f.read())
        measured.append((sum(b[1] for b in buffers), length, buffers))
    _, length, buffers = max(measured)
    print(json.dumps({"length": length, "buffers": buffers}))


def measure(contender, model):
    with tempfile.TemporaryDirectory() as dump:
        code = (
            "import sys; sys.argv=['x']; from benchmarks import xla_peak; "
            f"xla_peak._print_peak({contender!r}, {model!r})"
        )
        return json.loads(
            process.last_line_of_python(
                code, XLA_FLAGS=f"--xla_dump_to={dump}", XLA_DUMP=dump
            )
        )


def report(results):
    """docs/xla_peak.md, from the JSON that `run` writes."""
    lines = [
        f"# What XLA keeps alive at a step's peak: {results['model']}",
        "",
        "Made by",
        "",
        f"```sh\n{COMMAND}\n```",
        "",
        "from XLA's buffer assignment of each contender's compiled training "
        "step (batch 64, `jit_compile=True`, TensorFlow on a CPU). Per kind "
        "of instruction: the buffers alive at the step's peak, their MB, "
        "and where their live ranges span (positions in the step's "
        "schedule of instructions: the earliest start, the latest end).",
    ]
    for contender, result in results["contenders"].items():
        rows = group(result["buffers"])
        total = sum(row[2] for row in rows)
        lines += [
            "",
            f"## {LABELS.get(contender, contender)}: {total:.1f} MB at the "
            f"peak, {result['length']} positions",
            "",
            "| instruction | buffers | MB | alive over |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{k}` | {n} | {mb:.1f} | {span} |"
            for k, n, mb, span in rows
            if mb >= 0.05
        ]
    return "\n".join(lines) + "\n"


def run(flags_obj):
    # Imports Keras, which this parent process otherwise leaves to the
    # measuring children.
    from trainers import checkpoint

    results = dict(
        model=flags_obj.model,
        contenders={
            c: measure(c, flags_obj.model) for c in flags_obj.contenders
        },
    )
    checkpoint.write_json(flags_obj.output, results)
    path = os.path.splitext(flags_obj.output)[0] + ".md"
    checkpoint.write_text(path, report(results))
    return results


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
