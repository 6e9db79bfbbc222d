"""The checkpoint format of an EMA: the one place that knows ``ema_state`` and ``ema_meta``.

A checkpoint holds the EMA under two keys::

    {"ema_state": {name: tensor, ...},      # plain, exactly what D2Go and the seed article write
     "ema_meta": {"format_version": 1, "step": ..., "num_skipped": ..., "schedule": {...},
                  "every": ..., "start": ..., "master_dtype": ...}}

``ema_state`` stays a plain name->tensor dict so that D2Go's and the article's checkpoints load
here and ours load there; ``ema_meta`` rides beside it with what an exact resume needs. A plain
name->tensor dict (D2Go's ``EMAState.state_dict()``) is accepted wherever a state is loaded.

Example::

    tensors, meta = split_state(torch.load(path)["ema_state"])
    problems = compare({n: (t.shape, t.dtype) for n, t in tensors.items()}, expected, "the file")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from d2ema.errors import EMAStateError

__all__ = [
    "FORMAT_VERSION",
    "MAX_STEP",
    "META_KEY",
    "STATE_KEY",
    "align_names",
    "checkpoint_problems",
    "compare",
    "dtype_kind",
    "has_ema",
    "meta_problems",
    "nonfinite_names",
    "shorten",
    "split_state",
    "state_problems",
    "tensor_problems",
]


FORMAT_VERSION = 1


STATE_KEY = "ema_state"


META_KEY = "ema_meta"


_WRAPPER_PREFIX = "module."


def has_ema(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint carries an EMA (``ema_state`` with tensors in it)."""
    state = checkpoint.get(STATE_KEY)
    return isinstance(state, Mapping) and len(state) > 0


def split_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(tensors, meta)`` of our format or of a plain name->tensor dict (meta None)."""
    if STATE_KEY in state_dict and isinstance(state_dict[STATE_KEY], Mapping):
        tensors, meta = dict(state_dict[STATE_KEY]), state_dict.get(META_KEY)
    else:
        tensors, meta = dict(state_dict), None
    bad = sorted(n for n, t in tensors.items() if not isinstance(t, torch.Tensor))
    if bad:
        raise EMAStateError(
            f"cannot load this EMA state; the EMA is unchanged: entries {bad[:5]} are not "
            "tensors (expected {'ema_state': {name: tensor}, 'ema_meta': {...}} or a plain "
            "name->tensor dict)"
        )
    if meta is not None and not isinstance(meta, Mapping):
        raise EMAStateError(
            f"cannot load this EMA state; the EMA is unchanged: ema_meta is a "
            f"{type(meta).__name__}, not a dict"
        )
    return tensors, (dict(meta) if meta is not None else None)


def align_names(theirs: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """Match the names of ``theirs`` to ``reference`` across a wrapper's ``module.`` prefix.

    A state saved from ``DistributedDataParallel(model)`` by hand carries ``module.`` before
    every name; the prefix is stripped (or added) only when no name matches as it is and every
    name of one side carries it.
    """
    theirs = dict(theirs)
    if not theirs or set(theirs) & set(reference):
        return theirs
    p = _WRAPPER_PREFIX
    if all(n.startswith(p) for n in theirs):
        return {n[len(p) :]: t for n, t in theirs.items()}
    if reference and all(n.startswith(p) for n in reference):
        return {p + n: t for n, t in theirs.items()}
    return theirs


def dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def compare(
    given: Mapping[str, tuple[torch.Size, torch.dtype]],
    expected: Mapping[str, tuple[torch.Size, torch.dtype]],
    source: str,
    allow_missing: bool = False,
) -> list[str]:
    """Every difference in names, shapes and dtype kinds, one line each (empty: they fit)."""
    problems = []
    if not allow_missing:
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        if missing:
            problems.append(f"missing in {source} ({len(missing)}): {shorten(missing)}")
        if unexpected:
            problems.append(f"unexpected in {source} ({len(unexpected)}): {shorten(unexpected)}")
    for name in sorted(set(given) & set(expected)):
        (gs, gd), (es, ed) = given[name], expected[name]
        if tuple(gs) != tuple(es):
            problems.append(f"{name}: shape {tuple(gs)} in {source}, EMA has {tuple(es)}")
        elif dtype_kind(gd) != dtype_kind(ed):
            problems.append(f"{name}: dtype {gd} in {source}, EMA has {ed} ({dtype_kind(ed)})")
    return problems


def nonfinite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of floating/complex tensors holding NaN or Inf (one reduction each)."""
    return sorted(
        n for n, t in tensors.items()
        if (t.is_floating_point() or t.is_complex()) and t.numel()
        and not bool(torch.isfinite(t).all())
    )


def tensor_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """What makes tensors unloadable into an EMA, one line per kind of problem: no data (the
    meta device), not a dense tensor (sparse, quantized, nested), NaN or Inf values."""
    no_data = sorted(n for n, t in tensors.items() if t.device.type == "meta")
    not_dense = sorted(
        f"{n} ({'quantized' if t.is_quantized else 'nested' if t.is_nested else t.layout})"
        for n, t in tensors.items()
        if n not in no_data and (t.layout != torch.strided or t.is_quantized or t.is_nested)
    )
    # a view whose shape asks for more elements than its storage holds (zero strides: 10^12
    # elements on 4 bytes) would be expanded to its full size by the first check that reads it
    not_dense += sorted(
        f"{n} (shape {tuple(t.shape)} on {t.untyped_storage().nbytes()} bytes)"
        for n, t in tensors.items()
        if n not in no_data and t.layout == torch.strided and not t.is_quantized
        and not t.is_nested and t.numel() * t.element_size() > t.untyped_storage().nbytes()
    )
    problems = []
    if no_data:
        problems.append(f"tensors on the meta device hold no data ({len(no_data)}): "
                        f"{shorten(no_data)}")
    if not_dense:
        problems.append(f"tensors that are not dense ({len(not_dense)}): {shorten(not_dense)}; "
                        "save the EMA's own state_dict()")
    if not problems:
        bad = nonfinite_names(tensors)
        if bad:
            problems.append(
                f"tensors holding NaN or Inf ({len(bad)}): {shorten(bad)}; resume from an "
                "earlier checkpoint, or drop 'ema_state' to restart the EMA from the weights"
            )
    return problems


def _int_problem(meta: Mapping[str, Any], key: str, low: int) -> str | None:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return f"ema_meta {key} {value!r} is not an integer >= {low}"
    return None


def meta_problems(meta: Mapping[str, Any]) -> list[str]:
    """What is wrong with an ``ema_meta`` dict, one line each (empty: it can be applied)."""
    problems = []
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        problems.append(f"ema_meta format_version {version!r} is not an integer >= 0")
    elif version > FORMAT_VERSION:
        problems.append(
            f"ema_meta format_version {version!r} is newer than this d2ema reads "
            f"({FORMAT_VERSION}); upgrade d2ema"
        )
    lows = {"step": 0, "num_skipped": 0, "every": 1, "start": 0}
    problems += [p for k, low in lows.items() if k in meta and (p := _int_problem(meta, k, low))]
    problems += [f"ema_meta {k} {meta[k]!r} is more than {MAX_STEP} steps, which no training "
                 "takes" for k in lows if isinstance(meta.get(k), int) and meta[k] > MAX_STEP]
    if meta.get("nonfinite_step") is not None and (p := _int_problem(meta, "nonfinite_step", 0)):
        problems.append(p)
    schedule = meta.get("schedule")
    if schedule is not None and not isinstance(schedule, str) and not (
        isinstance(schedule, Mapping) and isinstance(schedule.get("name"), str)
    ):
        problems.append(
            f"ema_meta schedule {_brief(schedule)} is neither a schedule dict "
            "({'name': ..., ...}) nor a string"
        )
    dtype = meta.get("master_dtype")
    if dtype is not None and not isinstance(dtype, str):
        problems.append(f"ema_meta master_dtype {_brief(dtype)} is not a string")
    return problems


def state_problems(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None,
    expected: Mapping[str, tuple[torch.Size, torch.dtype]],
    strict: bool = True,
) -> list[str]:
    """Everything that keeps ``tensors`` and ``meta`` from loading into an EMA that holds
    ``expected`` (name -> shape, dtype), one line each: names, shapes, dtype kinds (missing and
    unexpected names allowed unless ``strict``), tensor kinds, NaN/Inf, metadata values."""
    problems = compare({n: (t.shape, t.dtype) for n, t in tensors.items()}, expected,
                       "the checkpoint", allow_missing=not strict)
    problems += tensor_problems(tensors)
    return problems + (meta_problems(meta) if meta is not None else [])


MAX_STEP = 10**9
"""The most steps (iterations, EMA updates) a checkpoint may record: a billion."""


def checkpoint_problems(checkpoint: Any) -> list[str]:
    """Everything that keeps a training, EMA or export checkpoint (``torch.load``-ed) from being
    used, one line each, checked whole before any of it is: a dict; its ``model`` a dict whose
    tensors are dense and hold data (no meta tensors) and are not complex; its ``ema_state``
    (if any) tensors that `tensor_problems` accepts, each of the dtype kind of the model's
    tensor of that name (an integer, bool or complex tensor never stands in for a floating
    weight); its ``ema_meta`` a format this code knows (`meta_problems`); its
    ``iteration`` a whole number between -1 and `MAX_STEP`. The one check of every
    command that reads a checkpoint (``train --resume``, ``--eval-only``, ``export``,
    ``posthoc``). Example::

        problems = checkpoint_problems(torch.load(path, weights_only=True))
    """
    if not isinstance(checkpoint, Mapping):
        return [f"holds a {type(checkpoint).__name__}, not a checkpoint dict"]
    problems = []
    model = checkpoint.get("model")
    model_tensors: dict[str, torch.Tensor] = {}
    if model is not None:
        if not isinstance(model, Mapping):
            return [f"its 'model' is a {type(model).__name__}, not a state dict"]
        if not all(isinstance(n, str) for n in model):
            return [f"its 'model' has names that are not strings: {_odd_names(model)}"]
        model_tensors = {n: t for n, t in model.items() if isinstance(t, torch.Tensor)}
        bad = sorted(n for n, t in model_tensors.items() if t.is_complex())
        if bad:
            problems.append(f"its model holds complex tensors ({len(bad)}): {shorten(bad)}")
        problems += [f"its model: {p}" for p in tensor_problems(model_tensors)
                     if "NaN" not in p]  # raw weights with NaN: the trainer's own checks say so
    it = checkpoint.get("iteration", 0)
    if isinstance(it, bool) or not isinstance(it, int) or not -1 <= it <= MAX_STEP:
        problems.append(f"its iteration is {_brief(it)}, not a step number (-1 to {MAX_STEP})")
    ema = checkpoint.get(STATE_KEY)
    if ema is not None:
        if not isinstance(ema, Mapping) or not all(isinstance(t, torch.Tensor)
                                                   for t in ema.values()):
            return [*problems, f"its '{STATE_KEY}' is not a dict of tensors"]
        if not all(isinstance(n, str) for n in ema):
            return [*problems, f"its '{STATE_KEY}' has names that are not strings: "
                    f"{_odd_names(ema)}"]
        tensors, meta = split_state(ema)
        tensors = align_names(tensors, model_tensors) if model_tensors else tensors
        kinds = sorted(f"{n} ({t.dtype}; the model's is {model_tensors[n].dtype})"
                       for n, t in tensors.items() if n in model_tensors
                       and dtype_kind(t.dtype) != dtype_kind(model_tensors[n].dtype))
        kinds += sorted(f"{n} ({t.dtype})" for n, t in tensors.items()
                        if n not in model_tensors and t.is_complex())
        if kinds:
            problems.append(f"its EMA holds tensors of another kind than the model's "
                            f"({len(kinds)}): {shorten(kinds, 3)}")
        problems += [f"its EMA: {p}" for p in tensor_problems(tensors) if "NaN" not in p]
        meta = checkpoint.get(META_KEY, meta)
        if meta is not None:
            problems += (meta_problems(meta) if isinstance(meta, Mapping)
                         else [f"its '{META_KEY}' is not a dict"])
    return problems


def _odd_names(state: Mapping[Any, Any]) -> str:
    return shorten([_brief(n) for n in state if not isinstance(n, str)], 3)


def _brief(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def shorten(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
