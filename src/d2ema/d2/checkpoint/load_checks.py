"""What a checkpoint must satisfy before any of it is loaded.

A resume is exact or refused (`check_exact_resume`); an EMA saved from a config that
differs in harmless ways loads leniently where that is safe (`plan_ema_load`).

**Lenient EMA loads.** detectron2 loads model weights leniently: names the checkpoint lacks or has
in excess are reported, not fatal. Evaluating with a config that differs from training's in such
ways is common: ``MODEL.BACKBONE.FREEZE_AT`` turns BatchNorm into FrozenBatchNorm, which has no
``num_batches_tracked``. `plan_ema_load` gives the EMA the same leniency where it is safe and
stays strict where the result would be wrong weights:

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

**Exact resumes.** detectron2 loads a checkpoint leniently, which is right for starting from other
weights (``MODEL.WEIGHTS``): a missing or wrong-shaped tensor is left as initialised, with a
warning. Resuming a run (``--resume``) is different: a layer left random, or optimizer state of
another shape (which fails at the next step, after model and EMA were replaced), is never what was
meant. `check_exact_resume` compares the checkpoint's model (every name and shape) and its
optimizer state (groups, parameters and the shape of every state tensor) with the run's and raises
one `CheckpointError` listing what differs; the EMA is checked by
`EMACheckpointer` before loading too.

Example::

    check_exact_resume(model, checkpointer.checkpointables, checkpoint, "output/model_0000999.pth")
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from d2ema.averaging.state import tracked_slots
from d2ema.ema import EMA
from d2ema.errors import CheckpointError, EMAStateError
from d2ema.io.format import align_names, shorten, split_state

__all__ = ['EMALoadPlan', 'check_exact_resume', 'plan_ema_load']


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
    """Match a checkpoint's ``ema_state`` to ``ema``; raise `EMAStateError` if a
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


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else None


def _model_problems(model, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"its 'model' is a {type(saved).__name__}, not a state dict"]
    names = list(saved)
    if names and all(str(n).startswith("module.") for n in names):
        saved = {n[len("module."):]: v for n, v in saved.items()}
    current = model.state_dict()
    problems = []
    missing = [n for n in current if n not in saved]
    if missing:
        problems.append(f"the model lacks {len(missing)} tensors ({', '.join(missing[:3])})")
    extra = [n for n in saved if n not in current]
    if extra:
        problems.append(f"it has {len(extra)} tensors this model does not "
                        f"({', '.join(map(str, extra[:3]))})")
    for name, tensor in current.items():
        if name in saved and _shape(saved[name]) != tuple(tensor.shape):
            problems.append(f"model tensor {name} has shape {_shape(saved[name])}, this "
                            f"model's is {tuple(tensor.shape)}")
    return problems


def _optimizer_problems(optimizer, saved: Any) -> list[str]:
    groups = getattr(optimizer, "param_groups", None)
    if groups is None or saved is None:
        return []
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list) or (
        not isinstance(saved.get("state"), Mapping)
    ):
        return ["its optimizer state is not a torch optimizer state dict"]
    if len(saved["param_groups"]) != len(groups):
        return [f"its optimizer has {len(saved['param_groups'])} parameter groups, this run's "
                f"{len(groups)}"]
    params: dict[Any, Any] = {}
    for i, (old, new) in enumerate(zip(saved["param_groups"], groups)):
        ids = old.get("params") if isinstance(old, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(new["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            return [f"optimizer group {i} has {count} parameters, this run's "
                    f"{len(new['params'])}"]
        params.update(zip(ids, new["params"]))
    problems = []
    for pid, state in saved["state"].items():
        if pid not in params or not isinstance(state, Mapping):
            problems.append(f"optimizer state {pid!r} belongs to no parameter")
            continue
        for key, value in state.items():
            shape = _shape(value)
            if shape and shape != tuple(params[pid].shape):
                problems.append(f"optimizer state {key} of parameter {pid} has shape {shape}, "
                                f"the parameter's is {tuple(params[pid].shape)}")
    return problems


def check_exact_resume(model, checkpointables: Mapping[str, Any],
                       checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise `CheckpointError` unless ``checkpoint`` fits ``model`` and the optimizer
    among ``checkpointables`` exactly (see the module doc); loads nothing."""
    problems = _model_problems(model, checkpoint.get("model"))
    trainer_state = checkpoint.get("trainer")
    for where, it in (("iteration", checkpoint.get("iteration", 0)),
                      ("trainer.iteration", trainer_state.get("iteration", 0)
                       if isinstance(trainer_state, Mapping) else 0)):
        if type(it) is not int or not -1 <= it <= 10**12:
            problems.append(f"its {where} is {it!r}, not a step number")
    if "optimizer" in checkpointables:
        problems += _optimizer_problems(checkpointables["optimizer"], checkpoint.get("optimizer"))
    else:  # detectron2's trainers: trainer.optimizer, or trainer._trainer.optimizer
        holder, saved = checkpointables.get("trainer"), checkpoint.get("trainer")
        for _ in range(3):
            if holder is None or not isinstance(saved, Mapping):
                break
            if "optimizer" in saved:
                problems += _optimizer_problems(getattr(holder, "optimizer", None),
                                                saved["optimizer"])
                break
            holder, saved = getattr(holder, "_trainer", None), saved.get("_trainer")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"cannot resume exactly from {source}: {'; '.join(problems[:3])}{more}; nothing was "
            "loaded. Resume with the config that wrote it, or start a new run in another "
            f"OUTPUT_DIR (MODEL.WEIGHTS {source} starts from its weights)")
