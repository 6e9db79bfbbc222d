"""Training iterations of detectron2 RetinaNet with and without EMA, paired: the command line.

The benchmark lives in :mod:`d2ema.app.speed.train_step`; see benchmarks/README.md.
``python benchmarks/train_step.py --help`` lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from d2ema.app.speed.train_step import main, run
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from d2ema.app.speed.train_step import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(main())
