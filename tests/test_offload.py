"""Background updates (d2ema.averaging.offload) on the CPU: the queue of one, reads that wait for
the
update in flight, where the copy is fenced, and bitwise equality with the synchronous path.

The CUDA copy runs on a side stream; here ``LazyCopy`` stands in for it as an adversary: it
snapshots the buffers at once (as the CUDA path does on the current stream) but copies the
parameters only when the training loop fences, and the worker waits for that. A missing or
late fence then shows as an average that differs from the synchronous one.
"""

from __future__ import annotations

import copy
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F
from test_ema_reference import TrainNet, all_named

import d2ema.averaging.offload as offload
from d2ema import EMA
from d2ema.averaging.update import Binding

PHASE = ["idle"]


def batch(gen):
    return torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen)


def sgd_step(model, opt, x, y):
    PHASE[0] = "forward"
    loss = F.cross_entropy(model(x), y)
    PHASE[0] = "backward"
    loss.backward()
    PHASE[0] = "step"
    if opt is None:  # a hand-written optimizer: no torch.optim hook fires
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05 * p.grad)
                p.grad = None
    else:
        opt.step()
        opt.zero_grad()
    PHASE[0] = "idle"


def twins(**kwargs):
    """Two identical models with a synchronous and a background EMA."""
    torch.manual_seed(0)
    a = TrainNet()
    b = copy.deepcopy(a)
    return a, EMA(a, 0.9, overlap=False, **kwargs), b, EMA(b, 0.9, overlap=True, **kwargs)


def assert_same(ema_a, ema_b):
    ta, tb = ema_a.tensors(), ema_b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("flat", [False, True])
def test_overlap_is_bitwise_the_synchronous_path(flat):
    a, ema_a, b, ema_b = twins(flat=flat, schedule="yolov5", every=2, start=3)
    assert ema_a._offload is None and ema_b._offload is not None
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (a, b)]
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i in range(12):
        for m, opt, e, gen in ((a, opts[0], ema_a, gen_a), (b, opts[1], ema_b, gen_b)):
            sgd_step(m, opt, *batch(gen))
            e.update(m)
        if i % 5 == 4:
            with ema_a.swapped(a), ema_b.swapped(b):  # the swap waits for the update in flight
                for (n, x), (_, y) in zip(all_named(a), all_named(b)):
                    assert torch.equal(x, y), n
    assert_same(ema_a, ema_b)
    assert not ema_b._offload.busy  # tensors() completed it


def test_no_overlap_by_default_on_the_cpu():
    model = TrainNet()
    assert EMA(model, device="cpu")._offload is None
    assert EMA(model.double(), master_dtype=torch.float32)._offload is None


@pytest.fixture
def gated(monkeypatch):
    """Binding.finish (the host lerp) waits for ``gate`` in the worker thread."""
    gate = threading.Event()
    original = Binding.finish

    def finish(self, alpha):
        assert gate.wait(30)
        original(self, alpha)

    monkeypatch.setattr(Binding, "finish", finish)
    yield gate
    gate.set()


def in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, out


def test_update_returns_at_once_and_reads_wait_for_it(gated):
    a, ema_a, b, ema_b = twins()
    gen = torch.Generator().manual_seed(2)
    x, y = batch(gen)
    for m in (a, b):
        sgd_step(m, torch.optim.SGD(m.parameters(), lr=0.1), x, y)
    t0 = time.perf_counter()
    ema_b.update(b)  # the lerp is held by the gate, yet update() returns
    assert time.perf_counter() - t0 < 5 and ema_b._offload.busy
    ema_a.update(a)
    reader, got = in_thread(ema_b.state_dict)
    reader.join(0.3)
    assert reader.is_alive()  # state_dict waits for the update in flight
    gated.set()
    reader.join(30)
    assert not reader.is_alive()
    ours = got["value"]["ema_state"]
    for name, t in ema_a.tensors().items():
        assert torch.equal(ours[name], t), name


def test_queue_of_one(gated):
    _, _, b, ema_b = twins()
    ema_b.update(b)
    second, _ = in_thread(lambda: ema_b.update(b))
    second.join(0.3)
    assert second.is_alive()  # the second update waits for the first lerp
    gated.set()
    second.join(30)
    assert not second.is_alive() and ema_b.step == 2


def test_an_error_in_the_background_surfaces_at_the_next_call(monkeypatch):
    _, _, b, ema_b = twins()

    def broken(self, alpha):
        raise RuntimeError("host lerp failed")

    monkeypatch.setattr(Binding, "finish", broken)
    ema_b.update(b)
    with pytest.raises(RuntimeError, match="host lerp failed"):
        ema_b.state_dict()


class LazyCopy:
    """A device copy that happens as late as the protocol allows: when the loop fences."""

    asynchronous = True

    def __init__(self):
        self.fences: list[str] = []

    def start(self, off):
        for plan in off.plans:
            plan.snapshot_buffers()  # the CUDA path takes this snapshot on the current stream
        return types.SimpleNamespace(plans=off.plans, done=threading.Event())

    def fence(self, handle):
        self.fences.append(PHASE[0])
        for plan in handle.plans:
            plan.copy_to_host()
        handle.done.set()

    def wait(self, handle):
        assert handle.done.wait(30), "the copy was never fenced"


@pytest.fixture
def lazy(monkeypatch):
    copier = LazyCopy()
    monkeypatch.setattr(offload, "_copier_for", lambda device: copier)
    return copier


@pytest.mark.parametrize("torch_optim", [True, False])
@pytest.mark.parametrize("flat", [False, True])
def test_the_copy_is_fenced_before_the_weights_change(lazy, torch_optim, flat):
    a, ema_a, b, ema_b = twins(flat=flat)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) if torch_optim else None for m in (a, b)]
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i in range(8):
        for m, opt, e, gen in ((a, opts[0], ema_a, gen_a), (b, opts[1], ema_b, gen_b)):
            sgd_step(m, opt, *batch(gen))  # BN buffers change in the forward, weights in step
            e.update(m)
        if i == 4:
            with ema_b.swapped(b):
                pass
    assert_same(ema_a, ema_b)
    # With torch.optim steps between updates the copy is fenced at the optimizer step, so it
    # overlaps the forward and backward; without them, at the next forward.
    if torch_optim:
        assert set(lazy.fences) == {"step", "idle"}  # idle: the swap's and the last read
        assert lazy.fences.count("step") >= 6
    else:
        assert set(lazy.fences) == {"forward", "idle"}


def test_hand_made_weight_surgery_needs_synchronize(lazy):
    a, ema_a, b, ema_b = twins()
    for m, e in ((a, ema_a), (b, ema_b)):
        e.update(m)
        with torch.no_grad():
            m.head.weight.mul_(2)  # after update(), before any forward or optimizer step
        e.update(m)
    wrong = not torch.equal(ema_a.tensors()["head.weight"], ema_b.tensors()["head.weight"])
    assert wrong  # the adversarial copy read the weights after the surgery
    a, ema_a, b, ema_b = twins()
    for m, e in ((a, ema_a), (b, ema_b)):
        e.update(m)
        e.synchronize()
        with torch.no_grad():
            m.head.weight.mul_(2)
        e.update(m)
    assert_same(ema_a, ema_b)


def test_model_copies_and_pickles_carry_an_inert_hook(lazy, tmp_path):
    _, _, b, ema_b = twins()
    ema_b.update(b)
    clone = copy.deepcopy(b)
    clone(torch.randn(1, 3, 8, 8))  # its hook does nothing
    torch.save(b, tmp_path / "model.pt")  # the hook pickles
    ema_b.synchronize()
    assert lazy.fences == ["idle"]


def test_the_nan_watch_sees_a_background_update(monkeypatch):
    from d2ema.averaging.health import NonfiniteWatch

    monkeypatch.setattr(NonfiniteWatch, "every", 1)  # the exact step (default: every 32)
    _, _, b, ema_b = twins()
    ema_b.update(b)
    with torch.no_grad():
        b.head.weight[0, 0] = float("nan")
    ema_b.update(b)  # step 2 poisons the average, in the worker thread
    assert ema_b.nonfinite_step == 2
