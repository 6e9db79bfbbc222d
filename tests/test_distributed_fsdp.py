"""The EMA of an FSDP2 (``fully_shard``) model on the CPU with gloo: each rank averages its
DTensor shards; a full state is gathered to save and scattered to load, on another number of
ranks and in one process; torch.distributed.checkpoint saves the sharded state as it is."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _dist import run_ranks
from test_distributed_core import DECAY, _batch, _model, _reference, _step
from torch import nn
from torch.distributed.fsdp import fully_shard

from d2ema import EMA
from d2ema.distributed import full_state_dict

STEPS = 3


def _fsdp_model() -> nn.Module:
    model = _model()
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fully_shard(m)
    return fully_shard(model)


def _full_weights(model: nn.Module, world: int) -> dict[str, list[torch.Tensor]]:
    """Every rank's weights: full parameters (gathered from shards), each rank's buffers."""
    out = {n: [p.full_tensor().detach()] * world for n, p in model.named_parameters()}
    for n, b in model.named_buffers():
        per_rank = [torch.empty_like(b) for _ in range(world)]
        dist.all_gather(per_rank, b)
        out[n] = per_rank
    return out


def _train_fsdp(rank: int, world: int, path: str, dcp_dir: str):
    model = _fsdp_model()
    ema = EMA(model, DECAY)  # failed before: foreach ops on mixed Tensor and DTensor
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for step in range(1, STEPS + 1):
        _step(model, opt, rank, step, ema)
        seen.append(_full_weights(model, world))
    local = {n: t.shape for n, t in ema.tensors().items()}
    state = full_state_dict(ema)
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=dcp_dir)
    if rank == 0:
        torch.save(state, path)
    x = _batch(0, 99)
    model.eval()
    raw_out = model(x).detach()
    with ema.swapped(model):
        ema_out = model(x).detach()  # FSDP all-gathers the EMA shards copied into its storage
    after = model(x).detach()
    return dict(seen=seen, local=local, state=state, raw_out=raw_out, ema_out=ema_out,
                after=after)


def _load_fsdp(rank: int, world: int, path: str, dcp_dir: str):
    model = _fsdp_model()
    ema = EMA(model, DECAY)
    ema.load_state_dict(torch.load(path, weights_only=False))  # full state -> local shards
    from_full = full_state_dict(ema)
    fresh = EMA(_fsdp_model(), DECAY)
    sharded = {"ema": fresh.state_dict()}
    dcp.load(sharded, checkpoint_id=dcp_dir)  # 2 ranks' shards resharded onto 3
    fresh.load_state_dict(sharded["ema"])
    return dict(from_full=from_full, from_dcp=full_state_dict(fresh),
                local=[t.shape for t in ema.tensors().values()])


def test_fsdp2_ema_of_shards_saves_full_and_loads_on_other_world_sizes(tmp_path):
    path, dcp_dir = str(tmp_path / "fsdp_ema.pth"), str(tmp_path / "dcp")
    r0, r1 = run_ranks(_train_fsdp, 2, tmp_path, path, dcp_dir)
    # each rank stores only its shard of each weight
    assert r0["local"]["6.weight"] == (4, 80) and r1["local"]["6.weight"] == (3, 80)
    ref = _reference(r0["seen"], _model().state_dict())
    saved = torch.load(path, weights_only=False)
    for name, t in saved["ema_state"].items():
        assert t.shape == ref[name].shape
        torch.testing.assert_close(t.double(), ref[name], rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(t, r1["state"]["ema_state"][name])  # same on every rank
    assert saved["ema_meta"]["step"] == STEPS
    plain = _model().eval()  # one process: the EMA weights give the swapped FSDP outputs
    plain.load_state_dict(saved["ema_state"])
    for r in (r0, r1):
        torch.testing.assert_close(r["ema_out"], plain(_batch(0, 99)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(r["ema_out"], r["raw_out"])
        assert torch.equal(r["after"], r["raw_out"])
    single = EMA(_model(), DECAY)
    single.load_state_dict(saved)
    assert all(torch.equal(single.tensors()[n], t) for n, t in saved["ema_state"].items())

    for r in run_ranks(_load_fsdp, 3, tmp_path, path, dcp_dir):
        for name, t in saved["ema_state"].items():
            assert torch.equal(r["from_full"]["ema_state"][name], t), name
            assert torch.equal(r["from_dcp"]["ema_state"][name], t), name
        assert r["from_dcp"]["ema_meta"]["step"] == STEPS
