"""Rewrite Sphinx roles in docstrings as Markdown code, for the mkdocstrings API page.

The docstrings were written for Sphinx (``:class:`~d2ema.EMA```); the site renders Markdown
(mkdocstrings, Google style), where a role shows as raw text. This rewrites, inside docstrings
only (module, class and function docstrings, found with ``ast``), every
``:class:`` / ``:func:`` / ``:meth:`` / ``:mod:`` / ``:data:`` / ``:attr:`` / ``:exc:`` /
``:obj:`` role:

* ``:class:`~d2ema.x.Y``` -> ```Y``` (``~``: the last component, as Sphinx shows it);
* ``:func:`d2ema.x.f``` -> ```d2ema.x.f``` (the name as written);
* ``:meth:`title <d2ema.x.Y.m>``` -> ```title```.

RST ``literals`` (double backticks) are left alone: Markdown shows them as code too. Running it
twice changes nothing (no role is left after the first run). It prints what it changed, per
file, and with ``--check`` changes nothing and exits 1 if a role is left.

Usage::

    python tools/docstring_roles.py                       # every module of src/d2ema
    python tools/docstring_roles.py src/d2ema/ema.py      # some files
    python tools/docstring_roles.py --check               # CI: fail if a role is left
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`<]*?)\s*(?:<([^`>]*)>)?`")


def _name(match: re.Match[str]) -> str:
    tilde, text, target = match.group(1), match.group(2).strip(), match.group(3)
    if target is not None and text:  # :meth:`title <target>`
        return f"`{text}`"
    name = target or text
    return f"`{name.rsplit('.', 1)[-1] if tilde else name}`"


def docstring_lines(source: str) -> set[int]:
    """The line numbers (1-based) that docstrings of ``source`` span: those of modules, classes
    and functions, and the attribute docstrings (a string statement after an assignment), which
    mkdocstrings renders too."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def rewrite(source: str) -> tuple[str, int]:
    """``source`` with the roles of its docstrings rewritten, and how many there were."""
    inside = docstring_lines(source)
    out, count = [], 0
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        if number in inside:
            line, n = ROLE.subn(_name, line)
            count += n
        out.append(line)
    return "".join(out), count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="files (default: src/d2ema/**/*.py)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a "
                        "docstring still holds a role")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "src" / "d2ema").rglob("*.py"))
    total = 0
    for path in paths:
        source = path.read_text()
        new, count = rewrite(source)
        if count:
            total += count
            print(f"{path}: {count} role{'s' * (count != 1)}")
            if not args.check:
                path.write_text(new)
    verb = "left" if args.check else "rewritten"
    print(f"{total} role{'s' * (total != 1)} {verb} in {len(paths)} files")
    return 1 if args.check and total else 0


if __name__ == "__main__":
    sys.exit(main())
