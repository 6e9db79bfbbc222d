"""``ShardedEMA``: the EMA split over the ranks of a data-parallel job, 1/N of it on each.

Under DDP every rank holds the same weights, so every rank keeping (and updating) a full EMA
is N copies of the same work. Here each tracked tensor is owned by exactly one rank, chosen so
that the ranks hold the same number of bytes (largest tensors first, each to the least loaded
rank): EMA memory and update time per rank drop by about N. An update touches only the owned
tensors, with the same kernels on the same values as the unsharded :class:`~d2ema.EMA`, so the
result is bit for bit the same.

The full average is assembled only when it is needed, by an all-gather over the ranks:

* :meth:`ShardedEMA.swapped` (evaluation) gathers it on every rank for the duration of the block
  (one full EMA in memory, as evaluating the unsharded EMA needs);
* :meth:`ShardedEMA.state_dict` gathers it for a checkpoint, a plain ``ema_state`` with every
  tensor, the same file an unsharded EMA writes: it loads on any number of ranks, in one
  process, in D2Go and the seed article's code. :meth:`gather` with ``dst=0`` assembles it on
  one rank only, for a checkpointer that runs there;
* :meth:`ShardedEMA.load_state_dict` of a full state keeps the owned tensors (no communication:
  every rank reads the file).

Every rank calls the collectives (``swapped``, ``state_dict``, ``gather``, and ``update`` with
``skip_nonfinite``) in the same order. With one process it is a plain EMA.

Example::

    ema = ShardedEMA(ddp_model, decay=0.9998)             # after init_process_group
    for batch in loader:
        ...; optimizer.step()
        with averaged_buffers(ddp_model):                 # d2ema.distributed
            ema.update(ddp_model)
    with ema.swapped(ddp_model):                          # every rank
        evaluate(ddp_model)
    state = ema.state_dict()                              # every rank; full tensors
    if dist.get_rank() == 0:
        torch.save({"model": model.state_dict(), **state}, "ckpt.pth")
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from d2ema.averaging.state import Slot, TensorGroup, ema_dtype_for, plan_groups, unwrap_model
from d2ema.averaging.swap import swapped_bindings
from d2ema.averaging.update import Binding
from d2ema.distributed.collectives import comm_device, rank_and_world
from d2ema.ema import EMA
from d2ema.errors import D2EMAError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ShardedEMA", "assign_by_bytes"]


def assign_by_bytes(sizes: list[int], world: int) -> list[int]:
    """The owning rank of each item, balancing the bytes per rank (greedy, largest first).

    Deterministic: every rank computes the same answer from the same sizes. The heaviest rank
    holds at most ``sum / world + max(sizes)`` bytes.
    """
    owners = [0] * len(sizes)
    loads = [(0, r) for r in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + sizes[i], rank))
    return owners


class ShardedEMA(EMA):
    """An :class:`~d2ema.EMA` whose storage and update work are split over ``group``'s ranks.

    Takes the arguments of :class:`~d2ema.EMA`, plus ``group`` (a process group; default the
    whole job). Not for FSDP models: FSDP already shards, and the EMA follows its shards.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, *,
                 group: ProcessGroup | None = None, **kwargs: Any):
        self.group = group
        self.rank, self.world = rank_and_world(group)
        self._owner: dict[str, int] = {}
        # The full EMA's groups: (device, dtype, names, shapes), as an unsharded EMA has them.
        self._plan: list[tuple[torch.device, torch.dtype, list[str], list[torch.Size]]] = []
        self._gathered: dict[str, torch.Tensor] | None = None
        super().__init__(model, decay, **kwargs)

    # ------------------------------------------------------------------ who owns what
    def _select(self, slots: list[Slot]) -> list[Slot]:
        if any(s.local for s in slots):
            raise D2EMAError(
                "ShardedEMA (MODEL_EMA.SHARDED) is for replicated models (DDP); this model's "
                "parameters are FSDP shards, which a plain EMA already follows: use EMA(model)"
            )
        if not self._owner:
            master = self._options.master_dtype
            sizes = [s.get().numel() * ema_dtype_for(s.get().dtype, master).itemsize for s in slots]
            owners = assign_by_bytes(sizes, self.world)
            self._owner = {s.name: r for s, r in zip(slots, owners)}
            self._plan = [
                (key[0], key[1], [s.name for s in members], [s.get().shape for s in members])
                for key, members in plan_groups(slots, self._options.device, master).items()
            ]
        return [s for s in slots if self._owner[s.name] == self.rank]

    def owned(self) -> list[str]:
        """The names of the tensors this rank stores and updates."""
        return list(self._views())

    def _expected_state(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {n: (shape, dtype) for _, dtype, names, shapes in self._plan
                for n, shape in zip(names, shapes)}

    def _own_part(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t for n, t in tensors.items() if self._owner.get(n, self.rank) == self.rank}

    # ------------------------------------------------------------------ local steps
    def update(self, model: nn.Module, step: int | None = None) -> None:
        self._gathered = None
        super().update(model, step)

    def reset(self, model: nn.Module) -> None:
        self._gathered = None
        super().reset(model)

    def load_state_dict(self, state_dict: Mapping[str, Any],
                        strict: bool = True) -> nn.modules.module._IncompatibleKeys:
        self._gathered = None
        return super().load_state_dict(state_dict, strict)

    def _all_finite(self, bindings: list[Binding]) -> bool:  # type: ignore[override]
        """Skip on every rank if any rank's share holds NaN/Inf (as the unsharded EMA does)."""
        ok = super()._all_finite(bindings)
        if self.world == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self._comm_device())
        dist.all_reduce(flag, group=self.group)
        return bool(flag.item() == 0)

    # ------------------------------------------------------------------ the full average
    def _comm_device(self) -> torch.device:
        device = self.groups[0].device if self.groups else self._options.device
        if device is None:  # this rank owns nothing: any of the model's devices will do
            device = self._bound_to_device()
        return comm_device(device, self.group)

    def _bound_to_device(self) -> torch.device:
        model = self._bound_to
        tensor: torch.Tensor | None = (next(iter(model.parameters()), None) if model is not None
                                       else None)
        if tensor is None and model is not None:
            tensor = next(iter(model.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _gather_groups(self, dst: int | None) -> list[TensorGroup] | None:
        """The full average as groups (as an unsharded EMA stores it): on every rank if ``dst``
        is None, else on rank ``dst`` only (None elsewhere). A collective."""
        local = {g.names[0]: g for g in self.groups}
        device = self._comm_device()
        out: list[TensorGroup] | None = [] if dst is None or dst == self.rank else None
        for planned_device, dtype, names, shapes in self._plan:
            numels = [s.numel() for s in shapes]
            per_rank = [[i for i, n in enumerate(names) if self._owner[n] == r]
                        for r in range(self.world)]
            sizes = [sum(numels[i] for i in idx) for idx in per_rank]
            chunk = max(max(sizes), 1)
            send = torch.zeros(chunk, dtype=dtype, device=device)
            mine = per_rank[self.rank]
            if mine:
                send[: sizes[self.rank]].copy_(local[names[mine[0]]].flat, non_blocking=False)
            recv = torch.empty(self.world * chunk, dtype=dtype, device=device)
            if dst is None:
                dist.all_gather(list(recv.chunk(self.world)), send, group=self.group)
            else:
                receives = list(recv.chunk(self.world)) if dst == self.rank else None
                global_dst = dist.get_global_rank(self.group, dst) if self.group else dst
                dist.gather(send, receives, dst=global_dst, group=self.group)
            if out is None:
                continue
            ema_device = self._options.device or planned_device
            full = TensorGroup.allocate(names, shapes, ema_device, dtype)
            with torch.no_grad():
                for r, idx in enumerate(per_rank):
                    if idx:
                        part = recv[r * chunk : r * chunk + sizes[r]]
                        pieces = part.split([numels[i] for i in idx])
                        torch._foreach_copy_([full.tensors[i] for i in idx],
                                             [p.view(shapes[i]) for p, i in zip(pieces, idx)])
            out.append(full)
        return out

    def gather(self, dst: int | None = None) -> dict[str, torch.Tensor] | None:
        """Assemble the full average (a collective): on every rank, or on rank ``dst`` only
        (None elsewhere). The receiving ranks also keep it, until the next update, for
        :meth:`gathered`."""
        if self.world == 1:
            return self._views()
        groups = self._gather_groups(dst)
        if groups is None:
            return None
        self._gathered = {n: t for g in groups for n, t in zip(g.names, g.tensors)}
        return self._gathered

    def gathered(self) -> dict[str, torch.Tensor] | None:
        """The full average of the current step if this rank assembled it with :meth:`gather`
        since the last update (no communication: for a checkpointer that runs on one rank),
        else None. With one process, the EMA itself."""
        return self._views() if self.world == 1 else self._gathered

    def tensors(self) -> dict[str, torch.Tensor]:
        """The full average by name: a collective (every rank calls it) with several ranks."""
        if self.world == 1:
            return self._views()
        groups = self._gather_groups(None) or []  # dst None: a list on every rank
        return {n: t for g in groups for n, t in zip(g.names, g.tensors)}

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """:meth:`EMA.swapped <d2ema.EMA.swapped>` with the gathered full average (a collective
        on entry; the restore on exit is local, so a rank that raises never blocks the others).
        Writes inside (PreciseBN statistics) are kept in each rank's share."""
        if self.world == 1:
            with super().swapped(model) as m:
                yield m
            return
        if self._swapped:
            raise RuntimeError("EMA.swapped() is already active for this EMA")
        groups = self._gather_groups(None) or []  # dst None: a list on every rank
        target = unwrap_model(model)
        slots = {s.name: s for s in self._options.slots(target)}
        bindings = [Binding(g, [slots[n] for n in g.names]) for g in groups]
        self._swapped = True
        try:
            with swapped_bindings(bindings, {}):
                yield model
        finally:
            self._swapped = False
            full = {n: t for g in groups for n, t in zip(g.names, g.tensors)}
            mine = self._views()
            with torch.no_grad():
                if mine:
                    torch._foreach_copy_(list(mine.values()), [full[n] for n in mine])

    def copy_to(self, model: nn.Module) -> None:
        """Copy the full average into the model for good (a collective)."""
        target = unwrap_model(model)
        slots = {s.name: s for s in self._options.slots(target)}
        with torch.no_grad():
            for name, t in self.tensors().items():
                slots[name].get().copy_(t)

    def model_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the full average (a collective)."""
        full = self.tensors()
        clone = super().model_copy(model)  # this rank's share
        slots = {s.name: s for s in self._options.slots(clone)}
        with torch.no_grad():
            for name, t in full.items():
                slots[name].get().copy_(t)
        return clone

    def __repr__(self) -> str:
        return f"Sharded{super().__repr__()[:-1]}, rank={self.rank}, world={self.world})"
