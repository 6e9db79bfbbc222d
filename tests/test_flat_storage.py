"""Flat mode re-points the model's tensors: it must stay correct when the model changes after.

Each test trains with ``EMA(flat=True)`` through a change of the model (``model.to(dtype)``,
``.half()``, channels_last, a checkpoint load, DDP) and checks the average against the float64
reference of test_ema_reference.py, that training itself is unchanged, and that the model's
tensors are back in one buffer (the single-op update) with their memory format kept.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _dist import run_ranks
from test_ema_reference import Reference, TrainNet, all_named, assert_matches, train
from torch import nn

from d2ema import EMA

CL = torch.channels_last


def storages(model: nn.Module, dtype: torch.dtype | None = None) -> set[int]:
    return {
        t.untyped_storage().data_ptr()
        for _, t in all_named(model)
        if t.is_floating_point() and (dtype is None or t.dtype == dtype)
    }


def steps(model, ema, ref, n, seed, opt=None, dtype=torch.float32):
    return train(model, ema, n, seed, dtype, ref=ref, opt=opt)


def convs(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_flat_keeps_channels_last_and_follows_a_format_change():
    torch.manual_seed(0)
    model = TrainNet().to(memory_format=CL)
    plain = copy.deepcopy(model)
    ema = EMA(model, 0.9, flat=True)
    assert all(w.is_contiguous(memory_format=CL) for w in convs(model))
    assert len(storages(model)) == 1
    ref = Reference(model, lambda n: 0.9)
    steps(model, ema, ref, 10, seed=0)
    steps(plain, None, None, 10, seed=0)
    for (n, a), (_, b) in zip(all_named(model), all_named(plain)):
        assert torch.equal(a, b), n
    assert_matches(ema, ref)
    # the averages have the model's layout, so the swap keeps channels_last too
    assert all(ema.tensors()[n].stride() == t.stride() for n, t in all_named(model))
    with ema.swapped(model):
        assert all(w.is_contiguous(memory_format=CL) for w in convs(model))
    # back to NCHW after the EMA was built: noticed, re-flattened in the new layout
    model.to(memory_format=torch.contiguous_format)
    steps(model, ema, ref, 5, seed=1)
    assert all(w.is_contiguous() for w in convs(model))
    assert len(storages(model)) == 1
    assert_matches(ema, ref)
    assert ema.tensors()["conv1.weight"].is_contiguous()


@pytest.mark.parametrize("convert", ["half", "double"])
def test_flat_after_a_dtype_change(convert):
    torch.manual_seed(1)
    model = TrainNet()
    ema = EMA(model, 0.8, flat=True)
    ref = Reference(model, lambda n: 0.8)
    opt = steps(model, ema, ref, 4, seed=0)
    getattr(model, convert)()
    dtype = next(model.parameters()).dtype
    if convert == "double":
        steps(model, ema, ref, 4, seed=1, opt=opt, dtype=dtype)
    else:  # fp16 convolutions are not implemented on the CPU: perturb the weights instead
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            with torch.no_grad():
                for _, t in all_named(model):
                    if t.is_floating_point():
                        t.add_(torch.randn(t.shape, generator=gen).to(dtype), alpha=0.1)
            ema.update(model)
            ref.update(model)
    assert storages(model, dtype) and len(storages(model, dtype)) == 1
    ema_t = ema.tensors()
    assert ema_t["conv1.weight"].dtype == torch.float32  # the master stays fp32
    # the reference reads the fp16/fp64 weights exactly; the EMA stores fp32
    for name, value in ref.avg.items():
        torch.testing.assert_close(ema_t[name].double(), value.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("assign", [False, True])
def test_flat_after_a_checkpoint_load(assign, tmp_path):
    torch.manual_seed(2)
    model = TrainNet()
    ema = EMA(model, 0.9, flat=True)
    ref = Reference(model, lambda n: 0.9)
    opt = steps(model, ema, ref, 3, seed=0)
    saved = TrainNet().state_dict()  # other weights
    torch.save({"model": saved, **ema.state_dict()}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    before = storages(model)
    model.load_state_dict(ckpt["model"], assign=assign)
    for n, t in all_named(model):
        assert torch.equal(t, saved[n]), n
    if assign:  # new tensors are registered: opt must be rebuilt, the EMA notices by itself
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:  # copied in place: the flat buffer stays
        assert storages(model) == before
    steps(model, ema, ref, 3, seed=1, opt=opt)
    assert len(storages(model)) == 1
    assert_matches(ema, ref)
    # the EMA's own checkpoint (channels_last or not) loads into a fresh flat EMA
    other = TrainNet()
    restored = EMA(other, 0.9, flat=True)
    restored.load_state_dict(ckpt)
    for n, t in restored.tensors().items():
        assert torch.equal(t, ckpt["ema_state"][n]), n


def _ddp_worker(rank, world):
    torch.manual_seed(3)
    model = TrainNet()
    plain = copy.deepcopy(model)
    ema = EMA(model, 0.9, flat=True)  # trainer order: model -> EMA -> optimizer -> DDP
    ref = Reference(model, lambda n: 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ddp = nn.parallel.DistributedDataParallel(model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    plain_ddp = nn.parallel.DistributedDataParallel(plain)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        y = torch.randint(0, 4, (4,), generator=gen)
        for net, o, e in ((ddp, opt, ema), (plain_ddp, plain_opt, None)):
            loss = F.cross_entropy(net(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
            if e is not None:
                e.update(ddp)  # through the wrapper
        ref.update(model)
    same = all(torch.equal(a, b) for (_, a), (_, b) in zip(all_named(model), all_named(plain)))
    assert_matches(ema, ref)
    with ema.swapped(ddp):
        pass
    return {"same": same, "storages": len(storages(model))}


def test_flat_under_ddp(tmp_path):
    # run_ranks starts ranks from a fork server (a plain fork of the pytest process can inherit
    # a held OpenMP lock and hang) and fails the test on a deadline instead of blocking the suite
    for rank, got in enumerate(run_ranks(_ddp_worker, 2, tmp_path)):
        assert got == {"same": True, "storages": 1}, rank
