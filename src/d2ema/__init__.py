"""d2ema: exact, fast and safe EMA of model weights, for detectron2 and any PyTorch model.

The core (this package's top level) imports no detectron2; ``d2ema.d2`` is the detectron2
layer and ``d2ema.compat`` the seed article's / D2Go's API.
"""

from .ema import EMA, FORMAT_VERSION, EMAStateError
from .schedules import SCHEDULES, Schedule, make_schedule
from .state import unwrap_model

__all__ = [
    "EMA",
    "FORMAT_VERSION",
    "SCHEDULES",
    "EMAStateError",
    "Schedule",
    "make_schedule",
    "unwrap_model",
]
__version__ = "0.1.0"
