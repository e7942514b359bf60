"""The Python examples of README.md and docs/*.md run as written: a user
copies them first.

Every ```python block runs on its own, in a fresh namespace and an empty
working directory. A block that needs what a test cannot have (a TPU, a
data set, a downloaded preset) is preceded by the line
`<!-- readme-test: skip -->`.
"""

import glob
import os
import re

import pytest
import tensorflow as tf

from tests import backends
from tests.distribute_test import mirrored
from tests.trainers_run_test import ROOT

# The examples use tf.distribute and the trainers.
pytestmark = backends.tensorflow_only

SKIP = "<!-- readme-test: skip -->"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"\]\(([^)#\s]+\.md)(#[^)\s]*)?\)")
PAGES = ["README.md"] + sorted(
    os.path.relpath(path, ROOT)
    for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)


def _text(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def page_blocks(page):
    """`(line, code, skipped)` of each ```python block of `page`."""
    text = _text(page)
    blocks = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), before.strip() == SKIP))
    return blocks


def all_blocks():
    """`(page, line, code, skipped)` of every page's ```python blocks."""
    return [(page, *block) for page in PAGES for block in page_blocks(page)]


def test_the_readme_has_its_examples_and_the_pages_skip_few():
    readme = page_blocks("README.md")
    assert len(readme) >= 2
    usage = readme[0][1]
    for needed in ("SAMModel(base", ".fit(", "model.base.save("):
        assert needed in usage
    assert "sam_gradients(" in readme[1][1]
    # The examples the README had before its details moved to docs/.
    assert len(all_blocks()) >= 5
    for page in PAGES:
        assert sum(skipped for _, _, skipped in page_blocks(page)) <= 1, page


def test_every_link_between_the_pages_names_a_page_that_exists():
    missing = [
        f"{page}: {target}{anchor}"
        for page in PAGES
        for target, anchor in _LINK.findall(_text(page))
        if "://" not in target
        and not _has_anchor(os.path.join(os.path.dirname(page), target), anchor)
    ]
    assert missing == []


def _slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _has_anchor(page, anchor):
    """Whether `page` exists and has a heading `anchor` names (if any)."""
    if not os.path.exists(os.path.join(ROOT, page)):
        return False
    headings = re.findall(r"^#+ (.*)$", _text(page), flags=re.M)
    return not anchor or anchor[1:] in {_slug(h) for h in headings}


def test_heading_anchors_are_github_slugs():
    assert _slug("What `make train` prints") == "what-make-train-prints"
    assert _slug("At GPU scale") == "at-gpu-scale"
    assert _slug("ρ sensitivity") == "ρ-sensitivity"
    assert _has_anchor("docs/results.md", "#at-gpu-scale")
    assert not _has_anchor("docs/results.md", "#no-such-heading")


@pytest.mark.parametrize(
    "page, line, code, skipped",
    all_blocks(),
    ids=[f"{page}:{line}" for page, line, _, _ in all_blocks()],
)
def test_block_runs(page, line, code, skipped, tmp_path, monkeypatch):
    if skipped:
        pytest.skip(f"{page}:{line} is marked {SKIP}")
    monkeypatch.chdir(tmp_path)
    # One MirroredStrategy per test process (see distribute_test.mirrored):
    # a block's own would collide with the other tests'.
    strategy = mirrored()
    monkeypatch.setattr(
        tf.distribute, "MirroredStrategy", lambda *a, **k: strategy
    )
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "readme"})
