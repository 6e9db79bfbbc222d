"""Guards against a silently wrong EMA in detectron2 runs, each failing loudly with the fix.

* :func:`require_average`: an EMA that was neither loaded nor updated holds the weights the
  model had when it was built (random, in detectron2's eval-only pattern, whose plain
  ``DetectionCheckpointer`` loads the model but not ``ema_state``); it is never evaluated as
  ``ema/...``.
* :func:`check_trainer_bases`: ``class Trainer(DefaultTrainer, EMATrainerMixin)`` would train
  with no EMA (``DefaultTrainer``'s methods come first); refused when the class is defined.
* :class:`NoEMACheckpointer`: a run without EMA refuses to resume from a checkpoint that has
  one, since its next checkpoints (``model_final.pth`` too) would be written without it, unless
  ``MODEL_EMA.DISCARD_ON_RESUME`` says so.

Example::

    require_average(get_model_ema(model))       # raises EMANotLoadedError with what to do
"""

from __future__ import annotations

import logging
from typing import Any

from ..ema import EMA
from ..errors import ConfigError, EMANotLoadedError, TrainerError
from ..format import has_ema
from .checkpoint import AtomicCheckpointer
from .config import ema_settings

__all__ = [
    "NoEMACheckpointer",
    "check_resume_keeps_ema",
    "check_trainer_bases",
    "last_checkpoint_has_ema",
    "refuse_dropping_ema",
    "require_average",
]

logger = logging.getLogger(__name__)


def require_average(ema: EMA) -> None:
    """Raise :class:`EMANotLoadedError` if ``ema`` holds only the weights it was built from."""
    if getattr(ema, "provenance", "updated") != "built":
        return
    raise EMANotLoadedError(
        "the model's EMA was neither loaded from a checkpoint nor updated by training: it holds "
        "the weights the model had when it was built, so it is not evaluated as 'ema/...'. A "
        "plain DetectionCheckpointer loads the model but not its EMA ('ema_state'); load both "
        "with d2ema.d2.EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model))"
        ".load(path) (resume_or_load(path, resume=False) loads the model only), or evaluate the "
        "raw weights with MODEL_EMA.ENABLED False"
    )


def check_trainer_bases(cls: type, mixin: type) -> None:
    """Refuse a class whose bases put a detectron2 trainer before ``mixin`` in the MRO."""
    from detectron2.engine import TrainerBase

    mro = cls.__mro__
    for base in mro[: mro.index(mixin)]:
        if issubclass(base, TrainerBase) and not issubclass(base, mixin):
            bases = [b.__name__ for b in cls.__bases__]
            order = [mixin.__name__, *(b for b in bases if b != mixin.__name__)]
            raise TrainerError(
                f"class {cls.__name__}({', '.join(bases)}): {base.__name__} comes before "
                f"{mixin.__name__}, so its build_model/build_hooks/test win and the trainer "
                f"would run without EMA; put the mixin first: class "
                f"{cls.__name__}({', '.join(order)})"
            )


def last_checkpoint_has_ema(output_dir: str) -> str | None:
    """The last checkpoint of ``output_dir`` if it holds an EMA (read lazily, memory-mapped),
    else None; None too when it cannot tell (the checkpointer checks again when it loads)."""
    import torch

    from ..resume import tagged_checkpoint

    tagged, _ = tagged_checkpoint(output_dir)  # OutsideFolderError: names a file elsewhere
    if tagged is None:
        return None
    path = str(tagged)
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a zip checkpoint, or objects beyond plain data
        return None
    return path if isinstance(checkpoint, dict) and has_ema(checkpoint) else None


def check_resume_keeps_ema(cfg) -> None:
    """Refuse resuming a run whose last checkpoint has an EMA with the EMA off (yacs or
    LazyConfig), unless ``DISCARD_ON_RESUME``: before anything is built or written."""
    settings = ema_settings(cfg)
    if settings.enabled or settings.discard_on_resume:
        return
    lazy = not hasattr(cfg, "MODEL")
    path = last_checkpoint_has_ema(cfg.train.output_dir if lazy else cfg.OUTPUT_DIR)
    if path is not None:
        refuse_dropping_ema(path, "train.model_ema." if lazy else "MODEL_EMA.")


class NoEMACheckpointer(AtomicCheckpointer):
    """The checkpointer of a run without EMA: resuming from a checkpoint that has an EMA is
    refused before anything is loaded, unless ``discard_ema`` (``DISCARD_ON_RESUME``)."""

    def __init__(self, model, save_dir: str = "", *, discard_ema: bool = False,
                 key: str = "MODEL_EMA.", **checkpointables: Any):
        super().__init__(model, save_dir, **checkpointables)
        self.discard_ema = discard_ema
        self._key = key
        self._resuming = False

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def _load_model(self, checkpoint: dict[str, Any]):
        if self._resuming and has_ema(checkpoint):
            path = self.resumed_from or self.get_checkpoint_file()
            if not self.discard_ema:
                refuse_dropping_ema(path, self._key)
            logger.warning("Dropping the EMA of %s (%s): the next checkpoints have none.",
                           path, _discard_key(self._key))
        return super()._load_model(checkpoint)


def _discard_key(prefix: str) -> str:
    return prefix + ("DISCARD_ON_RESUME" if prefix.startswith("MODEL_EMA") else "discard_on_resume")


def refuse_dropping_ema(path: str, prefix: str = "MODEL_EMA.") -> None:
    """Raise the :class:`ConfigError` for resuming from ``path`` (which has an EMA) without EMA."""
    enabled = prefix + ("ENABLED" if prefix.startswith("MODEL_EMA") else "enabled")
    raise ConfigError(
        f"the checkpoint to resume from ({path}) has an EMA, but {enabled} is False: the run's "
        f"next checkpoints, model_final.pth included, would be written without it. Resume with "
        f"{enabled} True to keep averaging, or set {_discard_key(prefix)} True to drop the EMA "
        "on purpose"
    )
