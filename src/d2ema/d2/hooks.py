"""``EMAHook``: the detectron2 hook that keeps the EMA up to date during training.

One job: after every iteration's optimizer step, fold the weights into the average, with the
step counter taken from the trainer's iteration (``iter + 1``), so the decay schedule of a
resumed run continues exactly where it stopped. It runs in ``after_step``, which on detectron2
v0.6 and main alike comes after ``optimizer.step()``; it never updates in ``after_backward``
(main's extra hook point), which comes before the step and would average stale weights.

Before training, an EMA that no checkpoint provided restarts from the model's weights as they
are then (pretrained or resumed weights included). Driven by hand, outside a trainer
(``hook.before_train()``, then ``hook.after_step()`` after each optimizer step), it counts its
own steps.

Example::

    trainer.register_hooks([EMAHook(ema, trainer.model, checkpointer=trainer.checkpointer)])
"""

from __future__ import annotations

from detectron2.engine import HookBase
from torch import nn

from ..ema import EMA

__all__ = ["EMAHook"]


class EMAHook(HookBase):
    def __init__(self, ema: EMA, model: nn.Module, checkpointer=None):
        """``checkpointer``: an :class:`~d2ema.d2.checkpoint.EMACheckpointer`, if any, to tell
        whether the EMA was loaded from a checkpoint (then it is kept as loaded)."""
        self.ema = ema
        self.model = model
        self.checkpointer = checkpointer

    def before_train(self) -> None:
        if not getattr(self.checkpointer, "ema_loaded", False):
            self.ema.reset(self.model)

    def after_step(self) -> None:
        trainer = self.trainer
        self.ema.update(self.model, step=None if trainer is None else trainer.iter + 1)
