"""The Lightning EMA callback under DDP (gloo, CPU): every rank updates once per optimizer step
and holds the same EMA (BN statistics averaged over the ranks); ``sharded=True`` splits it and
gathers the same state. One process runs the same code."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import run_ranks


def _fit(rank: int, world: int, root: str, sharded: bool) -> dict:
    os.environ.update(TORCHELASTIC_RUN_ID="d2ema-test", RANK=str(rank), LOCAL_RANK=str(rank),
                      GROUP_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    from _tiny import Tiny, data, trainer

    from d2ema.lightning import EMA

    ema = EMA(0.9, schedule="constant", final="raw", sharded=sharded)
    t = trainer(root, max_epochs=2, accumulate_grad_batches=2, callbacks=[ema],
                strategy="ddp" if world > 1 else "auto", devices=world)
    module = Tiny(lr=0.02)
    t.fit(module, data(), data(seed=1))
    state = ema.ema.state_dict()["ema_state"]  # every rank: gathers a sharded EMA
    return {"state": {k: v.clone() for k, v in state.items()}, "step": ema.ema.step,
            "global_step": t.global_step, "metrics": dict(t.callback_metrics),
            "weights": {k: v.clone() for k, v in module.state_dict().items()}}


@pytest.mark.parametrize("world,sharded", [(1, False), (2, False), (2, True)])
def test_ddp_ranks_hold_the_same_ema(tmp_path, world, sharded):
    results = run_ranks(_fit, world, tmp_path, str(tmp_path), sharded, timeout=120)
    steps = 2 * -(-8 // world // 2)  # two epochs of ceil(8 / world / 2) optimizer steps
    for r in results:
        assert r["step"] == r["global_step"] == steps
        assert "val_ema/loss" in r["metrics"]
    first = results[0]
    for r in results[1:]:
        for name, value in first["state"].items():
            assert torch.equal(r["state"][name], value), name
        for name, value in first["weights"].items():
            assert torch.equal(r["weights"][name], value), name
