"""Which tensors of a model the EMA tracks, and how their averages are stored.

A model is first unwrapped (DDP, DataParallel, ``torch.compile``) so that names never carry a
wrapper's prefix: the EMA of ``DDP(model)`` and of ``model`` have the same names, which are the
names ``model.named_parameters()`` / ``named_buffers()`` give (what D2Go and the seed save).

Averages live in `TensorGroup` s, one per (device, dtype, averaged-or-copied): a single
contiguous 1-D buffer each, with one view per tracked tensor. One buffer per group is what lets
the update run as a handful of fused ops instead of one op chain per tensor.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from torch import nn

from d2ema.errors import EMAStateError
from d2ema.io.format import compare

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


__all__ = [
    "Slot",
    "TensorGroup",
    "check_structure",
    "clean_name",
    "dense_strides",
    "gatherable",
    "group_slots",
    "is_dtensor",
    "match_slots",
    "plan_groups",
    "same_layout",
    "tracked_slots",
    "unwrap_model",
    "views",
]


# Name segments that wrappers insert between a module and its children.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the weights: strips DDP/DataParallel/FSDP and ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module"):
            model = cast(nn.Module, model.module)
        else:
            return model


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters are)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def clean_name(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a tracked tensor lives: ``module._parameters[attr]`` or ``module._buffers[attr]``.

    ``local``: the tensor there is a DTensor (FSDP2) and the EMA tracks this rank's shard of it.
    """

    name: str
    module: nn.Module
    attr: str
    is_param: bool
    local: bool = False

    def tensor(self) -> torch.Tensor:
        """The tensor as registered (the DTensor itself for a local slot)."""
        table = self.module._parameters if self.is_param else self.module._buffers
        return cast(torch.Tensor, table[self.attr])

    def get(self) -> torch.Tensor:
        """The tensor the EMA averages: the registered one, or this rank's shard of it."""
        t = self.tensor()
        return cast(Any, t)._local_tensor if self.local else t  # local: t is a DTensor


def tracked_slots(
    model: nn.Module,
    include_frozen: bool = True,
    include_buffers: bool = True,
    exclude: Sequence[str] = (),
) -> list[Slot]:
    """The model's tracked tensors in ``named_parameters()`` then ``named_buffers()`` order.

    ``exclude`` holds regular expressions searched in each name, e.g. ``r"weight_[uv]$"`` for
    spectral norm's power-iteration vectors. Shared tensors are tracked once.
    """
    model = unwrap_model(model)
    patterns = [re.compile(p) for p in exclude]
    slots: list[Slot] = []
    seen: set[int] = set()

    def add(named: Iterable[tuple[str, torch.Tensor]], is_param: bool) -> None:
        for raw_name, tensor in named:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = clean_name(raw_name)
            if is_param and not include_frozen and not tensor.requires_grad:
                continue
            if any(p.search(name) for p in patterns):
                continue
            prefix, _, attr = raw_name.rpartition(".")
            module = model.get_submodule(prefix) if prefix else model
            slots.append(Slot(name, module, attr, is_param, is_dtensor(tensor)))

    add(model.named_parameters(), True)
    if include_buffers:
        add(model.named_buffers(), False)
    return slots


def check_structure(bound: Sequence[Slot], now: Sequence[Slot], expected: Collection[str]) -> None:
    """Raise `EMAStateError` saying what changed in a model since its slots ``bound``
    were taken, if anything did.

    ``now`` are the model's tracked slots today and ``expected`` the names the EMA holds (a
    sharded EMA binds only its share of them). Notices tensors added or removed, and
    submodules replaced by new objects, which the old slots no longer reach:
    ``model.head = nn.Linear(...)``.
    """
    old, new = {s.name: s for s in bound}, {s.name: s for s in now}
    added, removed = sorted(set(new) - set(expected)), sorted(set(expected) - set(new))
    replaced = sorted({n.rpartition(".")[0] or "(the model)" for n in set(old) & set(new)
                       if new[n].module is not old[n].module})
    if not (added or removed or replaced):
        return
    parts = [f"{what} ({len(names)}): {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
             for what, names in (("submodules replaced", replaced), ("tensors added", added),
                                 ("tensors removed", removed)) if names]
    if added or removed:
        fix = ("build a new EMA for the changed model (EMA(model, ...)), or build the EMA "
               "only once the model is final")
    else:
        fix = ("call ema.rebind(model) to average the new submodules from here on (and "
               "ema.reset(model) to restart the average from their weights), or build the EMA "
               "only once the model is final")
    raise EMAStateError(f"the model changed after the EMA was built: {'; '.join(parts)}. The "
                        f"EMA was not updated; {fix}")


def _averaged(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def ema_dtype_for(dtype: torch.dtype, master_dtype: torch.dtype | None) -> torch.dtype:
    """fp32 master copy for reduced-precision floats: ``(1-d)*w`` vanishes in bf16 at d=0.9999."""
    if (dtype.is_floating_point and master_dtype is not None
            and dtype.itemsize < master_dtype.itemsize):
        return master_dtype
    return dtype


def dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides if it covers its memory without gaps or overlaps (contiguous,
    channels_last, a transpose...), else the contiguous strides of its shape.

    In flat mode the averages copy this layout, so that a tensor and its average have their
    elements in the same order in memory: the flat update pairs them by position, and a swap
    keeps the model's memory format.
    """
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return _contiguous_strides(t.shape)
        expected *= n
    return tuple(t.stride())


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def same_layout(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """Whether ``t`` has ``strides`` (dimensions of size 1 have no meaningful stride)."""
    return all(n == 1 or a == b for a, b, n in zip(t.stride(), strides, t.shape))


# A CPU group lays out its averages of tensors up to this many elements first, so that one
# torch.cat gathers those weights and one lerp_ averages them (see update.Binding).
SMALL_NUMEL = 4096


def gatherable(t: torch.Tensor) -> bool:
    """A tensor whose update costs more in dispatch than in bytes, and that ``cat`` can gather."""
    return t.device.type == "cpu" and t.numel() <= SMALL_NUMEL and t.is_contiguous()


@dataclasses.dataclass
class TensorGroup:
    """The averages of tensors sharing (device, dtype): one flat buffer, one view per tensor.

    Views are contiguous; in flat mode each has the layout (strides) of the model tensor it
    averages (see `dense_strides`).
    """

    device: torch.device
    dtype: torch.dtype
    names: list[str]
    shapes: list[torch.Size]
    flat: torch.Tensor
    tensors: list[torch.Tensor]
    strides: list[tuple[int, ...]] = dataclasses.field(default_factory=list)

    @property
    def averaged(self) -> bool:
        """Float tensors are averaged; integer and bool buffers are copied."""
        return _averaged(self.dtype)

    @classmethod
    def allocate(
        cls,
        names: list[str],
        shapes: list[torch.Size],
        device: torch.device,
        dtype: torch.dtype,
        strides: list[tuple[int, ...]] | None = None,
    ) -> TensorGroup:
        flat = torch.empty(sum(s.numel() for s in shapes), device=device, dtype=dtype)
        strides = list(strides) if strides is not None else [_contiguous_strides(s) for s in shapes]
        return cls(device, dtype, list(names), list(shapes), flat, views(flat, shapes, strides),
                   strides)

    def to(self, device: torch.device) -> TensorGroup:
        flat = self.flat.to(device)
        tensors = views(flat, self.shapes, self.strides)
        return dataclasses.replace(self, device=flat.device, flat=flat, tensors=tensors)

    @torch.no_grad()
    def follow_layout(self, tensors: list[torch.Tensor]) -> None:
        """Re-lay the averages out like ``tensors`` (e.g. after ``model.to(channels_last)``),
        values unchanged; a no-op when the layouts already agree."""
        strides = [dense_strides(t) for t in tensors]
        if all(same_layout(v, st) for v, st in zip(self.tensors, strides)):
            return
        values = [t.clone() for t in self.tensors]
        self.strides = strides
        self.tensors = views(self.flat, self.shapes, self.strides)
        torch._foreach_copy_(self.tensors, values)


def views(flat: torch.Tensor, shapes: list[torch.Size], strides: list[tuple[int, ...]]):
    """One view of ``flat`` per shape, back to back, each with its dense ``strides``."""
    out, offset = [], 0
    for shape, stride in zip(shapes, strides):
        out.append(flat.as_strided(shape, stride, offset))
        offset += shape.numel()
    return out


def plan_groups(
    slots: list[Slot], device: torch.device | None, master_dtype: torch.dtype | None
) -> dict[tuple, list[Slot]]:
    """The slots by group key (EMA device, EMA dtype, model device, model dtype), in storage
    order: the tracking order, except that a CPU group puts its small contiguous tensors first
    (a stable sort, so a subset of the slots keeps the same relative order)."""
    keyed: dict[tuple, list[Slot]] = {}
    for slot in slots:
        t = slot.get()
        ema_device = torch.device(device) if device is not None else t.device
        key = (ema_device, ema_dtype_for(t.dtype, master_dtype), t.device, t.dtype)
        keyed.setdefault(key, []).append(slot)
    return {k: sorted(v, key=lambda s: not gatherable(s.get())) for k, v in keyed.items()}


def group_slots(
    slots: list[Slot],
    device: torch.device | None,
    master_dtype: torch.dtype | None,
) -> tuple[list[TensorGroup], list[list[Slot]]]:
    """Allocate one `TensorGroup` per (EMA device, EMA dtype, model device, model dtype).

    Returns the groups and, for each, its slots in the group's storage order (see
    `plan_groups`). The averages are contiguous; flat mode gives them the model's layout
    (`d2ema.averaging.flat.lay_out`).
    """
    groups, group_slots_ = [], []
    for (ema_device, ema_dtype, _, _), members in plan_groups(slots, device, master_dtype).items():
        tensors = [s.get() for s in members]
        group = TensorGroup.allocate(
            [s.name for s in members], [t.shape for t in tensors], ema_device, ema_dtype
        )
        with torch.no_grad():
            torch._foreach_copy_(group.tensors, tensors)
        groups.append(group)
        group_slots_.append(members)
    return groups, group_slots_


def match_slots(slots: list[Slot], groups: list[TensorGroup]) -> list[list[Slot]]:
    """``slots`` of a model in the storage order of ``groups``; raises `EMAStateError`
    (naming every difference) when the model does not fit the groups."""
    by_name = {s.name: s for s in slots}
    problems = compare(
        {n: (s.get().shape, s.get().dtype) for n, s in by_name.items()},
        {n: (shape, g.dtype) for g in groups for n, shape in zip(g.names, g.shapes)},
        "the model",
    )
    if problems:
        raise EMAStateError(
            "this EMA does not fit the model it was given:\n"
            + "\n".join(problems)
            + "\nPass the model the EMA was built for, or build a new EMA for this one."
        )
    regrouped = [[by_name[n] for n in g.names] for g in groups]
    for members in regrouped:
        keys = {(s.get().device, s.get().dtype) for s in members}
        if len(keys) > 1:
            raise EMAStateError(
                f"tensors that shared a device and dtype when the EMA was built are now "
                f"spread over {sorted(map(str, keys))}; build a new EMA after moving the model"
            )
    return regrouped
