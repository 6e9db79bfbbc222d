"""Time one EMA update per method on real models, side by side: the command line.

The benchmark lives in :mod:`d2ema.app.speed.update_speed` (so that ``d2ema bench`` runs the
same code); see benchmarks/README.md for what it measures. ``python
benchmarks/update_speed.py --help`` lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from d2ema.app.speed.update_speed import main, run
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from d2ema.app.speed.update_speed import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(main())
