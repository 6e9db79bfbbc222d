"""Load a checkpoint's EMA into a model built from a config that differs in harmless ways.

detectron2 loads model weights leniently: names the checkpoint lacks or has in excess are
reported, not fatal. Evaluating with a config that differs from training's in such ways is
common: ``MODEL.BACKBONE.FREEZE_AT`` turns BatchNorm into FrozenBatchNorm, which has no
``num_batches_tracked``. :func:`plan_ema_load` gives the EMA the same leniency where it is safe
and stays strict where the result would be wrong weights:

* a buffer of the model that the EMA in the checkpoint lacks takes the value the model itself
  loads from the checkpoint (what an evaluation of that run used for untracked tensors too);
* an entry of the checkpoint's EMA that this model does not have is ignored;
* a *parameter* the checkpoint's EMA lacks, or any shape/dtype mismatch, refuses the load with
  nothing changed: those weights would stay at their build-time (random) values.

Both lenient cases are reported in one warning that says what differs.

Example::

    plan = plan_ema_load(ema, model, checkpoint["ema_state"], "model_final.pth")
    ...load the model...
    checkpoint["ema_state"] = plan.complete()   # now exactly the EMA's names
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..ema import EMA
from ..errors import EMAStateError
from ..format import align_names, shorten, split_state
from ..state import tracked_slots

__all__ = ["EMALoadPlan", "plan_ema_load"]

logger = logging.getLogger(__name__)

_FROZEN_BN_HINT = (
    "num_batches_tracked differs where one config has BatchNorm and the other FrozenBatchNorm "
    "(MODEL.BACKBONE.FREEZE_AT or MODEL.RESNETS.NORM differ from training): harmless"
)


@dataclasses.dataclass
class EMALoadPlan:
    """What a lenient load does: the checkpoint's tensors to keep, the buffers to fill from the
    loaded model, and the entries to ignore."""

    source: str
    tensors: dict[str, torch.Tensor]
    from_model: dict[str, Any]  # name -> Slot of the model (read after the model is loaded)
    ignored: list[str]

    def to_check(self) -> dict[str, torch.Tensor]:
        """The tensors the EMA will receive, with the model's current values as stand-ins, for
        checking shapes and dtypes before anything is loaded."""
        return {**self.tensors, **{n: s.get() for n, s in self.from_model.items()}}

    def complete(self) -> dict[str, torch.Tensor]:
        """The tensors to load, the model's values (read now) filling the missing buffers."""
        filled = {n: s.get().detach().clone() for n, s in self.from_model.items()}
        return {**self.tensors, **filled}

    def report(self) -> None:
        if not (self.from_model or self.ignored):
            return
        parts = []
        if self.from_model:
            parts.append(f"{len(self.from_model)} buffers of this model are not in it and keep "
                         f"the model's values as loaded ({shorten(sorted(self.from_model), 4)})")
        if self.ignored:
            parts.append(f"{len(self.ignored)} of its entries are not in this model and are "
                         f"ignored ({shorten(self.ignored, 4)})")
        names = [*self.from_model, *self.ignored]
        hint = f"; {_FROZEN_BN_HINT}" if all("num_batches_tracked" in n for n in names) else (
            "; the model or MODEL_EMA settings differ from training's")
        logger.warning("The EMA of %s: %s%s.", self.source, "; ".join(parts), hint)


def plan_ema_load(
    ema: EMA, model: nn.Module, ema_state: Mapping[str, Any], source: str = "the checkpoint"
) -> EMALoadPlan:
    """Match a checkpoint's ``ema_state`` to ``ema``; raise :class:`EMAStateError` if a
    parameter of the EMA is missing from it (nothing is changed)."""
    tensors, _ = split_state(ema_state)
    mine = ema._expected_state()  # the full EMA's names (also for a sharded one)
    tensors = align_names(tensors, mine)
    slots = {s.name: s for s in tracked_slots(model)}
    missing = [n for n in mine if n not in tensors]
    params = sorted(n for n in missing if n not in slots or slots[n].is_param)
    ignored = sorted(n for n in tensors if n not in mine)
    if params:
        extra = f"; it has {len(ignored)} this model lacks ({shorten(ignored, 4)})" * bool(ignored)
        raise EMAStateError(
            f"cannot load the EMA of {source}: {len(params)} parameters of this model are missing "
            f"in the checkpoint's EMA ({shorten(params, 4)}){extra}. It was made for another model "
            "or with other MODEL_EMA settings (INCLUDE_FROZEN, EXCLUDE); evaluate with the config "
            "of the run that wrote it (its OUTPUT_DIR/config.yaml), or the raw weights. Nothing "
            "was loaded"
        )
    return EMALoadPlan(
        source=source,
        tensors={n: t for n, t in tensors.items() if n in mine},
        from_model={n: slots[n] for n in missing},
        ignored=ignored,
    )
