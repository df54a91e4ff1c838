"""The example runner of tests/helpers/doc_examples.py catches what it is there to catch."""

from __future__ import annotations

import pytest

from helpers.doc_examples import examples, params, run


def _only(tmp_path, markdown: str):
    doc = tmp_path / "doc.md"
    doc.write_text(markdown)
    (example,) = examples(doc)
    return example


def test_a_console_example_whose_output_matches_passes(tmp_path):
    run(_only(tmp_path, "```console\n$ echo 'a   b' c\na b ...\n$ false\n$ echo $?\n1\n```\n"), tmp_path)


def test_output_that_differs_fails(tmp_path):
    with pytest.raises(AssertionError, match="did not print the line"):
        run(_only(tmp_path, "```console\n$ echo hello\ngoodbye\n```\n"), tmp_path)


def test_a_command_that_fails_unannounced_fails(tmp_path):
    with pytest.raises(AssertionError, match="exited 3, expected 0"):
        run(_only(tmp_path, "```console\n$ (exit 3)\n```\n"), tmp_path)


def test_a_python_example_that_raises_fails(tmp_path):
    with pytest.raises(AssertionError, match="exited 1"):
        run(_only(tmp_path, "```python\nraise SystemExit(1)\n```\n"), tmp_path)


def test_a_marked_block_is_skipped_with_its_reason(tmp_path):
    example = _only(tmp_path, "<!-- not run: needs a GPU -->\n\n```console\n$ false\n```\n")
    with pytest.raises(pytest.skip.Exception, match="needs a GPU"):
        run(example, tmp_path)


def test_commands_run_in_the_folder_with_its_own_database(tmp_path):
    run(_only(tmp_path, "```console\n$ echo $NOS_DB_URL; pwd\nsqlite:///nos.db\n" + str(tmp_path) + "\n```\n"),
        tmp_path)


def test_continued_lines_and_other_blocks(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```text\nnot an example\n```\n\n```console\n$ echo one \\\n    two\none two\n```\n"
                   "```toml\nbudget = 3\n```\n")
    found = examples(doc)
    assert [e.kind for e in found] == ["console", "toml"]
    for example in found:
        run(example, tmp_path)


def test_a_toml_config_with_an_unknown_key_fails(tmp_path):
    from nos.config import ConfigError

    with pytest.raises(ConfigError, match="budgett"):
        run(_only(tmp_path, "```toml\nbudgett = 3\n```\n"), tmp_path)


def test_a_document_whose_example_starts_workers_is_slow_throughout(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```console\n$ nos runs\n```\n\n```console\n$ NOS_X=1 nos enqueue --budget 2\n```\n")
    other = tmp_path / "other.md"
    other.write_text("```console\n$ nos enqueue --detach\n```\n\n<!-- not run: x -->\n```console\n$ nos worker\n```\n")
    marks = {p.id: [m.name for m in p.marks] for p in params(examples(doc) + examples(other))}
    assert marks == {"doc.md:1": ["slow"], "doc.md:5": ["slow"], "other.md:1": [], "other.md:6": []}
