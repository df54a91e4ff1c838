"""The examples of the pages under docs/ run as written (rules in tests/helpers/doc_examples.py).

Each page's examples run in order in a temporary folder of the page's own,
with a SQLite database of its own.
"""

from __future__ import annotations

import pytest

from helpers.doc_examples import ROOT, examples, params, run

PAGES = sorted((ROOT / "docs").glob("*.md"))
EXAMPLES = [example for page in PAGES for example in examples(page)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def folder(page):
        if page not in made:
            made[page] = tmp_path_factory.mktemp(page.stem)
        return made[page]

    return folder


def test_every_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    missing = [page.name for page in PAGES if page.name != "README.md" and f"]({page.name})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"


@pytest.mark.parametrize("example", params(EXAMPLES))
def test_docs_example(example, folders):
    run(example, folders(example.path))
