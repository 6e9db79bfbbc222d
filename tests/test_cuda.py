"""The GPU paths, against the float64 reference of test_ema_reference.py. Marked ``cuda``:
skipped without a CUDA device; ``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``).

* bf16 autocast training (fp32 weights) and a bf16 model with the fp32 master;
* an fp16 model;
* a CPU-held EMA of a CUDA model: the background path (side-stream copy, host lerp) bitwise
  equal to the synchronous one, with torch.optim and with a hand-written optimizer;
* the swap: 0 bytes allocated on the device, for a same-device EMA (storage exchange) and for
  a CPU-held one (the trained weights wait in pinned host memory);
* flat mode on CUDA, channels_last kept.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_ema_reference import Reference, TrainNet, all_named
from test_ema_reference import assert_matches as assert_matches_on_cpu

from d2ema import EMA
from d2ema.averaging.offload import _CudaCopy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEV = "cuda"


def assert_matches(ema, ref, **kwargs):
    """The reference's float64 arithmetic ran where the model is; compare on the CPU."""
    cpu = copy.copy(ref)
    cpu.avg = {n: t.cpu() for n, t in ref.avg.items()}
    cpu_ema = copy.copy(ema)
    cpu_ema.tensors = lambda: {n: t.cpu() for n, t in ema.tensors().items()}
    assert_matches_on_cpu(cpu_ema, cpu, **kwargs)


def train(model, ema, ref, steps, seed, *, dtype=torch.float32, autocast=None, opt="sgd"):
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt == "sgd" else None
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=gen).to(DEV, dtype)
        y = torch.randint(0, 4, (8,), generator=gen).to(DEV)
        with torch.autocast(DEV, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        if optim is not None:
            optim.step()
            optim.zero_grad()
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.05 * p.grad)
                    p.grad = None
        if ema is not None:
            ema.update(model)
        if ref is not None:
            ref.update(model)


@pytest.mark.parametrize("flat", [False, True])
def test_fp32_training_matches_the_float64_reference(flat):
    torch.manual_seed(0)
    model = TrainNet().to(DEV)
    ema = EMA(model, 0.9, schedule="yolov5", schedule_params={"tau": 40.0}, flat=flat)
    ref = Reference(model, lambda n: 0.9 * (1 - torch.exp(torch.tensor(-n / 40.0)).item()))
    train(model, ema, ref, 30, seed=0)
    assert_matches(ema, ref)
    assert all(t.device.type == torch.device(DEV).type for t in ema.tensors().values())


def test_bf16_autocast_training_keeps_an_fp32_average():
    torch.manual_seed(1)
    model = TrainNet().to(DEV)
    ema = EMA(model, 0.95)
    ref = Reference(model, lambda n: 0.95)
    train(model, ema, ref, 20, seed=1, autocast=torch.bfloat16)
    assert_matches(ema, ref)
    assert ema.tensors()["conv1.weight"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flat", [False, True])
def test_reduced_precision_model_with_fp32_master(dtype, flat):
    torch.manual_seed(2)
    model = TrainNet().to(DEV, dtype)
    ema = EMA(model, 0.999, flat=flat)  # master_dtype=float32 by default
    ref = Reference(model, lambda n: 0.999)
    train(model, ema, ref, 20, seed=2, dtype=dtype)
    assert_matches(ema, ref, ema_dtype=torch.float32)
    got = ema.tensors()
    assert got["conv1.weight"].dtype == torch.float32


def _twins(**kwargs):
    torch.manual_seed(3)
    a = TrainNet().to(DEV)
    b = copy.deepcopy(a)
    sync = EMA(a, 0.9, device="cpu", overlap=False, **kwargs)
    background = EMA(b, 0.9, device="cpu", **kwargs)
    return a, sync, b, background


@pytest.mark.parametrize("opt", ["sgd", "by hand"])
@pytest.mark.parametrize("flat", [False, True])
def test_cpu_ema_of_a_cuda_model_in_the_background_is_bitwise_the_synchronous_one(opt, flat):
    a, sync, b, background = _twins(flat=flat)
    assert sync._offload is None
    assert isinstance(background._offload.copier, _CudaCopy)  # overlap is the default here
    assert all(bd.staging.is_pinned() for bd in background._offload.bindings)
    ref = Reference(a, lambda n: 0.9)
    for round_ in range(3):
        train(a, sync, ref, 6, seed=round_, opt=opt)
        train(b, background, None, 6, seed=round_, opt=opt)
        with sync.swapped(a), background.swapped(b):  # evaluation in the middle
            for (n, x), (_, y) in zip(all_named(a), all_named(b)):
                assert torch.equal(x, y), n
    ta, tb = sync.tensors(), background.tensors()
    for name in ta:
        assert tb[name].device.type == "cpu"
        assert torch.equal(ta[name], tb[name]), name
    assert_matches(background, ref)


def _device_bytes_during_swap(ema, model) -> tuple[int, int]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with ema.swapped(model):
        torch.cuda.synchronize()
        inside = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    return inside - before, torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("kind", ["same device", "same device, flat", "cpu ema", "bf16 model"])
def test_swap_allocates_nothing_on_the_device(kind):
    torch.manual_seed(4)
    model = TrainNet().to(DEV, torch.bfloat16 if kind == "bf16 model" else torch.float32)
    kwargs = {"device": "cpu"} if kind == "cpu ema" else {"flat": kind.endswith("flat")}
    ema = EMA(model, 0.9, **kwargs)
    train(model, ema, None, 3, seed=4, dtype=next(model.parameters()).dtype)
    before = {n: t.clone() for n, t in all_named(model)}
    for _ in range(2):  # the first swap may allocate host buffers; neither touches the device
        assert _device_bytes_during_swap(ema, model) == (0, 0)
    for n, t in all_named(model):
        assert torch.equal(t, before[n]), n


def test_flat_mode_on_cuda_keeps_channels_last():
    torch.manual_seed(5)
    model = TrainNet().to(DEV, memory_format=torch.channels_last)
    ema = EMA(model, 0.9, flat=True)
    ref = Reference(model, lambda n: 0.9)
    floats = [t for _, t in all_named(model) if t.is_floating_point()]
    storages = {t.untyped_storage().data_ptr() for t in floats}
    assert len(storages) == 1
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    train(model, ema, ref, 15, seed=5)
    assert_matches(ema, ref)
    float_bindings = [b for b in ema._bindings if b.group.averaged]
    assert all(b.model_flat is not None for b in float_bindings)  # one lerp_ per update
