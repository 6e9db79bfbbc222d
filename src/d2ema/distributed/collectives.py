"""The EMA in a job of several processes (``torch.distributed``: DDP, FSDP2), any training loop.

Under DDP every rank holds the same parameters after each optimizer step (the gradients are
all-reduced), so every rank's EMA of the parameters is the same without any communication. The
buffers are another matter: with ``broadcast_buffers=False`` (detectron2's trainer) each rank's
BatchNorm running statistics are estimated from its own batches only, so per-rank EMAs of them
drift apart: the ranks evaluate different "EMA" models and a checkpoint holds rank 0's.
:func:`averaged_buffers` fixes this: inside it every floating buffer holds its mean over the
ranks, and every EMA updated inside folds in the same values on every rank.

Why the mean and not rank 0's broadcast: both make the ranks agree, but the mean is the estimate
from every rank's batches (N times the data, what SyncBN or a single large-batch process would
see); rank 0's is the estimate from 1/N of them. The mean is taken in float64 and rounded once,
so buffers that already agree (FrozenBN, constant buffers, ``broadcast_buffers=True``) come back
bit for bit, and it costs one all-reduce of the buffers (for ResNet-50, 0.2 MB) per update.
Integer buffers (``num_batches_tracked``) are equal on all ranks and are left alone.

FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank's EMA holds its local shards of the
DTensor parameters (and the full buffers); ``EMA.state_dict()`` returns those averages as
DTensors laid out like the parameters, which :mod:`torch.distributed.checkpoint` saves sharded
and reloads on any number of ranks; :func:`full_state_dict` gathers plain tensors instead (one
file that loads anywhere, also in one process) and ``EMA.load_state_dict`` scatters a full
state to the local shards.

Example::

    ema = EMA(ddp_model, decay=0.9998)
    for batch in loader:
        ...; optimizer.step()
        with averaged_buffers(ddp_model):      # every rank calls it: it is a collective
            ema.update(ddp_model)
    state = full_state_dict(ema)                # every rank calls it (FSDP2: gathers shards)
    if dist.get_rank() == 0:
        torch.save(state, "ema.pth")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from d2ema.averaging.dtensor import reshard, to_dtensors, to_local_shards
from d2ema.averaging.state import is_dtensor, unwrap_model
from d2ema.io.format import STATE_KEY

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from d2ema.ema import EMA

__all__ = [
    "all_reduce_mean_",
    "averaged_buffers",
    "comm_device",
    "full_state_dict",
    "rank_and_world",
    "reshard",
    "to_dtensors",
    "to_local_shards",
]


def rank_and_world(group: ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group`` (default: the whole job); ``(0, 1)`` without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(device: torch.device, group: ProcessGroup | None = None) -> torch.device:
    """Where a tensor of ``device`` must be to take part in a collective of ``group``.

    NCCL moves CUDA tensors only: an EMA kept on the CPU (``device="cpu"``) goes through the
    rank's current GPU.
    """
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor], group: ProcessGroup | None = None) -> None:
    """Replace each floating tensor by its mean over the ranks of ``group``, in place.

    Summed in float64 and rounded once: tensors equal on every rank stay bit for bit equal,
    others get the correctly rounded mean, the same on every rank.
    """
    tensors = [t for t in tensors if t.numel()]
    _, world = rank_and_world(group)
    if world == 1 or not tensors:
        return
    device = comm_device(tensors[0].device, group)
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= world
    for t, mean in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(mean.view(t.shape))


def _floating_buffers(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for _, b in unwrap_model(model).named_buffers():
        if b is not None and b.is_floating_point() and not is_dtensor(b) and id(b) not in seen:
            seen.add(id(b))
            out.append(b)
    return out


@contextlib.contextmanager
def averaged_buffers(model: nn.Module, group: ProcessGroup | None = None) -> Iterator[nn.Module]:
    """Inside, every floating buffer of ``model`` holds its mean over the ranks of ``group``.

    A collective: every rank of ``group`` enters it. The model's own buffers come back
    unchanged on exit (also when the block raises), so training is not affected; only EMAs
    updated or reset inside see the means. Without a process group (or with one rank) it does
    nothing.
    """
    _, world = rank_and_world(group)
    buffers = _floating_buffers(model) if world > 1 else []
    if not buffers:
        yield model
        return
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    try:
        all_reduce_mean_(buffers, group)
        yield model
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, saved)


def full_state_dict(ema: EMA, *, cpu: bool = False) -> dict[str, Any]:
    """``ema.state_dict()`` with every DTensor gathered into a plain full tensor.

    A collective where the EMA holds shards (FSDP2, :class:`~d2ema.distributed.ShardedEMA`): every
    rank calls it, in the same order as its other collectives. The result loads into an EMA on
    any number of ranks, or in a single process. ``cpu=True`` moves the tensors to the CPU.
    """
    state = ema.state_dict()
    tensors = {
        n: (t.full_tensor() if is_dtensor(t) else t) for n, t in state[STATE_KEY].items()
    }
    if cpu:
        tensors = {n: t.cpu() for n, t in tensors.items()}
    return {**state, STATE_KEY: tensors}
