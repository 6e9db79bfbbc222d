"""``d2ema bench``: the update-speed benchmark (`d2ema.app.speed.update_speed`).

The peers it compares with (timm, ema-pytorch, torch-ema) are not dependencies of d2ema: each
is timed where it is installed (``pip install -r requirements/bench.txt``) and listed as
missing elsewhere.

Example::

    run_update_speed(["--quick", "--models", "tiny500"])
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["run_update_speed"]


def run_update_speed(argv: Sequence[str], prog: str = "d2ema bench") -> int:
    """Run the benchmark's command line with ``argv``; its usage line names ``prog``."""
    from d2ema.app.speed.update_speed import main

    return main(list(argv), prog=prog)
