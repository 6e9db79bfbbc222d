"""EMATrainer under DDP on 2 and 3 CPU processes (gloo), a small detectron2 RetinaNet.

One 2-rank job trains k steps with ``MODEL_EMA.SHARDED`` and, beside it, an unsharded EMA;
records every rank's weights after each step for a float64 reference; recomputes BN statistics
for the EMA weights (PreciseBN); and makes one rank's EMA evaluation raise. Its checkpoint is
then loaded in one process (EMACheckpointer, ``d2ema export`` + plain ``MODEL.WEIGHTS``) and
by a 3-rank job.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _d2_helpers import make_cfg, register_tiny, tracked_state
from _dist import run_ranks
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

from d2ema import EMA
from d2ema.averaging.state import unwrap_model
from d2ema.d2 import EMACheckpointer, EMATrainer, get_model_ema
from d2ema.d2.checkpoint.export import export_ema
from d2ema.d2.engine.hooks import EMAHook
from d2ema.d2.engine.launch import prepare_cpu_process
from d2ema.d2.evaluation.evaluator import evaluate_with_ema, precise_bn

DECAY = 0.8
STEPS = 3


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


class _Record(HookBase):
    """Every rank's weights at the start and after each step (a collective, all ranks)."""

    def __init__(self, world: int):
        self.world, self.start, self.seen = world, None, []

    def _state(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in tracked_state(unwrap_model(self.trainer.model)).items()}

    def before_train(self):
        self.start = self._state()

    def after_step(self):
        self.seen.append({n: _gather(t, self.world) for n, t in self._state().items()})


def _cfg(out_dir, world: int, max_iter: int):
    cfg = make_cfg("retinanet", out_dir, max_iter=max_iter, decay=DECAY, sharded=True)
    cfg.SOLVER.IMS_PER_BATCH = world
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    return cfg


def _train(rank: int, world: int, root: str, out_dir: str):
    prepare_cpu_process(world)
    register_tiny(root)
    trainer = EMATrainer(_cfg(out_dir, world, STEPS))
    model = trainer.model
    sharded = get_model_ema(model)
    plain = EMA(unwrap_model(model), DECAY)  # the unsharded EMA, updated the same way
    record = _Record(world)
    trainer.register_hooks([EMAHook(plain, model), record])
    trainer.resume_or_load(resume=False)
    trainer.train()
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    gathered, full = sharded.state_dict(), plain.state_dict()
    return dict(
        is_ddp=isinstance(model, torch.nn.parallel.DistributedDataParallel),
        sharded_type=type(sharded).__name__, saves=bool(periodic),
        save_to_disk=trainer.checkpointer.save_to_disk, owned=sharded.num_bytes,
        full_bytes=plain.num_bytes, gathered=gathered, full=full,
        ranks_equal=_gather(torch.cat([t.reshape(-1).double() for t in
                                       gathered["ema_state"].values()]), world),
        start=record.start, seen=record.seen,
        precise=_precise_bn_over_ranks(trainer, sharded, world),
        failure=_fail_in_evaluation(rank, model, sharded, world),
    )


def _precise_bn_over_ranks(trainer, ema, world):
    """PreciseBN for the EMA weights: the statistics of every rank's batches, on every rank."""
    model = trainer.model
    data = iter(trainer.build_train_loader(trainer.cfg))
    batches = [next(data) for _ in range(2)]
    with ema.swapped(model):
        inner = unwrap_model(model)
        bns = get_bn_modules(inner.train())
        registered = [(b, b.running_mean, b.running_var) for b in bns]
        saved = copy.deepcopy([b.state_dict() for b in bns])
        with EventStorage(), torch.no_grad():
            update_bn_stats(inner, iter(batches), 2)  # this rank's batches only
        own = [b.running_var.clone() for b in bns]
        for (b, mean, var), s in zip(registered, saved):
            b.running_mean, b.running_var = mean, var  # fvcore replaced them
            b.load_state_dict(s)
        precise_bn(model, batches, 2)
        result = [b.running_var.clone() for b in bns]
    mean_of_ranks = [torch.stack(_gather(t, world)).double().mean(0) for t in own]
    after = ema.state_dict()["ema_state"]
    names = [n for n, m in inner.named_modules() if m in bns]
    kept = [after[f"{n}.running_var"] for n in names]
    return dict(own=own, result=result, mean_of_ranks=mean_of_ranks, kept=kept)


def _fail_in_evaluation(rank, model, ema, world):
    raw = {n: t.clone() for n, t in unwrap_model(model).state_dict().items()}

    def test(m):
        if rank == 1:
            raise ValueError("evaluation failed on rank 1")
        comm.all_gather(rank)  # what COCOEvaluator does; waits for rank 1
        return {}

    try:
        evaluate_with_ema(test, model, ema, raw=False)
    except (ValueError, RuntimeError) as e:
        error = type(e).__name__
    else:
        error = None
    now = unwrap_model(model).state_dict()
    return dict(error=error, restored=all(torch.equal(now[n], raw[n]) for n in raw))


def _resume_on_three(rank: int, world: int, root: str, out_dir: str):
    prepare_cpu_process(world)
    register_tiny(root)
    trainer = EMATrainer(_cfg(out_dir, world, STEPS + 1))
    trainer.resume_or_load(resume=True)  # last_checkpoint: model_final, saved by 2 ranks
    ema = get_model_ema(trainer.model)
    loaded = ema.state_dict()
    trainer.train()  # one more step on 3 ranks
    return dict(loaded=loaded, owned=ema.num_bytes, step=ema.step, iter=trainer.iter)


def _reference(start, seen):
    ref = {n: t.double() for n, t in start.items()}
    for weights in seen:
        for name, per_rank in weights.items():
            if per_rank[0].is_floating_point():
                w = torch.stack([t.double() for t in per_rank]).mean(0)
                ref[name] = DECAY * ref[name] + (1 - DECAY) * w
            else:
                ref[name] = per_rank[0].double()
    return ref


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d2ddp")
    root, out = str(tmp / "data"), tmp / "out"
    register_tiny(root)  # generate the images once, before the ranks start
    return run_ranks(_train, 2, tmp, root, str(out), timeout=240), root, out, tmp


def test_every_rank_same_ema_equal_to_reference_of_averaged_weights(trained):
    (r0, r1), *_ = trained
    assert r0["is_ddp"] and r0["sharded_type"] == "ShardedEMA"
    assert torch.equal(r0["ranks_equal"][0], r0["ranks_equal"][1])
    last = r0["seen"][-1]
    assert any(not torch.equal(*last[n]) for n in last if "running_var" in n)  # BN differs
    ref = _reference(r0["start"], r0["seen"])
    for name, t in r0["gathered"]["ema_state"].items():
        torch.testing.assert_close(t.double(), ref[name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(t, r0["full"]["ema_state"][name]), name  # sharded == unsharded
    assert r0["gathered"]["ema_meta"]["step"] == STEPS
    assert r0["owned"] + r1["owned"] == r0["full_bytes"]
    assert max(r0["owned"], r1["owned"]) < 0.6 * r0["full_bytes"]


def test_only_the_main_process_saves_and_the_checkpoint_holds_the_full_ema(trained):
    (r0, r1), _, out, _ = trained
    assert (r0["saves"], r0["save_to_disk"]) == (True, True)
    assert (r1["saves"], r1["save_to_disk"]) == (False, False)
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000001.pth",
                                                                "model_final.pth"]
    for name, t in r0["gathered"]["ema_state"].items():
        assert torch.equal(final["ema_state"][name], t), name
    assert final["ema_meta"]["step"] == STEPS


def test_precise_bn_for_ema_uses_every_ranks_batches(trained):
    (r0, r1), *_ = trained
    p0, p1 = r0["precise"], r1["precise"]
    assert any(not torch.equal(a, b) for a, b in zip(p0["own"], p1["own"]))
    for a, b, mean, kept in zip(p0["result"], p1["result"], p0["mean_of_ranks"], p0["kept"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), mean, rtol=1e-6, atol=1e-7)
        assert torch.equal(kept, a)  # the EMA keeps the recomputed statistics


def test_exception_in_one_ranks_ema_evaluation_restores_raw_weights_everywhere(trained):
    (r0, r1), *_ = trained
    assert r1["failure"] == {"error": "ValueError", "restored": True}
    assert r0["failure"] == {"error": "RuntimeError", "restored": True}


def test_checkpoint_of_two_ranks_loads_in_one_process_and_exports(trained):
    (r0, _), _, out, tmp = trained
    cfg = make_cfg("retinanet", tmp / "single", decay=DECAY)  # not sharded: one process
    model = EMATrainer.build_model(cfg)
    checkpointer = EMACheckpointer(model, ema=get_model_ema(model))
    checkpointer.load(str(out / "model_final.pth"))
    assert checkpointer.ema_loaded
    saved = r0["gathered"]["ema_state"]
    for name, t in get_model_ema(model).tensors().items():
        assert torch.equal(t, saved[name]), name
    export_ema(out / "model_final.pth", tmp / "ema.pth")
    plain = build_model(make_cfg("retinanet", tmp / "plain"))  # detectron2 alone
    DetectionCheckpointer(plain).load(str(tmp / "ema.pth"))
    for name, t in plain.state_dict().items():
        assert torch.equal(t, saved[name]), name


def test_checkpoint_of_two_ranks_resumes_on_three(trained):
    (r0, _), root, out, tmp = trained
    results = run_ranks(_resume_on_three, 3, tmp, root, str(out), timeout=240)
    for r in results:
        for name, t in r0["gathered"]["ema_state"].items():
            assert torch.equal(r["loaded"]["ema_state"][name], t), name
        assert (r["step"], r["iter"]) == (STEPS + 1, STEPS + 1)
    assert sum(r["owned"] for r in results) == r0["full_bytes"]


def test_precise_bn_inside_swap_lands_in_the_ema_and_leaves_raw_buffers():
    """fvcore assigns new running_mean/var tensors; they must not replace the raw buffers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, DECAY)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    raw = {n: t.clone() for n, t in model.state_dict().items()}
    batches = [torch.randn(8, 3) for _ in range(3)]
    with ema.swapped(model):
        precise_bn(model, batches, 3)
        inside = model[1].running_mean.clone()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in raw.items())
    assert torch.equal(ema.tensors()["1.running_mean"], inside)
    w, b = ema.tensors()["0.weight"], ema.tensors()["0.bias"]  # the EMA's Linear
    expected = torch.cat([torch.nn.functional.linear(x, w, b) for x in batches]).mean(0)
    torch.testing.assert_close(inside, expected)
