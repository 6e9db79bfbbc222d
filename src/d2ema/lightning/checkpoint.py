"""The EMA in Lightning checkpoints and files: D2Go's ``model_ema`` key, exports, safe writes.

A Lightning checkpoint written with the `EMA` callback holds

* ``checkpoint["callbacks"]["EMA..."]``: the core EMA's ``state_dict()`` (``ema_state`` tensors
  and ``ema_meta``: format version, step, schedule), what an exact resume needs;
* ``checkpoint["model_ema"]``: the same tensors as a plain name->tensor dict, the key D2Go's
  Lightning ``DefaultTask`` writes and reads (names relative to the averaged module: with
  ``module="model"`` they are a D2Go task's). The two share storage: the file holds them once.

A checkpoint without our callback state but with ``model_ema`` (D2Go's ``DefaultTask``) or
``ema_state`` (D2Go's detectron2 runner, older D2Go) loads as a plain EMA state.

`AtomicCheckpointIO` writes each checkpoint to a temporary file next to its target and
renames it into place (``fsync`` first), so a kill during a save leaves the previous checkpoint;
Lightning's own ``TorchCheckpointIO`` writes through a temporary file in the system's temporary
folder and moves it, which is a copy (and can be cut short) when that folder is on another disk.
It reads with ``torch.load(weights_only=True)`` and answers a truncated file with one line.

Example::

    trainer = pl.Trainer(callbacks=[EMA(module="model")], plugins=[AtomicCheckpointIO()])
    ckpt = torch.load("last.ckpt", weights_only=True)
    task.model.load_state_dict(ckpt["model_ema"])      # the EMA weights, as D2Go would
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from d2ema.lightning._engine import atomic_save
from d2ema.lightning.errors import LightningEMAError

__all__ = ["D2GO_KEY", "AtomicCheckpointIO", "align_prefix", "export_weights", "foreign_state"]

D2GO_KEY = "model_ema"  # D2Go's Lightning DefaultTask
_D2GO_OLD_KEY = "ema_state"  # D2Go's detectron2 runner and older D2Go checkpoints


def foreign_state(checkpoint: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """``(key, state)`` of an EMA written by D2Go (``model_ema``, else ``ema_state``), or None."""
    for key in (D2GO_KEY, _D2GO_OLD_KEY):
        state = checkpoint.get(key)
        if isinstance(state, Mapping) and state:
            return key, state
    return None


def align_prefix(state: Mapping[str, Any], expected: set[str]) -> Mapping[str, Any]:
    """``state`` with names moved by one leading module name when that makes them fit
    ``expected``: D2Go's ``model_ema`` names a task's ``model`` (``backbone.conv.weight``),
    an EMA of the whole LightningModule ``model.backbone.conv.weight``, and back."""
    tensors = state.get("ema_state", state)
    names = set(tensors) if isinstance(tensors, Mapping) else set()
    if not names or names <= expected:
        return state
    heads = {n.split(".", 1)[0] for n in expected if "." in n}
    for head in sorted(heads):
        if {f"{head}.{n}" for n in names} <= expected:
            moved = {f"{head}.{n}": t for n, t in tensors.items()}
            break
        if all(n.startswith(head + ".") for n in names) and {
                n[len(head) + 1:] for n in names} <= expected:
            moved = {n[len(head) + 1:]: t for n, t in tensors.items()}
            break
    else:
        return state
    return {**state, "ema_state": moved} if "ema_state" in state else moved


def export_weights(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``module.state_dict()`` (CPU copies) to ``path``, complete or not at all; the EMA
    is put in by the caller (inside `d2ema.EMA.swapped`)."""
    path = Path(path)
    state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    try:
        atomic_save(state, path)
    except OSError as e:
        raise LightningEMAError(f"cannot write the EMA weights to {path}: {e.strerror or e}; "
                                "nothing was replaced") from e
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written complete or not at all, read as plain data only.

    Example::

        trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[EMA()])
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise LightningEMAError("AtomicCheckpointIO takes no storage_options: it writes "
                                    "local files; use Lightning's own CheckpointIO for remote "
                                    "storage")
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path: Any, map_location: Callable | Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise LightningEMAError(f"checkpoint {path} does not exist or is not a file")
        try:
            # plain data only, whatever the caller asks: a checkpoint never runs code here
            checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LightningEMAError(
                f"cannot read checkpoint {path} ({first}): it is truncated, not a PyTorch file, "
                "or holds more than plain data; resume from the checkpoint before it") from e
        if not isinstance(checkpoint, dict):
            raise LightningEMAError(f"checkpoint {path} holds a {type(checkpoint).__name__}, "
                                    "not a dict")
        return checkpoint
