"""d2ema: exact, fast and safe EMA of model weights, for detectron2 and any PyTorch model.

Three layers, imports pointing one way (app and cli -> d2 -> core):

* the core works on any ``nn.Module`` and training loop and imports no detectron2: the EMA
  itself in this package's modules (`EMA`, schedules, storage and update kernels, the
  checkpoint format, atomic writes, export), and two folders one floor above it:
  ``d2ema.posthoc`` (`PostHocEMA`: choose the EMA length after training) and
  ``d2ema.distributed`` (DDP buffers, FSDP2 states, `ShardedEMA`);
* ``d2ema.d2`` is the detectron2 layer (config keys, hook, checkpointer, trainer, evaluation,
  ``train_net``, and ``d2ema.d2.compat``, the seed article's / D2Go's API);
* ``d2ema.app`` is the application behind the ``d2ema`` command (demo, embedded datasets).

``from d2ema import compat as model_ema`` still gives the seed's / D2Go's API (it imports
detectron2).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from d2ema._version import __version__
from d2ema.errors import D2EMAError, EMAStateError

if TYPE_CHECKING:
    from d2ema.averaging.state import unwrap_model
    from d2ema.distributed import ShardedEMA
    from d2ema.ema import EMA
    from d2ema.io.format import FORMAT_VERSION
    from d2ema.posthoc import PostHocEMA, PostHocError, Target
    from d2ema.schedules import SCHEDULES, Schedule, make_schedule

# Imported on first use, so that ``d2ema.cli`` starts (and answers Ctrl-C with one line)
# before torch is imported.
_LAZY = {"EMA": ".ema", "FORMAT_VERSION": ".io.format", "SCHEDULES": ".schedules",
         "Schedule": ".schedules", "make_schedule": ".schedules", "ShardedEMA": ".distributed",
         "unwrap_model": ".averaging.state", "PostHocEMA": ".posthoc", "PostHocError": ".posthoc",
         "Target": ".posthoc"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'd2ema' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "EMA",
    "FORMAT_VERSION",
    "SCHEDULES",
    "D2EMAError",
    "EMAStateError",
    "PostHocEMA",
    "PostHocError",
    "Schedule",
    "ShardedEMA",
    "Target",
    "__version__",
    "make_schedule",
    "unwrap_model",
]
