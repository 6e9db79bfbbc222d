"""The version of d2ema, defined here only: pyproject.toml reads it (``dynamic = ["version"]``),
``d2ema.__version__`` and ``d2ema --version`` show it, CHANGELOG.md has an entry for it."""

__version__ = "0.3.0"
