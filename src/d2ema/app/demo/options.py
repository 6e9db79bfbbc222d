"""What ``d2ema demo`` takes, and the detectron2 config it trains.

A RetinaNet (ResNet-18 FPN, 128 px images, from scratch) on an embedded dataset (``shapes``
or ``digits``), AdamW at a constant LR after warm-up, EMAs with a yolov5 ramp. The presets are
sized for 2 CPU cores; measured times and AP are in benchmarks/results/demo.md.

Example::

    cfg = demo_config(DemoOptions(quick=True, output="output/demo"))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from d2ema.errors import D2EMAError

__all__ = [
    "DATASET_FAMILIES",
    "PRESETS",
    "DemoError",
    "DemoOptions",
    "DemoPreset",
    "check_options",
    "demo_config",
    "ema_label",
    "ema_prefix",
    "ema_sources",
    "parse_decays",
]

DATASET_FAMILIES = ("shapes", "digits")
RAW = "raw"
METRICS = ("AP", "AP50", "AP75")


class DemoError(D2EMAError, ValueError):
    """A demo option that cannot work; the message says which and what is allowed."""


@dataclasses.dataclass(frozen=True)
class DemoPreset:
    """Schedule of a demo run (sized for 2 CPU cores; times: benchmarks/results/demo.md)."""

    iters: int
    eval_period: int
    batch_size: int
    base_lr: float
    weight_decay: float
    warmup_iters: int
    tau: float  # yolov5 ramp of the EMA decays, in iterations
    decays: tuple[float, ...]  # compared side by side (horizons ~1/(1-d) suit the run length)
    train_images: int | None  # None: the dataset's default size
    val_images: int | None
    # power EMAs beside the decays: sigma_rel 0.05, what docs/ema-length.md recommends
    sigma_rels: tuple[float, ...] = (0.05,)


# AdamW at a constant LR after warm-up: from scratch on 2 cores it learns several times faster
# than SGD, and its weights keep moving, the regime where an EMA helps. The default fits a few
# minutes on 2 cores (benchmarks/results/demo.md has the measured times and AP).
PRESETS = {
    "default": DemoPreset(
        iters=400, eval_period=100, batch_size=8, base_lr=1e-3, weight_decay=0.05,
        warmup_iters=100, tau=100.0, decays=(0.99,), train_images=None, val_images=60,
    ),
    "quick": DemoPreset(
        iters=120, eval_period=60, batch_size=8, base_lr=1e-3, weight_decay=0.05,
        warmup_iters=40, tau=20.0, decays=(0.97,), train_images=None, val_images=40,
    ),
}


@dataclasses.dataclass
class DemoOptions:
    """What ``d2ema demo`` takes on its command line."""

    quick: bool = False
    dataset: str = "shapes"
    iters: int | None = None  # default: the preset's
    output: str | os.PathLike[str] = "output/d2ema_demo"
    seed: int = 0
    decays: str | Sequence[float] | None = None  # default: the preset's
    eval_period: int | None = None  # default: the preset's
    verbose: bool = False
    opts: Sequence[str] = ()  # extra "KEY VALUE" config overrides
    threads: int | None = None  # torch CPU threads (default: torch's, one per core)


def parse_decays(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.99,0.998"`` -> ``(0.99, 0.998)``; each decay in (0, 1), no duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    decays = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            d = float(item)
        except ValueError:
            raise DemoError(
                f"--decays: {item!r} is not a number; e.g. --decays 0.99,0.998"
            ) from None
        if not 0.0 < d < 1.0:
            raise DemoError(f"--decays: {d!r} is not in (0, 1); e.g. --decays 0.99,0.998")
        if d not in decays:
            decays.append(d)
    if not decays:
        raise DemoError("--decays: give at least one decay, e.g. --decays 0.99,0.998")
    return tuple(decays)


def ema_label(decay: float) -> str:
    return f"EMA {decay:g}"


def ema_prefix(decay: float) -> str:
    """Result/TensorBoard prefix of the EMA with ``decay``: ``ema_0.99`` (``ema_0.99/bbox/AP``)."""
    return f"ema_{decay:g}"


def ema_sources(preset: DemoPreset, decays: Sequence[float]) -> dict[str, str]:
    """Each EMA of the demo by its label, with its results' prefix: the power EMAs
    (``EMA sigma_rel 0.05``: ``ema_sigma0.05/bbox``), then the constant decays."""
    power = {f"EMA sigma_rel {s:g}": f"ema_sigma{s:g}" for s in preset.sigma_rels}
    return {**power, **{ema_label(d): ema_prefix(d) for d in decays}}


def check_options(options: DemoOptions) -> tuple[DemoPreset, tuple[float, ...]]:
    if options.dataset not in DATASET_FAMILIES:
        raise DemoError(
            f"unknown dataset {options.dataset!r}; choose one of {', '.join(DATASET_FAMILIES)} "
            "(--dataset shapes)"
        )
    preset = PRESETS["quick" if options.quick else "default"]
    iters = preset.iters if options.iters is None else options.iters
    if iters < 1:
        raise DemoError(f"--iters {iters}: give a number of iterations >= 1")
    period = options.eval_period
    if period is None:
        period = preset.eval_period if options.iters is None else max(1, iters // 5)
    if period < 0:
        raise DemoError(f"--eval-period {period}: give 0 (evaluate at the end only) or more")
    if options.threads is not None and options.threads < 1:
        raise DemoError(f"--threads {options.threads}: give a number of threads >= 1")
    warmup = min(preset.warmup_iters, max(iters // 4, 1))
    tau = preset.tau if options.iters is None else max(iters / 10.0, 1.0)
    decays = preset.decays if options.decays is None else parse_decays(options.decays)
    preset = dataclasses.replace(
        preset, iters=iters, eval_period=period, warmup_iters=warmup, tau=tau, decays=decays
    )
    return preset, decays


def demo_config(options: DemoOptions, preset: DemoPreset | None = None):
    """The detectron2 config of the demo (datasets must be registered to train it)."""
    from d2ema.app.data import get_dataset_spec
    from d2ema.app.model_configs import tiny_detector_config

    checked, decays = check_options(options)
    preset = preset or checked
    train, val = f"{options.dataset}_train", f"{options.dataset}_val"
    cfg = tiny_detector_config(
        "retinanet", num_classes=len(get_dataset_spec(train).classes), image_size=128
    )
    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (val,)
    cfg.SOLVER.IMS_PER_BATCH = preset.batch_size
    cfg.SOLVER.BASE_LR = preset.base_lr  # AdamW: see DemoTrainer.build_optimizer
    cfg.SOLVER.WEIGHT_DECAY = preset.weight_decay
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.WARMUP_ITERS = preset.warmup_iters
    cfg.SOLVER.STEPS = ()  # constant LR after warm-up: the regime where EMA helps most
    cfg.SOLVER.MAX_ITER = preset.iters
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 5.0
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9  # only model_final.pth
    cfg.TEST.EVAL_PERIOD = preset.eval_period
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.DECAY = decays[0]
    cfg.MODEL_EMA.EXTRA_DECAYS = list(decays[1:])  # named ema_<decay>, as ema_prefix says
    cfg.MODEL_EMA.EXTRA_SIGMA_RELS = list(preset.sigma_rels)  # ema_sigma<s>, as ema_sources
    cfg.MODEL_EMA.SCHEDULE = "yolov5"
    cfg.MODEL_EMA.TAU = float(preset.tau)
    cfg.MODEL_EMA.EVAL_BOTH = True
    cfg.OUTPUT_DIR = os.fspath(options.output)
    cfg.SEED = int(options.seed)
    if options.opts:
        from d2ema.d2.config.yacs_numbers import integers_for_floats

        try:
            with integers_for_floats():
                cfg.merge_from_list(list(options.opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise DemoError(f"config override {' '.join(options.opts)!r}: {e}") from e
    return cfg


