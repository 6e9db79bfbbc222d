"""docs/configuration.md is generated from the one table of the keys and cannot drift from it."""

from __future__ import annotations

from pathlib import Path

from d2ema.d2.config.keys import KEYS
from d2ema.d2.config.reference import main, render

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_page_is_the_generated_one():
    assert PAGE.read_text() == render(), (
        "docs/configuration.md differs from the keys table: run "
        "python -m d2ema.d2.config.reference docs/configuration.md")


def test_every_key_has_a_row_with_its_default_and_meaning():
    rows = {line.split("|")[1].strip(" `"): line for line in render().splitlines()
            if line.startswith("| `")}
    assert list(rows) == list(KEYS)
    assert "`0.999`" in rows["DECAY"] and "`[0.05, 0.1]`" in rows["POSTHOC.SIGMA_RELS"]
    assert KEYS["SHARDED"][1] in rows["SHARDED"]


def test_check_and_write(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    assert main(["--check", str(page)]) == 1  # absent
    assert "python -m d2ema.d2.config.reference" in capsys.readouterr().err
    assert main([str(page)]) == 0 and page.read_text() == render()
    assert main(["--check", str(page)]) == 0
    page.write_text(render().replace("`0.999`", "`0.99`"))
    assert main(["--check", str(page)]) == 1
