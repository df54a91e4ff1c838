"""The README's examples run as written (see tests/helpers/doc_examples.py for the rules).

They run in order in one temporary folder with a SQLite database of its own,
so a later example may use the run an earlier one made.
"""

from __future__ import annotations

import pytest

from helpers.doc_examples import ROOT, examples, params, run

README = ROOT / "README.md"
EXAMPLES = examples(README)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_the_readme_has_examples_that_run():
    runnable = [e for e in EXAMPLES if not e.skip]
    assert {e.kind for e in runnable} >= {"console", "python"}


@pytest.mark.parametrize("example", params(EXAMPLES))
def test_readme_example(example, workdir):
    run(example, workdir)


def test_the_readme_stays_a_short_guide():
    # The details live under docs/; the README is the tour.
    assert len(README.read_bytes()) < 15 * 1024
    for page in ("rules", "protocol", "searching", "storage", "distributed", "results", "benchmarks"):
        assert f"docs/{page}.md" in README.read_text(), f"the README does not link docs/{page}.md"
