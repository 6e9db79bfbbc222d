"""``EMAUpdateHook``: the detectron2 hook that keeps the EMA up to date during training.

One job: after every iteration's optimizer step, fold the weights into the average, with the
step counter taken from the trainer's iteration (``iter + 1``), so the decay schedule of a
resumed run continues exactly where it stopped. It runs in ``after_step``, which on detectron2
v0.6 and main alike comes after ``optimizer.step()``; it never updates in ``after_backward``
(main's extra hook point), which comes before the step and would average stale weights.

Before training, an EMA that no checkpoint provided restarts from the model's weights as they
are then (pretrained or resumed weights included), and a constant decay that would leave the
EMA mostly its starting weights at ``max_iter`` is warned about (`d2ema.d2.engine.build`). The
model's extra and post-hoc EMAs (`d2ema.d2.engine.build`), if any, are updated in the same step
and snapshotted on schedule. Driven by hand, outside a trainer (``hook.before_train()``, then
``hook.after_step()`` after each optimizer step), it counts its own steps.

In a multi-process job (``launch``) every rank runs the hook: the EMA folds in each floating
buffer's mean over the ranks (`d2ema.distributed.averaged_buffers`), so every rank holds
the same EMA after every step, BN statistics included. A `ShardedEMA` is
gathered on the main process at the iterations where its ``PeriodicCheckpointer`` saves
(``checkpoint_period`` and the last iteration), since that hook runs there only.

Example::

    trainer.register_hooks([EMAUpdateHook(ema, trainer.model, checkpointer=trainer.checkpointer)])
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from detectron2.engine import HookBase
from torch import nn

from d2ema.d2.engine.build import initial_share_warning, log_run_cost
from d2ema.d2.family import get_ema_family, get_settings
from d2ema.distributed import ShardedEMA, averaged_buffers
from d2ema.ema import EMA

if TYPE_CHECKING:
    from d2ema.d2.checkpoint.checkpointers import EMACheckpointer


__all__ = ['EMAUpdateHook']


logger = logging.getLogger(__name__)


class EMAUpdateHook(HookBase):
    def __init__(self, ema: EMA, model: nn.Module, checkpointer: EMACheckpointer | None = None,
                 checkpoint_period: int = 0):
        """``checkpointer``: an `EMACheckpointer`, if
        any, to tell
        whether the EMA was loaded from a checkpoint (then it is kept as loaded).
        ``checkpoint_period``: the ``PeriodicCheckpointer``'s period (for a sharded EMA)."""
        self.ema = ema
        self.model = model
        self.checkpointer = checkpointer
        self.checkpoint_period = checkpoint_period

    def _max_iter(self) -> int | None:
        return getattr(self.trainer, "max_iter", None)

    def before_train(self) -> None:
        if not getattr(self.checkpointer, "ema_loaded", False):
            with averaged_buffers(self.model):
                self.ema.reset(self.model)
        family, max_iter = get_ema_family(self.model), self._max_iter()
        if max_iter:
            settings = get_settings(self.model)
            key = settings.key if settings is not None else None
            emas = {"MODEL_EMA": self.ema, **(family.extras if family else {})}
            for name, ema in emas.items():
                message = initial_share_warning(ema, max_iter, name=f"the EMA {name}", key=key)
                if message:
                    logger.warning(message)
        if family is not None:
            with averaged_buffers(self.model):
                family.before_train(self.model, max_iter, getattr(self.trainer, "start_iter", 0))
        log_run_cost(self.trainer, self.model, self.ema)

    def after_step(self) -> None:
        trainer = self.trainer
        family = get_ema_family(self.model)
        with averaged_buffers(self.model):
            self.ema.update(self.model, step=None if trainer is None else trainer.iter + 1)
            if family is not None:
                family.after_step(self.model, self.ema.step, self._max_iter())
        if isinstance(self.ema, ShardedEMA) and self._checkpoint_now():
            self.ema.gather(dst=0)

    def after_train(self) -> None:
        family = get_ema_family(self.model)
        if family is not None:
            family.after_train()

    def _checkpoint_now(self) -> bool:
        trainer = self.trainer
        if trainer is None:
            return False
        period, it = self.checkpoint_period, trainer.iter
        return bool(period and (it + 1) % period == 0) or it >= trainer.max_iter - 1
