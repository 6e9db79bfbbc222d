"""``d2ema bench``: the update-speed benchmark of the source checkout (``benchmarks/``).

The benchmark compares d2ema with its peers (timm, ema-pytorch, torch-ema), which are not
dependencies of the package, so it stays a script of the repository; this module finds it
next to an editable install and runs its ``main(argv)``.

Example::

    run_update_speed(["--quick"])
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UsageError

__all__ = ["benchmark_script", "run_update_speed"]


def benchmark_script() -> Path | None:
    """``benchmarks/update_speed.py`` of the source checkout d2ema runs from, if any."""
    root = Path(__file__).resolve().parents[3]
    path = root / "benchmarks" / "update_speed.py"
    return path if path.is_file() else None


def run_update_speed(argv: Sequence[str], prog: str = "d2ema bench") -> int:
    """Run the benchmark's ``main(argv)``; its usage line names ``prog``."""
    path = benchmark_script()
    if path is None:
        raise UsageError(
            "benchmarks/update_speed.py not found next to the installed package: 'd2ema bench' "
            "needs a source checkout installed with 'pip install -e .'"
        )
    spec = importlib.util.spec_from_file_location("d2ema_bench_update_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    if not callable(getattr(module, "main", None)):
        raise UsageError(f"{path} has no main(argv) function")
    saved_argv = sys.argv
    sys.argv = [prog, *argv]
    try:
        return int(module.main(list(argv)) or 0)
    finally:
        sys.argv = saved_argv
