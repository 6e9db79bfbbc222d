"""``EMA`` against an independent per-tensor reference loop over many steps.

The reference below is the textbook formula written out with plain tensor arithmetic in
float64: for each tracked tensor ``ema = d * ema + (1 - d) * w`` (integer and bool buffers
copied), with the schedule, ``every`` and ``start`` rules of the spec. It shares no code with
d2ema. fp32 averages are compared at rtol 1e-6 and atol 1e-6 (the weights have magnitude ~1, so
atol is a few fp32 ulps of the data: rounding from steps when an entry was large persists).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2ema import EMA

STEPS = 200
RTOL = ATOL = 1e-6


# ---------------------------------------------------------------- models
class Net(nn.Module):
    """Conv + BN (float running stats, int64 num_batches_tracked) + linear + a frozen param."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3))) + self.frozen


class Mixed(nn.Module):
    """Hundreds of tiny tensors, tensors at the 4096-element threshold, large, non-contiguous
    and channels_last tensors, 0-d and empty buffers, fp16 / fp64 / bool / int tensors."""

    def __init__(self):
        super().__init__()
        self.tiny = nn.ParameterList([nn.Parameter(torch.randn(k % 5 + 1)) for k in range(300)])
        self.at_threshold = nn.Parameter(torch.randn(64, 64))  # 4096: small
        self.over_threshold = nn.Parameter(torch.randn(4097))  # large
        self.big = nn.Parameter(torch.randn(100, 70))
        self.t_small = nn.Parameter(torch.randn(30, 20).t())  # non-contiguous, small numel
        self.t_large = nn.Parameter(torch.randn(90, 60).t())  # non-contiguous, large numel
        self.conv_cl = nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last)
        self.conv_cl_small = nn.Conv2d(4, 4, 3).to(memory_format=torch.channels_last)
        self.f64 = nn.Parameter(torch.randn(7, dtype=torch.float64))
        self.register_buffer("scalar", torch.tensor(0.5))
        self.register_buffer("empty", torch.zeros(0))
        self.register_buffer("half_buf", torch.randn(9).half())
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("ints", torch.arange(5, dtype=torch.int32))
        self.register_buffer("flags", torch.tensor([True, False, True]))


def all_named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


# ---------------------------------------------------------------- the reference
def gamma_for(sigma_rel: float) -> float:
    """Solve sigma_rel**2 = (g+1) / ((g+2)**2 (g+3)) for g > 0 by bisection (decreasing in g)."""
    lo, hi = 0.0, 1e4
    for _ in range(300):
        mid = (lo + hi) / 2
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel**2:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


SCHEDULES: dict[str, tuple[dict, Callable[[float], Callable[[int], float]]]] = {
    "constant": ({}, lambda d: lambda n: d),
    "yolov5": ({"tau": 40.0}, lambda d: lambda n: d * (1 - math.exp(-n / 40.0))),
    "tf": ({"warmup_factor": 10.0}, lambda d: lambda n: min(d, (1 + n) / (10.0 + n))),
    "power": (
        {"inv_gamma": 2.0, "power": 0.7, "min_decay": 0.2},
        lambda d: lambda n: min(d, max(0.2, 1 - (1 + n / 2.0) ** -0.7)),
    ),
    "sigma_rel": (
        {"sigma_rel": 0.1},
        lambda d: lambda n: (1 - 1 / n) ** (gamma_for(0.1) + 1),
    ),
}


class Reference:
    """The EMA spec as a plain loop: one Python step per tensor, float64 arithmetic."""

    def __init__(
        self,
        model: nn.Module,
        decay_fn: Callable[[int], float],
        every: int = 1,
        start: int = 0,
        include_frozen: bool = True,
        include_buffers: bool = True,
        exclude: tuple[str, ...] = (),
        dtype: torch.dtype = torch.float64,
    ):
        self.decay_fn, self.every, self.start = decay_fn, every, start
        self.include_frozen, self.include_buffers, self.exclude = (
            include_frozen, include_buffers, exclude,
        )
        self.dtype = dtype
        self.step = 0
        self.avg = {n: self._cast(w) for n, w in self.tracked(model).items()}

    def tracked(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad or self.include_frozen:
                out[name] = p
        if self.include_buffers:
            out.update(model.named_buffers())
        return {n: t for n, t in out.items() if not any(re.search(x, n) for x in self.exclude)}

    def _cast(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach()
        return w.to(self.dtype, copy=True) if w.is_floating_point() else w.clone()

    def update(self, model: nn.Module) -> None:
        self.step += 1
        n = self.step - self.start
        weights = self.tracked(model)
        if n <= 0:
            self.avg = {name: self._cast(w) for name, w in weights.items()}
            return
        if n % self.every != 0:
            return
        d = self.decay_fn(n) ** self.every
        for name, w in weights.items():
            if w.is_floating_point():
                self.avg[name] = d * self.avg[name] + (1 - d) * w.detach().to(self.dtype)
            else:
                self.avg[name] = w.detach().clone()


def perturb(model: nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    """A training step stand-in: every float tensor moves, int counters count, bools flip."""
    with torch.no_grad():
        for name, t in all_named(model):
            if t.dtype == torch.bool:
                t.logical_not_()
            elif not t.is_floating_point():
                t.add_(1 + len(name) % 3)
            else:
                t.add_((torch.randn(t.shape, generator=gen) * scale).to(t.dtype))


def run(model, ema, ref, steps=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        perturb(model, gen)
        ema.update(model)
        ref.update(model)


def assert_matches(ema: EMA, ref: Reference, rtol=RTOL, atol=ATOL, ema_dtype=None):
    got = ema.tensors()
    assert sorted(got) == sorted(ref.avg)
    for name, expected in ref.avg.items():
        t = got[name]
        assert t.shape == expected.shape, name
        if not expected.is_floating_point():
            assert t.dtype == expected.dtype, name
            assert torch.equal(t, expected), name
            continue
        if ema_dtype is not None:
            assert t.dtype == ema_dtype, name
        torch.testing.assert_close(
            t.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_moved(ema: EMA, model: nn.Module, tol=1e-3) -> None:
    """Sanity: the average is neither the initial nor the current weights (the test bites)."""
    cur = dict(all_named(model))
    diffs = [
        (t.double() - cur[n].double()).abs().max().item()
        for n, t in ema.tensors().items()
        if t.is_floating_point() and t.numel()
    ]
    assert max(diffs) > tol


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("decay", [0.95, 0.9998])
def test_every_schedule(name, decay):
    torch.manual_seed(0)
    model = Net()
    params, formula = SCHEDULES[name]
    ema = EMA(model, decay, schedule=name, schedule_params=params)
    ref = Reference(model, formula(decay))
    run(model, ema, ref)
    assert ema.step == STEPS
    assert_matches(ema, ref, ema_dtype=torch.float32)
    assert_moved(ema, model)


def test_callable_schedule():
    torch.manual_seed(1)
    model = Net()

    def sched(n):
        return 0.9 if n % 2 else 0.5

    ema = EMA(model, schedule=sched)
    ref = Reference(model, sched)
    run(model, ema, ref)
    assert_matches(ema, ref)


# ---------------------------------------------------------------- every / start
@pytest.mark.parametrize(
    ("every", "start", "schedule"),
    [(3, 0, "constant"), (1, 10, "constant"), (4, 7, "yolov5"), (3, 10, "tf"), (5, 250, "power")],
)
def test_every_and_start(every, start, schedule):
    torch.manual_seed(2)
    model = Net()
    params, formula = SCHEDULES[schedule]
    ema = EMA(model, 0.97, schedule=schedule, schedule_params=params, every=every, start=start)
    ref = Reference(model, formula(0.97), every=every, start=start)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, STEPS + 1):
        perturb(model, gen)
        ema.update(model)
        ref.update(model)
        if step in (start, start + 1, start + every, start + every + 1):
            assert_matches(ema, ref)
    assert_matches(ema, ref)
    if start >= STEPS:  # still copying
        for name, w in all_named(model):
            assert torch.equal(ema.tensors()[name], w)


def test_explicit_step_argument():
    """update(model, step=k) follows a trainer's iteration counter, gaps included."""
    torch.manual_seed(3)
    model = Net()
    params, formula = SCHEDULES["yolov5"]
    ema = EMA(model, 0.97, schedule="yolov5", schedule_params=params, every=2, start=3)
    ref = Reference(model, formula(0.97), every=2, start=3)
    gen = torch.Generator().manual_seed(0)
    for step in [1, 2, 3, 4, 5, 6, 8, 9, 10, 20, 21, 22, 40, 41]:
        perturb(model, gen)
        ema.update(model, step=step)
        ref.step = step - 1
        ref.update(model)
        assert ema.step == step
    assert_matches(ema, ref)


# ---------------------------------------------------------------- dtypes
def test_bf16_model_fp32_master():
    torch.manual_seed(4)
    model = Net().to(torch.bfloat16)
    ema = EMA(model, 0.99, schedule="tf")
    ref = Reference(model, SCHEDULES["tf"][1](0.99))
    run(model, ema, ref)
    assert_matches(ema, ref, ema_dtype=torch.float32)
    assert ema.tensors()["bn.num_batches_tracked"].dtype == torch.int64
    assert_moved(ema, model)
    for p in model.parameters():  # the model stays bf16
        assert p.dtype == torch.bfloat16


def test_fp16_model_fp32_master():
    torch.manual_seed(5)
    model = Net().half()
    ema = EMA(model, 0.98)
    ref = Reference(model, lambda n: 0.98)
    run(model, ema, ref, steps=100)
    assert_matches(ema, ref, ema_dtype=torch.float32)


class BF16StepReference(Reference):
    """The average kept in bf16: each step computed in fp32 and rounded to bf16."""

    def update(self, model):
        self.step += 1
        for name, w in self.tracked(model).items():
            if w.is_floating_point():
                a = 1 - self.decay_fn(self.step)
                e = self.avg[name].float()
                self.avg[name] = (e + a * (w.detach().float() - e)).to(torch.bfloat16)
            else:
                self.avg[name] = w.detach().clone()


def test_bf16_model_without_master():
    torch.manual_seed(6)
    model = Net().to(torch.bfloat16)
    ema = EMA(model, 0.9, master_dtype=None)
    ref = BF16StepReference(model, lambda n: 0.9, dtype=torch.bfloat16)
    exact = Reference(model, lambda n: 0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        perturb(model, gen)
        ema.update(model)
        ref.update(model)
        exact.update(model)
    # one bf16 rounding per step: the same up to a rounding difference (2**-8 relative)
    assert_matches(ema, ref, rtol=2**-7, atol=2**-10, ema_dtype=torch.bfloat16)
    # and within bf16 accuracy of the exact average
    assert_matches(ema, exact, rtol=0.05, atol=0.02)


def test_fp64_model_is_averaged_in_fp64():
    torch.manual_seed(7)
    model = Net().double()
    ema = EMA(model, 0.97)
    ref = Reference(model, lambda n: 0.97)
    run(model, ema, ref)
    assert_matches(ema, ref, rtol=1e-13, atol=1e-13, ema_dtype=torch.float64)


# ---------------------------------------------------------------- what is tracked
def test_int_buffers_are_copied_exactly():
    torch.manual_seed(8)
    model = Net()
    ema = EMA(model, 0.999)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    for step in range(1, 11):
        model(x)  # train-mode forward: BN statistics and num_batches_tracked move
        ema.update(model)
        nbt = ema.tensors()["bn.num_batches_tracked"]
        assert nbt.dtype == torch.int64 and nbt.item() == step
    assert not torch.equal(ema.tensors()["bn.running_mean"], model.bn.running_mean)


@pytest.mark.parametrize(
    "options",
    [
        {"include_frozen": False},
        {"include_buffers": False},
        {"include_frozen": False, "include_buffers": False},
        {"exclude": (r"^bn\.",)},
        {"exclude": (r"running_var$", r"fc\.bias")},
        {"exclude": r"num_batches"},  # a single string is one pattern
    ],
)
def test_selection_options(options):
    torch.manual_seed(9)
    model = Net()
    ema = EMA(model, 0.95, **options)
    exclude = options.get("exclude", ())
    exclude = (exclude,) if isinstance(exclude, str) else exclude
    ref = Reference(model, lambda n: 0.95, **{**options, "exclude": exclude})
    run(model, ema, ref, steps=50)
    assert_matches(ema, ref)
    got = ema.tensors()
    assert ("frozen" in got) == options.get("include_frozen", True)
    # swapping leaves untracked tensors alone
    before = {n: t.detach().clone() for n, t in all_named(model)}
    with ema.swapped(model):
        for n, t in all_named(model):
            assert torch.equal(t, got[n] if n in got else before[n]), n
    for n, t in all_named(model):
        assert torch.equal(t, before[n]), n


def test_nothing_to_track_and_bad_arguments():
    with pytest.raises(ValueError, match="no tensors"):
        EMA(Net(), exclude=(".",))
    with pytest.raises(ValueError, match="every"):
        EMA(Net(), every=0)
    with pytest.raises(ValueError, match="start"):
        EMA(Net(), start=-1)


def test_shared_parameters_tracked_once():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    ema = EMA(model, 0.9)
    assert sorted(ema.tensors()) == ["0.bias", "0.weight", "1.bias"]
    ref = Reference(model, lambda n: 0.9)
    run(model, ema, ref, steps=30)
    assert_matches(ema, ref)


# ---------------------------------------------------------------- many tiny / odd tensors
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_mixed_tensors(flat, skip_nonfinite):
    torch.manual_seed(11)
    model = Mixed()
    layout = {n: (t.stride(), t.dtype) for n, t in all_named(model)}
    ema = EMA(model, 0.95, flat=flat, skip_nonfinite=skip_nonfinite)
    ref = Reference(model, lambda n: 0.95)
    run(model, ema, ref, steps=60)
    assert_matches(ema, ref)
    assert ema.num_skipped == 0
    got = ema.tensors()
    assert got["half_buf"].dtype == torch.float32
    assert got["f64"].dtype == torch.float64
    assert got["flags"].dtype == torch.bool and got["ints"].dtype == torch.int32
    if not flat:  # strides untouched (flat mode makes everything contiguous, by design)
        assert {n: (t.stride(), t.dtype) for n, t in all_named(model)} == layout
    # swapping in and out keeps everything
    before = {n: t.detach().clone() for n, t in all_named(model)}
    with ema.swapped(model):
        for n, t in all_named(model):
            assert torch.equal(t, got[n].to(t.dtype)), n
    for n, t in all_named(model):
        assert torch.equal(t, before[n]), n


# ---------------------------------------------------------------- flat mode
class TrainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def train(model, ema, steps, seed, dtype=torch.float32, ref=None, opt=None):
    """``steps`` SGD steps on random data, each followed by ``ema``/``ref`` updates; returns
    the optimizer (pass it back in to continue)."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen).to(dtype)
        y = torch.randint(0, 4, (4,), generator=gen)
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)
        if ref is not None:
            ref.update(model)
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_mode_matches_reference_and_training_is_unchanged(dtype):
    torch.manual_seed(12)
    plain = TrainNet().to(dtype)
    flat_model = copy.deepcopy(plain)
    ema = EMA(flat_model, 0.9, schedule="yolov5", schedule_params={"tau": 40.0}, flat=True)
    # every float tensor of the model now lives in one buffer per dtype
    storages = {t.untyped_storage().data_ptr() for _, t in all_named(flat_model)
                if t.is_floating_point()}
    assert len(storages) == 1
    ref = Reference(flat_model, SCHEDULES["yolov5"][1](0.9))
    steps = 40 if dtype == torch.float32 else 15  # bf16 convolutions are slow on CPU
    train(flat_model, ema, steps, seed=0, dtype=dtype, ref=ref)
    train(plain, None, steps, seed=0, dtype=dtype)
    flat_state, plain_state = flat_model.state_dict(), plain.state_dict()
    assert list(flat_state) == list(plain_state)
    for name in plain_state:
        assert torch.equal(flat_state[name], plain_state[name]), name
    assert_matches(ema, ref, ema_dtype=torch.float32)
    assert_moved(ema, flat_model)


def test_flat_and_plain_emas_agree():
    torch.manual_seed(13)
    a = Mixed()
    b = copy.deepcopy(a)
    ema_a, ema_b = EMA(a, 0.9), EMA(b, 0.9, flat=True)
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(40):
        perturb(a, gen_a)
        perturb(b, gen_b)
        ema_a.update(a)
        ema_b.update(b)
    ta, tb = ema_a.tensors(), ema_b.tensors()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-6, atol=1e-6)


def test_device_argument_on_cpu():
    torch.manual_seed(14)
    model = Net()
    ema = EMA(model, 0.9, device="cpu")
    ref = Reference(model, lambda n: 0.9)
    run(model, ema, ref, steps=30)
    assert_matches(ema, ref)
    assert all(t.device.type == "cpu" for t in ema.tensors().values())
    ema.to("cpu")
    run(model, ema, ref, steps=5, seed=1)
    assert_matches(ema, ref)


# ---------------------------------------------------------------- the peers' conventions
def test_start_1_is_torch_averaged_model():
    """``AveragedModel`` (like mmengine and ema-pytorch) copies at its first update and averages
    from the second: d2ema's ``start=1``. Run against torch's own class."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).double()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = EMA(model, 0.9, start=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        model.train()(torch.randn(8, 4, generator=gen, dtype=torch.float64))  # BN statistics
        peer.update_parameters(model)
        ema.update(model)
        theirs = peer.module.state_dict()
        for name, t in ema.tensors().items():  # its integer buffers are averaged, ours copied
            if t.is_floating_point():
                torch.testing.assert_close(t, theirs[name], rtol=1e-12, atol=1e-12)
    assert ema.tensors()["1.num_batches_tracked"] == 6


def _timm_diffusers_power(step: int, update_after_step: int, decay: float, inv_gamma: float,
                          power: float, min_decay: float) -> float:
    """timm ``ModelEmaV3.get_decay(step)`` and diffusers ``EMAModel.get_decay`` (after its
    ``optimization_step += 1``), transcribed; ema-pytorch's ``get_current_decay`` is the same
    with ``self.step`` counted after the increment. 0 means the EMA copies the weights."""
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    d = 1 - (1 + step / inv_gamma) ** -power
    return max(min(d, decay), min_decay)


@pytest.mark.parametrize("update_after_step", [0, 1, 100])
def test_power_is_timm_diffusers_and_ema_pytorch_with_start_update_after_step_plus_1(
        update_after_step):
    params = {"inv_gamma": 2.0, "power": 0.75, "min_decay": 0.1}
    ema = EMA(Net(), 0.9999, schedule="power", schedule_params=params,
              start=update_after_step + 1)
    for step in range(1, 400):
        assert ema.decay_at(step) == pytest.approx(
            _timm_diffusers_power(step, update_after_step, 0.9999, **params), abs=1e-15), step
