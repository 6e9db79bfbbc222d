"""The one table of the EMA settings: every ``MODEL_EMA`` key, its default and what it means.

yacs configs use the upper-case names under ``cfg.MODEL_EMA`` (the seed's and D2Go's:
``ENABLED``, ``DECAY``, ``DEVICE``, ...), LazyConfigs the lower-case names under
``train.model_ema`` (detrex's). :mod:`d2ema.d2.config.settings` adds and checks them;
:mod:`d2ema.d2.config.reference` writes docs/configuration.md from this table.

Example::

    from d2ema.d2.config.keys import KEYS
    default, meaning = KEYS["DECAY"]     # 0.999, "decay d in [0, 1] ..."
"""

from __future__ import annotations

from typing import Any

from d2ema.schedules import SCHEDULES

__all__ = ['KEYS']


# name: (default, meaning). Upper-case for yacs, lower-case for LazyConfig. The meaning is
# Markdown: docs/configuration.md shows it as written.
KEYS: dict[str, tuple[Any, str]] = {
    "ENABLED": (False, "keep an EMA of the model's weights"),
    "DECAY": (0.999, "decay d in [0, 1] (the ceiling of ramping schedules)"),
    "DEVICE": (
        "",
        "device of the EMA; '' = the model's (`MODEL.DEVICE`); 'cpu' keeps it off the GPU, "
        "updated in the background",
    ),
    "INCLUDE_FROZEN": (True, "also average parameters with `requires_grad=False`"),
    "INCLUDE_BUFFER": (True, "also average buffers (BN running statistics)"),
    "USE_EMA_WEIGHTS_FOR_EVAL_ONLY": (False, "`--eval-only` evaluates the EMA weights"),
    "USE_LERP": (False, "accepted for D2Go configs; the update is always a fused lerp"),
    "AFTER_BACKWARD": (
        False,
        "accepted for D2Go configs; d2ema always updates after `optimizer.step()`, since "
        "an update after backward averages the previous step's weights",
    ),
    "DECAY_WARM_UP_FACTOR": (
        -1.0,
        ">= 1 selects the `tf` schedule with this warm-up factor (refused under another "
        "`SCHEDULE`)",
    ),
    "SCHEDULE": ("constant", "decay schedule: " + ", ".join(f"`{s}`" for s in sorted(SCHEDULES))),
    "TAU": (2000.0, "`yolov5` schedule: ramp time constant in steps"),
    "INV_GAMMA": (1.0, "`power` schedule: inv_gamma"),
    "POWER": (2.0 / 3.0, "`power` schedule: power"),
    "MIN_DECAY": (0.0, "`power` schedule: floor of the decay"),
    "SIGMA_REL": (0.05, "`sigma_rel` schedule: relative width of the averaging profile"),
    "UPDATE_EVERY": (1, "update every N iterations with decay ** N"),
    "START_ITER": (0, "before this iteration the EMA copies the weights"),
    "MASTER_DTYPE": ("float32", "dtype of the EMA of bf16/fp16 weights; 'none' keeps theirs"),
    "SKIP_NONFINITE": (False, "skip (and count) updates whose weights hold NaN/Inf"),
    "EXCLUDE": ([], "regular expressions of tensor names not to track"),
    "FLAT": (
        None,
        "re-point the model's tensors into one buffer per group (single-op update); None: on "
        "where the EMA is built before the optimizer and DDP (`build_model_ema`: `EMATrainer`, "
        "`d2ema train`), off elsewhere (the seed/D2Go API)",
    ),
    "EVAL_BOTH": (
        True,
        "evaluate the raw and the EMA weights at each evaluation (`bbox` and `ema/bbox`: two "
        "TensorBoard curves)",
    ),
    "EXTRA_DECAYS": (
        [],
        "more EMAs like the primary (its `SCHEDULE`), one per decay, evaluated and logged as "
        "`ema_<d>/...`, checkpointed under `ema_extras`",
    ),
    "EXTRA_SIGMA_RELS": (
        [],
        "more power EMAs, one per sigma_rel, evaluated and logged as `ema_sigma<s>/...`, "
        "checkpointed under `ema_extras`",
    ),
    "POSTHOC.ENABLED": (False, "snapshot power EMAs for `d2ema posthoc` (length chosen after)"),
    "POSTHOC.SIGMA_RELS": ([0.05, 0.10], "widths of the power EMAs snapshotted"),
    "POSTHOC.PERIOD": (
        0, "snapshot every N iterations (0: `MAX_ITER / 100`, at least 10) and at the last"),
    "POSTHOC.DTYPE": ("float32", "snapshot precision: float32, float16 or bfloat16"),
    "POSTHOC.DIR": (
        "", "snapshot folder inside `OUTPUT_DIR`, relative to it ('' = `ema_snapshots`)"),
    "POSTHOC.SELECT": (
        False,
        "at the end of training, rebuild a sweep of EMA lengths, evaluate each on `SELECT_ON` "
        "and write the best as `OUTPUT_DIR/model_final_posthoc.pth` (+ a plain detectron2 "
        "`.yaml`); see [ema-length.md](ema-length.md)",
    ),
    "POSTHOC.SELECT_SIGMA_RELS": (
        [],
        "the lengths `SELECT` tries; [] = 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25 "
        "(those the snapshots can represent)",
    ),
    "POSTHOC.SELECT_ON": (
        "",
        "the dataset `SELECT` chooses on (held out); '' = `DATASETS.TEST[0]`, which then also "
        "reports (optimistic). The chosen EMA is reported on `DATASETS.TEST[0]`",
    ),
    "DISCARD_ON_RESUME": (
        False,
        "with `ENABLED` False: resume from a checkpoint that has an EMA and drop that EMA "
        "(refused otherwise, so that no checkpoint loses its EMA silently)",
    ),
    "SHARDED": (
        False,
        "multi-GPU (DDP): each of N ranks stores and updates 1/N of the EMA, gathered only to "
        "evaluate and to save (see `d2ema.distributed.ShardedEMA`)",
    ),
}
