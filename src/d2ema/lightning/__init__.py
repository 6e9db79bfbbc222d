"""EMA of weights for Lightning training: the d2ema engine as a ``lightning.pytorch.Callback``.

`EMA` keeps an exponential moving average of a LightningModule (or of one of its
submodules, ``module="model"`` for a D2Go task) with d2ema's core `d2ema.EMA`: power EMA
of width 0.05 by default, fp32 master of bf16/fp16 weights, ``every``/``start``, an EMA kept on
the CPU, flat storage. It updates once per optimizer step (gradient accumulation and manual
optimization included) on every rank, validates raw and EMA weights side by side (EMA metrics
as ``val_ema/loss`` or ``val_loss_ema``, swapped in without a copy), keeps its state in
Lightning's checkpoint (and D2Go's ``model_ema`` key, both ways) and leaves the chosen weights
in the model when ``fit()`` ends. `PostHocEMA` adds post-hoc EMA: snapshots during
training, and at the end the EMA length a validation dataloader picks. `AtomicCheckpointIO`
writes checkpoints complete or not at all. Modules: ``callback`` (`EMA`), ``posthoc``,
``validation`` (the two passes), ``checkpoint`` (formats and files), ``errors``.

Example::

    import lightning.pytorch as pl
    from d2ema.lightning import EMA

    trainer = pl.Trainer(max_epochs=10, callbacks=[EMA()])   # power EMA, sigma_rel 0.05
    trainer.fit(module, train_loader, val_loader)            # logs val_loss and val_loss_ema
    # the module now holds the EMA weights; the raw ones are in the last checkpoint

Needs Lightning (``pip install 'd2ema[lightning]'``); ``import d2ema`` does not.
"""

from __future__ import annotations

from d2ema.lightning.errors import LightningEMAError, LightningMissingError

try:
    import lightning.pytorch  # noqa: F401
except ImportError as e:
    raise LightningMissingError(
        f"d2ema.lightning needs Lightning, which cannot be imported here ({e}); install it with: "
        "pip install 'd2ema[lightning]'"
    ) from None

from d2ema.lightning.callback import EMA, EMACallback
from d2ema.lightning.checkpoint import AtomicCheckpointIO
from d2ema.lightning.posthoc import PostHocEMA
from d2ema.lightning.validation import ema_metric_name

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "EMACallback",
    "LightningEMAError",
    "LightningMissingError",
    "PostHocEMA",
    "ema_metric_name",
]
