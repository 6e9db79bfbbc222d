"""The detectron2 layer: config keys, hook, checkpointer, trainer and evaluation, delegating
to the core. ``d2ema.d2.compat`` is the seed article's / D2Go's API; ``d2ema.d2.engine.train_net``
is
what ``d2ema train`` runs.

Example::

    from d2ema.d2 import EMATrainer, add_model_ema_configs
    cfg = get_cfg(); add_model_ema_configs(cfg); cfg.MODEL_EMA.ENABLED = True
    trainer = EMATrainer(cfg); trainer.resume_or_load(resume=False); trainer.train()
"""

import warnings
from typing import Any

from d2ema.d2.checkpoint.checkpointers import (
    EMACheckpointer,
    ema_checkpointables,  # noqa: F401
)
from d2ema.d2.config.settings import (  # noqa: F401
    EMASettings,
    PostHocSettings,
    add_model_ema_configs,
    ema_settings,
    lazy_model_ema_defaults,
)
from d2ema.d2.data.datasets import register_coco_dataset
from d2ema.d2.engine.build import build_model_ema  # noqa: F401
from d2ema.d2.engine.hooks import EMAUpdateHook
from d2ema.d2.engine.run_folder import setup_run
from d2ema.d2.engine.trainer import EMATrainer, EMATrainerMixin
from d2ema.d2.evaluation.evaluator import build_evaluator, evaluate_with_ema  # noqa: F401
from d2ema.d2.family import (  # noqa: F401
    EMAFamily,
    get_ema_family,
    get_extra_emas,
    get_model_ema,
)
from d2ema.errors import ConfigError, DatasetError, EMANotLoadedError, TrainerError  # noqa: F401

# What the docs teach. The names marked noqa stay importable from here, as before 0.3.0
# (internal code and older scripts use them), and are documented in their own modules.
__all__ = [
    "EMACheckpointer",
    "EMANotLoadedError",
    "EMATrainer",
    "EMATrainerMixin",
    "TrainerError",
    "add_model_ema_configs",
    "get_model_ema",
    "lazy_model_ema_defaults",
    "register_coco_dataset",
    "setup_run",
]


def __getattr__(name: str) -> Any:
    if name == "EMAHook":  # renamed in 0.3.0; d2ema.compat.EMAHook is D2Go's (cfg, model) hook
        warnings.warn("d2ema.d2.EMAHook is now d2ema.d2.EMAUpdateHook (the name EMAHook stays "
                      "D2Go's, in d2ema.compat); the old name goes in 0.4.0",
                      DeprecationWarning, stacklevel=2)
        return EMAUpdateHook
    raise AttributeError(f"module 'd2ema.d2' has no attribute {name!r}")
