"""The EMA in a job of several processes (``torch.distributed``: DDP, FSDP2), any training loop.

* :mod:`~d2ema.distributed.collectives`: BN buffers averaged over the ranks before an update
  (:func:`averaged_buffers`), full states gathered from FSDP2 shards (:func:`full_state_dict`);
* :mod:`~d2ema.distributed.sharded`: :class:`ShardedEMA`, each rank stores and updates only its
  share of a DDP model's EMA.

These build on :class:`d2ema.EMA`; the DTensor helpers the EMA itself needs are below it, in
:mod:`d2ema.averaging.dtensor`.

Example::

    from d2ema import EMA
    from d2ema.distributed import averaged_buffers, full_state_dict

    ema = EMA(ddp_model, decay=0.9998)
    for batch in loader:
        ...; optimizer.step()
        with averaged_buffers(ddp_model):      # every rank calls it: it is a collective
            ema.update(ddp_model)
    state = full_state_dict(ema)                # every rank calls it (FSDP2: gathers shards)
"""

from d2ema.distributed.collectives import (
    all_reduce_mean_,
    averaged_buffers,
    comm_device,
    full_state_dict,
    rank_and_world,
    reshard,
    to_dtensors,
    to_local_shards,
)
from d2ema.distributed.sharded import ShardedEMA, assign_by_bytes

__all__ = [
    "ShardedEMA",
    "all_reduce_mean_",
    "assign_by_bytes",
    "averaged_buffers",
    "comm_device",
    "full_state_dict",
    "rank_and_world",
    "reshard",
    "to_dtensors",
    "to_local_shards",
]
