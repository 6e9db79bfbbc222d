"""DTensor helpers the EMA itself needs under FSDP2 (``fully_shard``): reshard the model, wrap
local shards as DTensors laid out like the parameters, cut full tensors to this rank's shards.

They sit below `d2ema.ema` (with the storage code); what builds on the EMA in a job of
several processes is in `d2ema.distributed`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from d2ema.averaging.state import is_dtensor, unwrap_model

__all__ = ['reshard', 'to_dtensors', 'to_local_shards']


def reshard(model: nn.Module) -> bool:
    """Reshard every FSDP2 module of ``model`` (free the full weights a forward left gathered,
    e.g. the root's), so the next forward gathers the shards as they are now. Returns whether
    the model has FSDP2 modules."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP2 model exists
    if fsdp is None:
        return False
    modules = [m for m in unwrap_model(model).modules() if isinstance(m, fsdp.FSDPModule)]
    for m in modules:
        m.reshard()
    return bool(modules)


def to_dtensors(
    tensors: Mapping[str, torch.Tensor], like: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Local shards as DTensors laid out like the DTensors ``like[name]`` (others unchanged)."""
    if not like:
        return dict(tensors)
    from torch.distributed.tensor import DTensor

    out = dict(tensors)
    for name, ref in like.items():
        out[name] = DTensor.from_local(  # an EMA kept elsewhere (device="cpu") is copied over
            tensors[name].to(ref._local_tensor.device), ref.device_mesh, ref.placements,
            run_check=False, shape=ref.shape, stride=ref.stride(),
        )
    return out


def to_local_shards(
    tensors: Mapping[str, torch.Tensor], like: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Each ``tensors[name]`` cut to this rank's shard of the DTensor ``like[name]``.

    A full tensor is split locally (every rank holds it after loading a file: no
    communication); a DTensor laid out differently is redistributed (a collective).
    """
    if not like:
        return dict(tensors)
    from torch.distributed.tensor import distribute_tensor

    out = dict(tensors)
    for name, ref in like.items():
        if name not in out:
            continue
        t = out[name]
        if is_dtensor(t):
            if t.device_mesh != ref.device_mesh or tuple(t.placements) != tuple(ref.placements):
                t = t.redistribute(ref.device_mesh, ref.placements)
            out[name] = t.to_local()
        else:
            device = ref.device_mesh.device_type
            full = distribute_tensor(t.to(device), ref.device_mesh, ref.placements,
                                     src_data_rank=None)
            out[name] = full.to_local()
    return out
