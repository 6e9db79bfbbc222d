"""A resume is exact or refused: the whole checkpoint is checked against the run before any
of it is loaded.

detectron2 loads a checkpoint leniently, which is right for starting from other weights
(``MODEL.WEIGHTS``): a missing or wrong-shaped tensor is left as initialised, with a warning.
Resuming a run (``--resume``) is different: a layer left random, or optimizer state of another
shape (which fails at the next step, after model and EMA were replaced), is never what was
meant. :func:`check_exact_resume` compares the checkpoint's model (every name and shape) and its
optimizer state (groups, parameters and the shape of every state tensor) with the run's and
raises one :class:`~d2ema.errors.CheckpointError` listing what differs; the EMA is checked by
:class:`~d2ema.d2.EMACheckpointer` before loading too.

Example::

    check_exact_resume(model, checkpointer.checkpointables, checkpoint, "output/model_0000999.pth")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError

__all__ = ["check_exact_resume"]


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
    """Raise :class:`CheckpointError` unless ``checkpoint`` fits ``model`` and the optimizer
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
