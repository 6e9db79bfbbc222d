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


def _fit_fsdp2(rank: int, world: int, root: str) -> dict:
    os.environ.update(TORCHELASTIC_RUN_ID="d2ema-test", RANK=str(rank), LOCAL_RANK=str(rank),
                      GROUP_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29556")
    import lightning.pytorch as pl
    from _tiny import Tiny, data, reference_ema, trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from d2ema.distributed import full_state_dict
    from d2ema.lightning import EMA

    class Sharded(Tiny):
        def configure_model(self):
            for i in (0, 2):
                fully_shard(self.model[i])
            fully_shard(self.model)

    def full(module):  # every rank: DTensor shards gathered
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in module.named_parameters()}

    class Record(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.start, self.history, self.seen = full(pl_module), [], trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step != self.seen:
                self.seen = trainer.global_step
                self.history.append(full(pl_module))

    rec, ema = Record(), EMA(0.9, schedule="constant", final="raw")
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    t = trainer(root, max_epochs=1, callbacks=[rec, ema], strategy=strategy, devices=world)
    t.fit(Sharded(lr=0.02), data(), data(seed=1))
    state = full_state_dict(ema.ema)["ema_state"]
    expected = reference_ema(rec.start, rec.history, 0.9)
    error = max((state[n].double() - v).abs().max().item() for n, v in expected.items())
    return {"step": ema.ema.step, "global_step": t.global_step, "error": error,
            "metrics": dict(t.callback_metrics)}


def test_fsdp2_model_parallel_strategy_ema_follows_the_shards(tmp_path):
    for r in run_ranks(_fit_fsdp2, 2, tmp_path, str(tmp_path), timeout=120):
        assert r["step"] == r["global_step"] == 4
        assert r["error"] < 1e-6
        assert "val_ema/loss" in r["metrics"]


def _fit_posthoc(rank: int, world: int, root: str) -> dict:
    os.environ.update(TORCHELASTIC_RUN_ID="d2ema-test", RANK=str(rank), LOCAL_RANK=str(rank),
                      GROUP_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29557")
    from _tiny import Tiny, data, trainer

    from d2ema.lightning import PostHocEMA

    ph = PostHocEMA(snapshot_every=2, select_on=data(seed=2), monitor="val/loss")
    t = trainer(root, max_epochs=2, callbacks=[ph], strategy="ddp", devices=world)
    module = Tiny(lr=0.02)
    t.fit(module, data(), data(seed=1))
    return {"choice": ph.choice, "scores": ph.scores,
            "weights": {k: v.clone() for k, v in module.state_dict().items()}}


def test_posthoc_choice_is_made_once_and_shared_by_every_rank(tmp_path):
    a, b = run_ranks(_fit_posthoc, 2, tmp_path, str(tmp_path), timeout=120)
    assert a["choice"] is not None and a["choice"] == b["choice"] and a["scores"] == b["scores"]
    for name, value in a["weights"].items():
        assert torch.equal(b["weights"][name], value), name
    assert (tmp_path / "posthoc_selection.md").is_file()


def _fsdp2_straight_and_resumed(rank: int, world: int, root: str) -> dict:
    """Three fits in one job: 2 epochs straight, 1 epoch saved, 2 epochs resumed from it."""
    os.environ.update(TORCHELASTIC_RUN_ID="d2ema-test", RANK=str(rank), LOCAL_RANK=str(rank),
                      GROUP_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29558")
    from _tiny import Tiny, data, trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from d2ema.distributed import full_state_dict
    from d2ema.lightning import EMA

    class Sharded(Tiny):
        def configure_model(self):
            for i in (0, 2):
                fully_shard(self.model[i])
            fully_shard(self.model)

    def fit(epochs: int, ckpt_path: str | None = None) -> tuple:
        ema = EMA(final="raw")
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        t = trainer(root, max_epochs=epochs, callbacks=[ema], strategy=strategy, devices=world)
        t.fit(Sharded(lr=0.02), data(), data(seed=1), ckpt_path=ckpt_path)
        state = full_state_dict(ema.ema)["ema_state"]
        return t, ema.ema.step, {k: v.clone() for k, v in state.items()}

    _, straight_step, straight = fit(2)
    half, _, _ = fit(1)
    half.save_checkpoint(f"{root}/ckpt")  # a folder: DCP shards plus meta.pt (the callbacks)
    _, resumed_step, resumed = fit(2, f"{root}/ckpt")
    return {"steps": (straight_step, resumed_step), "straight": straight, "resumed": resumed}


def test_fsdp2_checkpoint_resumes_the_ema(tmp_path):
    # Lightning's distributed checkpoint keeps one copy of the unsharded buffers (each rank's
    # own BN statistics are not saved), so only the parameters' EMA can continue bit for bit
    for r in run_ranks(_fsdp2_straight_and_resumed, 2, tmp_path, str(tmp_path), timeout=120):
        assert r["steps"] == (8, 8)
        params = [n for n in r["straight"] if "running_" not in n and "num_batches" not in n]
        assert len(params) == 6
        for name in params:
            assert torch.equal(r["resumed"][name], r["straight"][name]), name
