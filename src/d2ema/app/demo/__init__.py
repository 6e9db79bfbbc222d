"""``d2ema demo``: a small RetinaNet trained on the CPU with several EMAs, scored side by side.

``options`` (what the command takes, the detectron2 config), ``trainer`` (EMATrainer plus one
EMA per extra decay), ``report`` (progress, table, results.json) and ``run`` (``run_demo``).

Example::

    from d2ema.app.demo import DemoOptions, run_demo
    print(run_demo(DemoOptions(quick=True, output="output/demo")).table())
"""

from d2ema.app.demo.options import (
    DATASET_FAMILIES,
    PRESETS,
    DemoError,
    DemoOptions,
    DemoPreset,
    demo_config,
    parse_decays,
)
from d2ema.app.demo.report import DemoResult, summary_lines
from d2ema.app.demo.run import choose_threads, run_demo

__all__ = [
    "DATASET_FAMILIES",
    "PRESETS",
    "DemoError",
    "DemoOptions",
    "DemoPreset",
    "DemoResult",
    "choose_threads",
    "demo_config",
    "parse_decays",
    "run_demo",
    "summary_lines",
]
