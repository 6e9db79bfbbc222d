"""``EMA``: the Lightning callback that keeps d2ema's EMA of a LightningModule.

One core `d2ema.EMA` (or `d2ema.ShardedEMA`) does all the work; the callback only
says when: built when ``fit()`` starts (the model on its device and in its precision; with
``flat=True`` in ``setup``, before the optimizer and DDP), updated when an optimizer step happened
(``trainer.global_step`` moved: gradient accumulation and manual optimization count real steps
only), swapped in for a second validation pass (`validation`), saved
in Lightning's checkpoint (`checkpoint`) and copied into the model when
``fit()`` ends (``final="ema"``, the default) or not (``final="raw"``).

Example::

    trainer = pl.Trainer(max_steps=10_000, accumulate_grad_batches=4,
                         callbacks=[EMA(), ModelCheckpoint(monitor="val_ema/loss")])
    trainer.fit(module, datamodule=data)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import d2ema
from d2ema.distributed import averaged_buffers, full_state_dict
from d2ema.lightning.checkpoint import D2GO_KEY, align_prefix, export_weights, foreign_state
from d2ema.lightning.errors import LightningEMAError
from d2ema.lightning.validation import two_pass, unwrap_loop

__all__ = ["EMA", "EMACallback"]

logger = logging.getLogger(__name__)

_REFUSED = {
    "FSDPStrategy": "FSDPStrategy (FSDP1) keeps flat parameter shards the EMA cannot follow; "
                    "use ModelParallelStrategy (fully_shard in configure_model: the EMA averages "
                    "each rank's DTensor shards) or DDPStrategy with EMA(sharded=True)",
    "DeepSpeedStrategy": "DeepSpeed partitions parameters outside torch's view, so the EMA cannot "
                         "follow them; use DDPStrategy with EMA(sharded=True) (ZeRO-like EMA "
                         "memory) or ModelParallelStrategy (FSDP2)",
}


def _info(trainer: pl.Trainer, message: str, *args: Any) -> None:
    if trainer.is_global_zero:
        logger.info("d2ema: " + message, *args)


class EMA(Callback):
    """Exponential moving average of a LightningModule's weights, by d2ema's engine.

    Args:
        decay: the decay (the ceiling of a ramping schedule; unused by ``sigma_rel``).
        schedule: ``"sigma_rel"`` (default: power EMA, width 0.05, as docs/ema-length.md
            recommends), ``"constant"``, ``"yolov5"``, ``"tf"``, ``"power"`` (see
            `d2ema.EMA`).
        schedule_params: e.g. ``{"sigma_rel": 0.1}`` or ``{"tau": 2000}``.
        module: the attribute of the LightningModule to average (``"model"`` for a D2Go task,
            whose ``model_ema`` names are then D2Go's); None: the whole LightningModule.
        validate_both: validate and test the EMA too, logged as ``val_ema/...`` /
            ``..._ema`` (`ema_metric_name`).
        final: the weights the model holds when ``fit()`` ends: ``"ema"`` or ``"raw"``.
        sharded: under DDP, split the EMA over the ranks (`d2ema.ShardedEMA`).
        average_buffers: under DDP, average BN statistics over the ranks before each update
            (`d2ema.distributed.averaged_buffers`), so every rank holds the same EMA.
        **ema_kwargs: passed to `d2ema.EMA`: ``every``, ``start``, ``device`` (``"cpu"``:
            an EMA of a GPU model in host memory, updated in the background),
            ``master_dtype`` (fp32 master of bf16/fp16 weights by default), ``flat``,
            ``exclude``, ``include_buffers``, ``skip_nonfinite``, ...

    Example::

        ema = EMA(schedule="constant", decay=0.999, every=2)
        trainer = pl.Trainer(callbacks=[ema])
        trainer.fit(module, train_loader, val_loader)
        ema.export("ema_weights.pth")          # the EMA as a plain state_dict file
    """

    def __init__(self, decay: float = 0.9998, *, schedule: Any = "sigma_rel",
                 schedule_params: Mapping[str, Any] | None = None, module: str | None = None,
                 validate_both: bool = True, final: str = "ema", sharded: bool = False,
                 average_buffers: bool = True, **ema_kwargs: Any):
        if final not in ("ema", "raw"):
            raise LightningEMAError(f"final={final!r}: use 'ema' or 'raw'")
        if "schedule" in ema_kwargs or "decay" in ema_kwargs:
            raise LightningEMAError("give decay and schedule once")
        self.decay, self.schedule = decay, schedule
        self.schedule_params = dict(schedule_params or {})
        self.module, self.validate_both, self.final = module, validate_both, final
        self.sharded, self.average_buffers = sharded, average_buffers
        self.ema_kwargs = ema_kwargs
        self.ema: d2ema.EMA | None = None  # the engine, built when fit() starts
        self._pending: tuple[Mapping[str, Any], str] | None = None  # a state loaded before it
        self._last_step = 0
        self._final_applied = False
        self._saving: dict[str, Any] | None = None
        self._told: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    # ------------------------------------------------------------------ the engine
    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module averaged: ``pl_module`` or its ``module`` attribute."""
        if not self.module:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            raise LightningEMAError(
                f"EMA(module={self.module!r}): {type(pl_module).__name__} has no submodule "
                f"{self.module!r}; name one of {[n for n, _ in pl_module.named_children()]} "
                "or leave module=None for the whole LightningModule") from None

    def _make_engine(self, trainer: pl.Trainer, target: nn.Module) -> d2ema.EMA:
        cls = d2ema.ShardedEMA if self.sharded else d2ema.EMA
        return cls(target, self.decay, schedule=self.schedule,
                   schedule_params=self.schedule_params, **self.ema_kwargs)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        names = [c.__name__ for c in type(trainer.strategy).__mro__]
        for name, why in _REFUSED.items():
            if name in names:
                raise LightningEMAError(f"d2ema.lightning.EMA cannot run under {why}")
        if self.sharded and trainer.world_size > 1 and "DDPStrategy" not in names:
            raise LightningEMAError(
                f"EMA(sharded=True) splits a replicated model's EMA over DDP ranks; under "
                f"{type(trainer.strategy).__name__} use EMA() (it follows the model's shards)")

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_strategy(trainer)
        self._module_now = pl_module
        self.ema = self._make_engine(trainer, self.target(pl_module))
        self._final_applied = False
        if self._pending is not None:
            state, source = self._pending
            self._pending = None
            self._apply(state, source, pl_module)
        self._last_step = trainer.global_step
        _info(trainer, "%r of %s", self.ema, self.module or type(pl_module).__name__)

    def _receive(self, state: Mapping[str, Any], source: str,
                 pl_module: pl.LightningModule | None) -> None:
        if self.ema is not None and pl_module is not None:
            self._apply(state, source, pl_module)
        else:
            self._pending = (state, source)

    def _apply(self, state: Mapping[str, Any], source: str, pl_module: pl.LightningModule) -> None:
        assert self.ema is not None
        target = self.target(pl_module)
        names = {n for n, _ in target.named_parameters()} | {n for n, _ in target.named_buffers()}
        self._load_engine(align_prefix(state, names))
        logger.info("d2ema: EMA loaded from %s (step %d)", source, self.ema.step)

    def _load_engine(self, state: Mapping[str, Any]) -> None:
        assert self.ema is not None
        self.ema.load_state_dict(state)

    # ------------------------------------------------------------------ hooks: training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.validate_both:
            for loop in (trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop,
                         trainer.test_loop):
                two_pass(loop, self._ema_weights)
        if stage != "fit":
            return
        # a new fit() starts a new EMA; one to continue comes from its checkpoint (restored
        # after setup, so it finds the engine built here or is kept for on_fit_start)
        self.ema, self._pending, self._final_applied = None, None, False
        if self.ema_kwargs.get("flat"):
            self._build(trainer, pl_module)  # before the optimizer and DDP see the parameters

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is None:
            self._build(trainer, pl_module)
        self._last_step = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a resume, the loops (and global_step) are restored only now
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or self.ema is None:
            return  # no optimizer step in this batch (accumulation, a skipped step)
        self._last_step = step
        if step <= self.ema.step:
            return  # the EMA has this step already (loaded from a later checkpoint)
        self._update(trainer, pl_module, step)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        assert self.ema is not None
        target = self.target(pl_module)
        many = self.average_buffers and trainer.world_size > 1
        with averaged_buffers(target) if many else contextlib.nullcontext():
            self._step_engine(target, step)

    def _step_engine(self, target: nn.Module, step: int) -> None:
        assert self.ema is not None
        self.ema.update(target, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self.ema
        if ema is None or ema.provenance == "built":
            _info(trainer, "fit() ended; the model keeps its weights (the EMA never updated)")
            return
        if self.final == "raw":
            _info(trainer, "fit() ended; the model keeps its raw weights (final='raw'); the EMA "
                  "(step %d) is in the checkpoint and export()", ema.step)
            return
        ema.copy_to(self.target(pl_module))
        self._final_applied = True
        _info(trainer, "fit() ended; the model now holds the EMA weights (step %d, %s); the raw "
              "weights are in the last checkpoint (EMA(final='raw') keeps them in the model)",
              ema.step, ema.meta()["schedule"])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for loop in (trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop,
                     trainer.test_loop):
            unwrap_loop(loop)
        if self.ema is not None:
            self.ema.synchronize()

    # ------------------------------------------------------------------ hooks: evaluation
    def _ema_weights(self, trainer: pl.Trainer) -> contextlib.AbstractContextManager | None:
        """The context that swaps the EMA in for the second pass, or None (raw only)."""
        pl_module = trainer.lightning_module
        if trainer.sanity_checking or (self.ema is None and self._pending is None):
            return None
        if self.ema is None:  # validate()/test() of a checkpoint: build and load it now
            self._build(trainer, pl_module)
        assert self.ema is not None
        if self._final_applied:
            if "final" not in self._told:
                self._told.add("final")
                _info(trainer, "the model holds the EMA weights since fit() ended: evaluating "
                      "them once (no _ema metrics)")
            return None
        if self.ema.provenance == "built":
            return None
        return self.ema.swapped(self.target(pl_module))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return dict(self._pending[0]) if self._pending else {}
        # every rank: gathers a ShardedEMA, and FSDP2's DTensor shards into full tensors (a
        # checkpoint's callback states are saved with torch.save, which takes no DTensor)
        self._saving = full_state_dict(self.ema)
        return self._saving

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._receive(state_dict, "the checkpoint's EMA callback state", self._module_now)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved, self._saving = self._saving, None
        if saved is None and self.ema is not None:
            saved = full_state_dict(self.ema)
        if saved:
            # D2Go's key, the same tensors (stored once): D2Go's DefaultTask reads it.
            checkpoint[D2GO_KEY] = dict(saved.get("ema_state", saved))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._module_now = pl_module
        if self.state_key in checkpoint.get("callbacks", {}):
            return  # load_state_dict() comes next with our own state
        found = foreign_state(checkpoint)
        if found is None:
            _info(trainer, "the checkpoint has no EMA; the EMA starts from its weights")
            return
        key, state = found
        self._receive(state, f"the checkpoint's {key!r} (D2Go's format)", pl_module)

    _module_now: pl.LightningModule | None = None

    # ------------------------------------------------------------------ files
    def export(self, path: str | os.PathLike[str],
               pl_module: pl.LightningModule | None = None) -> str:
        """Write the EMA weights of the averaged module as a plain ``state_dict`` file (the
        model's dtypes, CPU tensors), complete or not at all; returns the path."""
        module = pl_module if pl_module is not None else self._module_now
        if self.ema is None or module is None:
            raise LightningEMAError("no EMA to export yet: export after trainer.fit()")
        target = self.target(module)
        ctx = contextlib.nullcontext() if self._final_applied else self.ema.swapped(target)
        with ctx, torch.no_grad():
            return str(export_weights(target, path))


EMACallback = EMA
"""Another name of `EMA`, for code that already has a class named ``EMA``."""
