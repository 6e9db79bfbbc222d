"""Validation and test of raw and EMA weights in one Lightning evaluation: two passes.

Lightning runs one evaluation loop per validation (or ``trainer.validate()``/``test()``). With
the EMA callback's ``validate_both``, that loop runs twice: first on the model's own (raw)
weights, then with the EMA swapped in (`d2ema.EMA.swapped`: storage exchanged, no copy)
and every name the module logs renamed by `ema_metric_name` (``val/loss`` ->
``val_ema/loss``, ``val_loss`` -> ``val_loss_ema``). Each pass is a whole loop (epoch start and
end hooks, torchmetrics computed and reset), so the two never mix. The ``on_validation_end``
hooks (``ModelCheckpoint``, ``EarlyStopping``) run once, after both passes, with the raw weights
back, so ``ModelCheckpoint(monitor="val_ema/loss")`` sees both sets of metrics.

Example::

    ema_metric_name("val/acc")     # 'val_ema/acc'
    ema_metric_name("val_loss")    # 'val_loss_ema'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl

__all__ = ["ema_metric_name", "renamed_logging", "two_pass", "unwrap_loop"]


def ema_metric_name(name: str) -> str:
    """The name an EMA metric is logged under: ``_ema`` after the first path segment
    (``val/loss`` -> ``val_ema/loss``, so TensorBoard groups it beside ``val``) or after the
    whole name when it has no ``/`` (``val_loss`` -> ``val_loss_ema``)."""
    head, sep, tail = name.partition("/")
    return f"{head}_ema/{tail}" if sep else f"{name}_ema"


@contextlib.contextmanager
def renamed_logging(module: pl.LightningModule) -> Iterator[None]:
    """Inside, ``module.log`` (and so ``log_dict``) logs under `ema_metric_name`."""
    had = "log" in vars(module)
    original = module.log

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        original(ema_metric_name(name), value, *args, **kwargs)

    object.__setattr__(module, "log", log)
    try:
        yield
    finally:
        if had:
            object.__setattr__(module, "log", original)
        else:
            object.__delattr__(module, "log")


_Swap = Callable[[pl.Trainer], contextlib.AbstractContextManager | None]


def two_pass(loop: Any, ema_weights: _Swap) -> None:
    """Make ``loop.run()`` evaluate raw then EMA weights (see the module docstring).

    ``ema_weights(trainer)`` returns the context that puts the EMA into the module, or None to
    evaluate the raw weights only this time (sanity check, no EMA yet).
    """
    if "run" in vars(loop):
        return
    original_run = loop.run

    def run() -> list:
        trainer = loop.trainer
        swap = ema_weights(trainer)
        if swap is None:
            return original_run()
        end = loop._on_evaluation_end
        # Pass 1: raw weights; its end hooks wait for pass 2 (only its results are cleared).
        loop._on_evaluation_end = lambda *a, **k: trainer._logger_connector.reset_results()
        try:
            raw = original_run()
        finally:
            del loop._on_evaluation_end
        if loop.skip:
            return raw
        stack = contextlib.ExitStack()

        def end_with_raw_weights(*args: Any, **kwargs: Any) -> None:
            stack.close()  # raw weights and plain names back before any callback looks
            end(*args, **kwargs)

        loop._on_evaluation_end = end_with_raw_weights
        try:
            stack.enter_context(swap)
            stack.enter_context(renamed_logging(trainer.lightning_module))
            ema = original_run()
        finally:
            stack.close()
            del loop._on_evaluation_end
        return [{**a, **b} for a, b in zip(raw, ema)] if ema else raw

    loop.run = run


def unwrap_loop(loop: Any) -> None:
    """Undo `two_pass`."""
    if "run" in vars(loop):
        del loop.run
