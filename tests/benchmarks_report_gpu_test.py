"""The GPU section of docs/results.md from small synthetic results."""

import pytest

from benchmarks import report_common as common
from benchmarks import report_gpu
from benchmarks import report_results
from tests import backends

pytestmark = backends.tensorflow_only

LEASE = dict(
    device="GPU-X",
    driver="1.0",
    python="3.12",
    jax="0.1",
    keras="3.0",
    date="2026-01-01",
    source="a test",
)


def _step_row(model, precision, sgd, sam, anchor):
    return dict(
        model=model,
        precision=precision,
        batch_size=128,
        sgd_ms=sgd,
        sam_ms=sam,
        ratio_median=sam / sgd,
        ratio_min=sam / sgd - 0.1,
        ratio_max=sam / sgd + 0.1,
        anchor_ms=anchor,
        device="GPU-X",
    )


def _pair(finished, sgd, sam):
    """A pair stopped after `finished` epochs; accuracy per epoch."""
    return dict(
        model="wrn_16_4",
        rho=0.05,
        seed=0,
        label_noise=0.4,
        finished_epochs=finished,
        epochs_planned=20,
        history={
            "sgd": [
                dict(test_accuracy=a, seconds=s, train_loss=1.0)
                for a, s in zip(sgd, [9.0, 1.0, 2.0, 3.0] * 5)
            ],
            "sam": [
                dict(test_accuracy=a, seconds=s, train_loss=1.0)
                for a, s in zip(sam, [20.0, 2.0, 5.0, 6.0] * 5)
            ],
        },
    )


def test_step_rows_put_each_step_beside_the_anchor():
    rows = report_gpu.step_rows(
        [
            _step_row("wrn_16_4", "float32", 4.0, 8.0, (2.0, 5.0)),
            _step_row("resnet50", "float32", 10.0, 20.0, None),
        ]
    ).split("\n")
    # SAM 8 ms against the anchor's 5, SGD 4 against its 2.
    assert rows[0] == (
        "| wrn_16_4 | float32 | 128 | 4.00 | 8.00 | 2.00× (1.90–2.10) "
        "| 2.0 → 5.0 (2.50×) | 1.60 | 2.00 |"
    )
    assert rows[1].endswith("| — | — | — |")


def test_the_pair_shows_each_quarter_of_the_epochs_it_finished():
    sgd = [0.5, 0.6, 0.7, 0.8, 0.9, 0.91, 0.92]
    sam = [0.5, 0.6, 0.7, 0.8, 0.9, 0.93, 0.95]
    fields = report_gpu.pair_fields(_pair(7, sgd, sam))
    # Quarters of 7 epochs: 2, 4 (3.5 rounds to 4), 5, 7.
    epochs = [int(line.split("|")[1]) for line in fields["rows"].split("\n")]
    assert epochs == [2, 4, 5, 7]
    assert fields["rows"].split("\n")[-1] == "| 7 | 92.00 | 95.00 |"
    assert fields["difference"] == pytest.approx(3.0)
    # Medians after the first epoch: SGD 1, 2, 3, 1, 2, 3 → 2; SAM → 5.
    assert fields["sgd_seconds"] == 2.0 and fields["sam_seconds"] == 5.0
    assert fields["epoch_ratio"] == 2.5
    assert fields["labels"] == "40 % label noise"


def _render(**data):
    """The GPU blocks of templates/results.md, as the report fills them."""
    data = dict(dict.fromkeys(("gpu_step_time", "gpu_pair", "facts")), **data)
    gpu = [s for s in report_results.SECTIONS if s[0].startswith("gpu")]
    return common.render("results", gpu, data)


def test_the_section_renders_from_the_json_and_the_lease():
    steps = [_step_row("wrn_16_4", "bfloat16", 3.0, 6.3, (3.0, 6.0))]
    text = _render(gpu_step_time=steps, facts={"gpu_lease": LEASE})
    assert text.startswith("## At GPU scale\n\nOne GPU-X (driver 1.0)")
    assert "costs 2.10–2.10 SGD steps here" in text
    assert "JSON is missing" not in text
    assert "SGD against SAM" not in text  # the pair's JSON is missing
    pair = _pair(4, [0.8] * 4, [0.79] * 4)
    text = _render(
        gpu_step_time=steps, gpu_pair=pair, facts={"gpu_lease": LEASE}
    )
    flat = " ".join(text.split())
    assert "At the end SAM − SGD is -1.00 points. This is one pair" in flat
    assert "trains a larger model 50 times longer" in flat


def test_without_the_json_the_section_says_what_to_run():
    text = _render()
    assert text.startswith(
        "## At GPU scale\n\nThe GPU results' JSON is missing"
    )
    assert report_gpu.COMMANDS["gpu_pair"] in text
