"""Every Python block and every ``d2ema`` command of README.md and docs/*.md is run by a test
(the rule and its marks: tests/_doc_blocks.py)."""

from __future__ import annotations

import re
from pathlib import Path

from _doc_blocks import ROOT, blocks, commands

TESTS = Path(__file__).resolve().parent
CLAIM = re.compile(r"""doc_(?:block|commands)\(\s*["']([\w.-]+)["']""")


def claimed_names() -> set[str]:
    names = set()
    for path in TESTS.rglob("*.py"):
        if path.name not in ("_doc_blocks.py", "test_doc_blocks.py"):
            names |= set(CLAIM.findall(path.read_text()))
    return names


def test_every_runnable_block_is_named_or_marked_not_run():
    unmarked = [b.where for b in blocks() if b.runnable and not b.name and not b.not_run]
    assert not unmarked, (
        "code blocks no test runs; put <!-- block: NAME --> before each and run it in a test "
        f"as doc_block('NAME'), or <!-- not run: REASON --> where none can: {unmarked}")


def test_every_named_block_is_run_by_a_test():
    claimed = claimed_names()
    unclaimed = sorted({b.name for b in blocks() if b.name} - claimed)
    assert not unclaimed, f"blocks named in the docs that no test runs: {unclaimed}"


def test_claims_name_existing_blocks():
    """A renamed or removed block fails its test's doc_block(...) at once; this says which."""
    assert claimed_names() <= {b.name for b in blocks() if b.name}


def test_blocks_of_one_name_are_equal():
    by_name: dict[str, set[str]] = {}
    for b in blocks():
        if b.name:
            by_name.setdefault(b.name, set()).add(b.text)
    assert {n for n, texts in by_name.items() if len(texts) > 1} == set()


def test_not_run_blocks_are_rare_and_say_why():
    runnable = [b for b in blocks() if b.runnable]
    not_run = [b for b in runnable if b.not_run]
    assert all(len(b.not_run) > 20 for b in not_run), [b.where for b in not_run]
    assert len(not_run) * 5 <= len(runnable), [b.where for b in not_run]


def test_marks_stand_right_before_a_code_block(tmp_path):
    """A mark separated from its block by a blank line would silently mark nothing."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^<!--\s*(block|not run):", line):
                assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"{path}:{i + 1}"


def test_the_collector_finds_commands_and_marks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- block: one -->\n```bash\nd2ema train --config-file a.yaml \\\n"
        "    MODEL_EMA.ENABLED True   # comment\nls\n```\n\n"
        "```bash\nmake demo\n```\n<!-- not run: needs eight GPUs on two machines -->\n"
        "```python\nprint(1)\n```\n```python\nx = 1\n```\n")
    found = blocks([page])
    assert [(b.lang, b.name, b.not_run, b.runnable) for b in found] == [
        ("bash", "one", None, True), ("bash", None, None, False),
        ("python", None, "needs eight GPUs on two machines", True),
        ("python", None, None, True)]
    assert commands(found[0].text) == [["train", "--config-file", "a.yaml",
                                        "MODEL_EMA.ENABLED", "True"]]
