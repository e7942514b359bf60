"""README.md's Python examples run as written: a user copies them first.

Every ```python block runs on its own, in a fresh namespace and an empty
working directory. A block that needs what a test cannot have (a TPU, a
data set) is preceded by the line `<!-- readme-test: skip -->`.
"""

import os
import re

import pytest
import tensorflow as tf

from tests import backends
from tests.distribute_test import mirrored
from tests.trainers_run_test import ROOT

# The README's examples use tf.distribute and the trainers.
pytestmark = backends.tensorflow_only

SKIP = "<!-- readme-test: skip -->"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def readme_blocks():
    """`(line, code, skipped)` of each ```python block of README.md."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), before.strip() == SKIP))
    return blocks


def test_the_readme_has_its_examples_and_skips_few():
    blocks = readme_blocks()
    assert len(blocks) >= 4
    assert sum(skipped for _, _, skipped in blocks) <= 1
    usage = blocks[0][1]
    for needed in ("SAMModel(base", ".fit(", "model.base.save("):
        assert needed in usage


@pytest.mark.parametrize(
    "line, code, skipped",
    readme_blocks(),
    ids=[f"line{line}" for line, _, _ in readme_blocks()],
)
def test_readme_block_runs(line, code, skipped, tmp_path, monkeypatch):
    if skipped:
        pytest.skip(f"README.md:{line} is marked {SKIP}")
    monkeypatch.chdir(tmp_path)
    # One MirroredStrategy per test process (see distribute_test.mirrored):
    # a README block's own would collide with the other tests'.
    strategy = mirrored()
    monkeypatch.setattr(
        tf.distribute, "MirroredStrategy", lambda *a, **k: strategy
    )
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
