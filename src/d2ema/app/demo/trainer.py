"""The demo's trainer: `EMATrainer` (one more EMA per extra decay comes from
``MODEL_EMA.EXTRA_DECAYS``, each evaluated at every evaluation), and concise progress lines."""

from __future__ import annotations

import time
from typing import Any

import torch
from detectron2.engine import HookBase, hooks
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from d2ema.app.demo.options import ema_prefix
from d2ema.app.demo.report import RunLog, duration
from d2ema.d2 import EMATrainer

__all__ = ["DemoTrainer"]


class _ProgressHook(HookBase):
    """Concise progress lines: iteration, loss, speed, ETA (training + remaining evals)."""

    def __init__(self, run: RunLog, period: int):
        self.run, self.period = run, period

    def before_train(self) -> None:
        self.run.train_started = time.perf_counter()

    def after_step(self) -> None:
        it = self.trainer.iter + 1
        if it % self.period and it != self.trainer.max_iter:
            return
        storage = self.trainer.storage
        loss = storage.history("total_loss").median(min(self.period, 20))
        elapsed = time.perf_counter() - self.run.train_started - self.run.eval_seconds
        per_iter = elapsed / max(it - self.trainer.start_iter, 1)
        max_iter = self.trainer.max_iter
        eta = (max_iter - it) * per_iter + self.run.remaining_evals(it) * self.run.eval_estimate()
        self.run.say(
            f"iter {it:>{len(str(max_iter))}}/{max_iter}  loss {loss:.3f}  "
            f"{per_iter:.2f} s/iter  ETA {duration(eta)}{self.run.latest_ap()}"
        )


def _renamed(results: dict[str, Any], decay: float) -> dict[str, Any]:
    """EMATrainer's ``ema/...`` keys -> ``ema_<decay>/...``."""
    prefix = ema_prefix(decay) + "/"
    return {(prefix + k[4:] if k.startswith("ema/") else k): v for k, v in results.items()}


class DemoTrainer(EMATrainer):
    """`EMATrainer` (its EMA: the first decay; the others are its
    ``MODEL_EMA.EXTRA_DECAYS``), all evaluated at each evaluation; concise progress lines."""

    def __init__(self, cfg, run: RunLog):
        self.run = run
        super().__init__(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW (detectron2 v0.6 builds SGD only), with the config's gradient clipping."""
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        )
        optimizer = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return optimizer(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    def build_hooks(self):
        run = self.run
        ret = super().build_hooks()
        period = self.cfg.TEST.EVAL_PERIOD
        ret = [hooks.EvalHook(period, self.evaluate_all) if isinstance(h, hooks.EvalHook) else h
               for h in ret]
        ret.append(_ProgressHook(run, run.print_period))
        return ret

    def evaluate_all(self) -> dict[str, Any]:
        """Raw weights and every EMA: ``{"bbox": ..., "ema_0.99/bbox": ..., ...}``."""
        started = time.perf_counter()
        with self.run.quiet_stdout():  # raw, the trainer's EMA, the extras (ema_<decay>/...)
            results = _renamed(self.test(self.cfg, self.model), self.run.decays[0])
        self.run.record(min(self.iter + 1, self.max_iter), results,
                        time.perf_counter() - started)
        self._last_eval_results = results
        return results


