"""The plain-PyTorch code blocks of README.md and docs/, run as written (tests/_doc_blocks.py)."""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks
from _doc_blocks import doc_block
from torch import nn


class NoisyStep:
    """An optimizer whose ``step()`` moves every parameter by a fixed pseudo-random amount, so
    that a block whose training step is ``...`` still sees the weights change."""

    def __init__(self, model: nn.Module, seed: int = 0):
        self.params = list(model.parameters())
        self.gen = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            p.add_(torch.randn(p.shape, generator=self.gen) * 0.1)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_pytorch_quick_start(tmp_path):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def evaluate(m):
        seen.update({k: v.clone() for k, v in m.state_dict().items()})

    ns = {"model": model, "optimizer": NoisyStep(model), "evaluate": evaluate}
    exec(compile(doc_block("pytorch-quick-start"), "pytorch-quick-start", "exec"), ns)
    after = model.state_dict()
    d = 0.0  # the power EMA's decay (1 - 1/n) ** (gamma + 1) at its first step n = 1
    for name, w0 in before.items():
        if not w0.is_floating_point():
            continue
        expected = d * w0.double() + (1 - d) * after[name].double()
        torch.testing.assert_close(seen[name].double(), expected, rtol=0, atol=1e-6)
    assert not torch.equal(after["0.weight"], before["0.weight"])  # the trained weights are back
    assert ns["ema"].state_dict()["ema_meta"]["step"] == 1


def test_posthoc_ema_loop(tmp_path, monkeypatch):
    """Snapshots every 500 of 1000 steps; the rebuilt sigma_rel 0.07 EMA is close to one that
    was tracked directly over the same weights (BN statistics never change here: equal)."""
    from d2ema import EMA

    monkeypatch.chdir(tmp_path)
    model = small_model()
    reference = EMA(model, schedule="sigma_rel", schedule_params={"sigma_rel": 0.07})
    optimizer = NoisyStep(model)

    class Tracked:  # steps the optimizer and the reference EMA together
        def step(self):
            optimizer.step()
            reference.update(model)

    ns = {"model": model, "optimizer": Tracked(), "loader": range(1000), "torch": torch}
    exec(compile(doc_block("posthoc-ema-loop"), "posthoc-ema-loop", "exec"), ns)
    assert sorted(p.name for p in (tmp_path / "out/ema_snapshots").iterdir())
    assert (tmp_path / "ckpt.pth").is_file()
    rebuilt = ns["ema_model"].state_dict()
    with reference.swapped(model):
        direct = {k: v.clone() for k, v in model.state_dict().items()}
    raw = model.state_dict()
    for name, value in direct.items():  # two snapshots per EMA: 5x closer than the raw weights
        gap = (value - raw[name]).abs().max().item()
        assert (rebuilt[name] - value).abs().max().item() <= 0.2 * gap, name


def test_d2go_import():
    pytest.importorskip("detectron2")
    ns: dict = {}
    exec(compile(doc_block("d2go-import"), "d2go-import", "exec"), ns)
    from d2ema.d2 import compat

    for name in ("EMAState", "EMAUpdater", "EMAHook", "add_model_ema_configs",
                 "may_build_model_ema", "may_get_ema_checkpointer", "get_model_ema_state",
                 "apply_model_ema", "apply_model_ema_and_restore"):
        assert getattr(ns["model_ema"], name) is getattr(compat, name), name


class RankStep(NoisyStep):
    """A DDP training step: a forward on this rank's own batch (BN statistics differ by rank),
    then the same parameter change on every rank (as DDP's averaged gradients give)."""

    def __init__(self, model: nn.Module, rank: int):
        super().__init__(model, seed=1)
        self.model, self.rank = model, rank

    def step(self) -> None:
        self.model(rank_batch(self.rank))
        super().step()


def rank_batch(rank: int) -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + rank)) + rank


def _ddp_block(rank: int, world: int):
    from torch.nn.parallel import DistributedDataParallel

    model = small_model()
    seen = {}

    def evaluate(m):
        seen.update({k: v.clone() for k, v in m.module.state_dict().items()})

    ns = {"model": model, "optimizer": RankStep(model, rank), "evaluate": evaluate,
          "DistributedDataParallel": DistributedDataParallel}
    exec(compile(doc_block("ddp-loop"), "ddp-loop", "exec"), ns)
    return {k: v.clone() for k, v in ns["state"]["ema_state"].items()}, seen


def test_ddp_loop(tmp_path):
    """Two ranks: the gathered state is equal on both, every rank evaluates it, and it is the
    EMA of the parameters and of the ranks' mean BN statistics (computed here in one process)."""
    (state0, seen0), (state1, seen1) = run_ranks(_ddp_block, 2, tmp_path)
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
        assert torch.equal(seen0[name], state0[name]), name
        assert torch.equal(seen1[name], state0[name]), name
    d = 0.9998
    init = small_model().state_dict()
    trained = []
    for rank in range(2):
        model = small_model()
        RankStep(model, rank).step()
        trained.append(model.state_dict())
    for name, w0 in init.items():
        if not w0.is_floating_point():
            assert torch.equal(state0[name], trained[0][name]), name
            continue
        mean = (trained[0][name].double() + trained[1][name].double()) / 2
        expected = d * w0.double() + (1 - d) * mean
        torch.testing.assert_close(state0[name].double(), expected, rtol=0, atol=1e-7)
    assert not torch.equal(trained[0]["1.running_mean"], trained[1]["1.running_mean"])
