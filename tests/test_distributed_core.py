"""The EMA in multi-process jobs (gloo on the CPU), plain PyTorch: DDP with BatchNorm, the
sharded EMA against the unsharded one, FSDP2 shards, N -> M ranks, and an exception inside the
EMA evaluation of one rank.

Each job's ranks return what they saw; the checks run here, against a float64 reference that
is fed the weights each rank had after each step (parameters: identical on every rank under
DDP; floating buffers: the mean over the ranks).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import run_ranks
from torch import nn

from d2ema import EMA
from d2ema.distributed import ShardedEMA, assign_by_bytes, averaged_buffers, full_state_dict

DECAY = 0.8
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3),
        nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.Linear(7, 3, bias=False),
    )


def _batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 3, 8, 8, generator=g) * (1 + rank)  # ranks see different statistics


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].double().reshape(-1) for n in sorted(tensors)])


def _step(model, opt, rank: int, step: int, *emas) -> None:
    """One training step on this rank's batch, then every EMA folds in the rank-averaged
    buffers (a collective)."""
    model(_batch(rank, step)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    with averaged_buffers(model):
        for ema in emas:
            ema.update(model)


def _train_ddp(rank: int, world: int, out_path: str, fail_rank: int | None):
    """k DDP steps; the unsharded and the sharded EMA updated inside averaged_buffers."""
    model = _model()
    ema = EMA(model, DECAY)
    sharded = ShardedEMA(model, DECAY)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    seen = []  # per step: the weights of every rank (params, buffers), for the reference
    for step in range(1, STEPS + 1):
        _step(ddp, opt, rank, step, ema, sharded)
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        seen.append({n: _gather(t, world) for n, t in state.items()})
    raw = {n: t.clone() for n, t in model.state_dict().items()}
    full = ema.state_dict()
    gathered = sharded.state_dict()  # a collective: every rank calls it
    ranks_full = _gather(_flat(full["ema_state"]), world)
    with sharded.swapped(ddp):
        inside = {n: t.clone() for n, t in model.state_dict().items()}
    after_swap = {n: t.clone() for n, t in model.state_dict().items()}
    if rank == 0:
        torch.save(gathered, out_path)
    result = dict(seen=seen, full=full, gathered=gathered, ranks_full=ranks_full, raw=raw,
                  inside=inside, after_swap=after_swap, owned=sharded.owned(),
                  owned_bytes=sharded.num_bytes, full_bytes=ema.num_bytes)
    if fail_rank is not None:
        result["failure"] = _fail_in_evaluation(rank, world, ddp, sharded, fail_rank)
    return result


def _fail_in_evaluation(rank, world, ddp, ema, fail_rank):
    """Rank ``fail_rank`` raises inside the EMA evaluation; the others are then inside a
    collective of their evaluation (as COCOEvaluator's gather) and must not hang."""
    raw = {n: t.clone() for n, t in ddp.module.state_dict().items()}
    try:
        with ema.swapped(ddp):
            if rank == fail_rank:
                raise ValueError("evaluation failed on this rank")
            _gather(torch.ones(3), world)  # waits for the failed rank
    except (ValueError, RuntimeError) as e:
        error = type(e).__name__
    else:
        error = None
    now = ddp.module.state_dict()
    return dict(error=error, restored=all(torch.equal(now[n], raw[n]) for n in raw))


def _load_on_more_ranks(rank: int, world: int, path: str):
    """A state saved by 2 ranks, loaded by a sharded EMA on 3 ranks (uneven shares), then
    k more steps against the unsharded EMA."""
    model = _model()
    sharded = ShardedEMA(model, DECAY)
    ema = EMA(model, DECAY)
    saved = torch.load(path, weights_only=False)
    sharded.load_state_dict(saved)
    ema.load_state_dict(saved)
    reloaded = sharded.state_dict()
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(1, 3):
        _step(ddp, opt, rank, step, ema, sharded)
    return dict(reloaded=reloaded, full=ema.state_dict(), gathered=sharded.state_dict(),
                owned_bytes=sharded.num_bytes, full_bytes=ema.num_bytes, step=sharded.step)


def _reference(seen: list[dict[str, list[torch.Tensor]]], start: dict[str, torch.Tensor]):
    """float64 EMA, one tensor at a time, of the rank-averaged weights of each step."""
    ref = {n: t.double() for n, t in start.items()}
    for step_weights in seen:
        for name, per_rank in step_weights.items():
            if not per_rank[0].is_floating_point():
                ref[name] = per_rank[0].double()
                continue
            w = torch.stack([t.double() for t in per_rank]).mean(0)
            ref[name] = DECAY * ref[name] + (1 - DECAY) * w
    return ref


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp2")
    path = str(tmp / "ema_from_2.pth")
    return run_ranks(_train_ddp, 2, tmp, path, 1), path


def test_ddp_ranks_agree_and_match_reference_of_averaged_weights(two_ranks):
    results, _ = two_ranks
    r0 = results[0]
    for n, per_rank in r0["seen"][-1].items():  # DDP: parameters equal, BN buffers differ
        if "running" in n:
            assert not torch.equal(per_rank[0], per_rank[1]), n
    assert torch.equal(r0["ranks_full"][0], r0["ranks_full"][1])  # every rank, bit for bit
    ref = _reference(r0["seen"], {n: t for n, t in _model().state_dict().items()})
    for name, t in r0["full"]["ema_state"].items():
        torch.testing.assert_close(t.double(), ref[name], rtol=1e-6, atol=1e-7, msg=name)
    assert r0["full"]["ema_meta"]["step"] == STEPS


def test_sharded_equals_unsharded_bitwise_and_stores_half(two_ranks):
    results, _ = two_ranks
    for r in results:
        full, gathered = r["full"]["ema_state"], r["gathered"]["ema_state"]
        assert list(gathered) == list(full)
        for name in full:
            assert torch.equal(gathered[name], full[name]), name
        # the model holds the full EMA inside the swap, its raw weights after
        for name, t in r["inside"].items():
            assert torch.equal(t, full[name]), name
        for name, t in r["after_swap"].items():
            assert torch.equal(t, r["raw"][name]), name
    owned = [set(r["owned"]) for r in results]
    assert owned[0].isdisjoint(owned[1])
    assert owned[0] | owned[1] == set(results[0]["full"]["ema_state"])
    total = results[0]["full_bytes"]
    assert sum(r["owned_bytes"] for r in results) == total
    assert max(r["owned_bytes"] for r in results) <= total / 2 + 7 * 80 * 4  # + largest tensor


def test_exception_in_one_ranks_evaluation_restores_every_rank(two_ranks):
    results, _ = two_ranks
    assert results[1]["failure"] == {"error": "ValueError", "restored": True}
    assert results[0]["failure"] == {"error": "RuntimeError", "restored": True}  # not a hang


def test_saved_on_two_loads_on_three_and_on_one(two_ranks, tmp_path):
    _, path = two_ranks
    saved = torch.load(path, weights_only=False)
    results = run_ranks(_load_on_more_ranks, 3, tmp_path, path)
    for r in results:
        for name, t in saved["ema_state"].items():
            assert torch.equal(r["reloaded"]["ema_state"][name], t), name
            assert torch.equal(r["gathered"]["ema_state"][name], r["full"]["ema_state"][name])
        assert r["step"] == STEPS + 2
    assert sum(r["owned_bytes"] for r in results) == results[0]["full_bytes"]
    assert min(r["owned_bytes"] for r in results) > 0
    single = EMA(_model(), DECAY)  # one process: a plain EMA
    single.load_state_dict(saved)
    for name, t in saved["ema_state"].items():
        assert torch.equal(single.tensors()[name], t)
    assert single.step == STEPS


def test_assign_by_bytes_balances_and_is_deterministic():
    sizes = [400, 4, 4, 300, 100, 36, 4, 4]
    owners = assign_by_bytes(sizes, 3)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(3)]
    assert max(loads) <= sum(sizes) / 3 + max(sizes)
    assert loads == [400, 300, 152]  # largest first, each to the least loaded rank
    assert owners == assign_by_bytes(list(sizes), 3)
    assert assign_by_bytes([1, 2], 1) == [0, 0]


def test_single_process_sharded_ema_is_a_plain_ema():
    model = _model()
    sharded, ema = ShardedEMA(model, DECAY), EMA(model, DECAY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    sharded.update(model)
    ema.update(model)
    for name, t in ema.state_dict()["ema_state"].items():
        assert torch.equal(sharded.state_dict()["ema_state"][name], t)
    assert full_state_dict(sharded)["ema_meta"] == ema.state_dict()["ema_meta"]
