"""The code blocks of README.md and docs/*.md, by name, for the tests that run them.

A block that is Python, or a shell block holding a ``d2ema ...`` command, is *runnable*, and
every runnable block carries one of two HTML comments on the line right before its fence:

* ``<!-- block: NAME -->``: a test runs it, and names it as ``doc_block("NAME")`` (or
  ``doc_commands("NAME")``); tests/test_doc_blocks.py fails on a name that no test file
  mentions that way. A name may stand on blocks of several pages when their texts are equal
  (the README's quick starts are also in docs/getting-started.md).
* ``<!-- not run: REASON -->``: an illustration that no test can run (e.g. it needs 8 GPUs on
  two machines); kept rare, and the reason says which test covers the same code instead.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(block|not run):\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    name: str | None  # from <!-- block: NAME -->
    not_run: str | None  # the reason of <!-- not run: REASON -->

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        if self.lang == "python":
            return True
        return self.lang in ("bash", "sh", "shell", "console") and bool(commands(self.text))


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def blocks(paths: list[Path] | None = None) -> list[Block]:
    """Every fenced block of the files, with the mark on the line before its fence."""
    out = []
    for path in doc_files() if paths is None else paths:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = FENCE.match(lines[i])
            if not fence:
                i += 1
                continue
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"{path}:{i + 1}: a code block that is never closed"
            mark = MARK.match(lines[i - 1]) if i > 0 else None
            name = mark.group(2) if mark and mark.group(1) == "block" else None
            not_run = mark.group(2) if mark and mark.group(1) == "not run" else None
            out.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                             name, not_run))
            i = end + 1
    return out


def doc_block(name: str) -> str:
    """The text of the block named ``name`` (equal on every page that has it)."""
    found = [b for b in blocks() if b.name == name]
    assert found, f"no block named {name!r} in README.md or docs/"
    texts = {b.text for b in found}
    assert len(texts) == 1, f"blocks named {name!r} differ: {[b.where for b in found]}"
    return found[0].text


def commands(text: str) -> list[list[str]]:
    """The ``d2ema ...`` commands of a shell block, as argument lists without ``d2ema``:
    continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "d2ema":
            out.append(words[1:])
    return out


def doc_commands(name: str) -> list[list[str]]:
    """The ``d2ema`` commands of the block named ``name``."""
    return commands(doc_block(name))
