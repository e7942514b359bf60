"""benchmarks.xla_peak: reading XLA's buffer assignment."""

from benchmarks import xla_peak
from tests import backends

pytestmark = backends.tensorflow_only

# The shape of an XLA buffer assignment's live ranges and peak list.
ASSIGNMENT = """\
BufferAssignment:
allocation 0: size 16, parameter 0:
  Live ranges:
    arg0.1{}:0-9
    wrapped_iota{}:1-8
    wrapped_iota.1{}:2-5
    convolution.3{}:3-4
    tuple.2{}:8-9
  Live ranges at 3 (peak):
    wrapped_iota{}: 4000 bytes (cumulative: 4000 bytes)
    wrapped_iota.1{}: 4000 bytes (cumulative: 8000 bytes)
    convolution.3{}: 1048576 bytes (cumulative: 1056576 bytes)
    arg0.1{}: 16 bytes (cumulative: 1056592 bytes)
  Stack trace breakdown for peak usage: 1 056 592 bytes
"""


def test_the_peak_list_is_read_with_each_buffers_live_range():
    length, buffers = xla_peak.peak_buffers(ASSIGNMENT)
    assert length == 9
    assert buffers == [
        ("wrapped_iota{}", 4000, 1, 8),
        ("wrapped_iota.1{}", 4000, 2, 5),
        ("convolution.3{}", 1048576, 3, 4),
        ("arg0.1{}", 16, 0, 9),
    ]


def test_buffers_are_grouped_by_the_kind_of_instruction():
    _, buffers = xla_peak.peak_buffers(ASSIGNMENT)
    rows = xla_peak.group(buffers)
    assert rows[0] == ("convolution", 1, 1.0, "3–4")
    assert rows[1] == ("wrapped_iota", 2, 8000 / 2**20, "1–8")
    assert xla_peak.kind("fusion.12{0,1}") == "fusion"


def test_the_report_renders_each_contenders_groups_from_the_json():
    _, buffers = xla_peak.peak_buffers(ASSIGNMENT)
    results = dict(
        model="tiny",
        contenders={
            "sgd": dict(length=9, buffers=buffers),
            "sam": dict(length=12, buffers=buffers[:1]),
        },
    )
    text = xla_peak.report(results)
    assert text.startswith("# What XLA keeps alive at a step's peak: tiny")
    assert "## SGD: 1.0 MB at the peak, 9 positions" in text
    assert "| `convolution` | 1 | 1.0 | 3–4 |" in text
    # Groups under 0.05 MB are left out of the table.
    assert "`wrapped_iota`" not in text.split("## SAM")[0]
    assert "## SAM: 0.0 MB at the peak, 12 positions" in text
