"""Exact properties of the EMA that must hold for every configuration (hypothesis)."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from d2ema import EMA

SETTINGS = settings(max_examples=25, deadline=None)

schedule_st = st.sampled_from(
    [
        ("constant", {}),
        ("yolov5", {"tau": 5.0}),
        ("tf", {}),
        ("power", {"inv_gamma": 1.0, "power": 0.75}),
        ("sigma_rel", {"sigma_rel": 0.1}),
    ]
)
dtype_st = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


class Small(nn.Module):
    def __init__(self, dtype: torch.dtype, scale: float, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        big = torch.randn(70, 65, generator=gen) * scale  # > 4096 elements: the per-tensor path
        self.big = nn.Parameter(big.to(dtype))
        self.tiny = nn.ParameterList(
            [nn.Parameter((torch.randn(k + 1, generator=gen) * scale).to(dtype)) for k in range(6)]
        )
        self.register_buffer("stat", (torch.rand(4, generator=gen) * scale).to(dtype))
        self.register_buffer("count", torch.tensor(3))


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: t.detach().clone()
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
    }


def set_weights(model: nn.Module, gen: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for t in [*model.parameters(), model.stat]:
            t.copy_(torch.randn(t.shape, generator=gen) * scale)
        model.count.add_(1)


def assert_ema_equals(ema: EMA, expected: dict[str, torch.Tensor]) -> None:
    got = ema.tensors()
    assert sorted(got) == sorted(expected)
    for name, t in got.items():
        # the EMA may be a wider (master) dtype; the value must be exactly the weight's
        assert torch.equal(t, expected[name].to(t.dtype)), name


common = dict(
    dtype=dtype_st,
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
    every=st.integers(1, 4),
    start=st.integers(0, 6),
    flat=st.booleans(),
    master=st.booleans(),
)


@SETTINGS
@given(
    decay=st.floats(0.0, 1.0), schedule=schedule_st, steps=st.integers(1, 25), **common
)
def test_constant_weights_leave_the_ema_constant(
    decay, schedule, steps, dtype, scale, seed, every, start, flat, master
):
    model = Small(dtype, scale, seed)
    initial = float_state(model)
    name, params = schedule
    ema = EMA(
        model, decay, schedule=name, schedule_params=params, every=every, start=start,
        flat=flat, master_dtype=torch.float32 if master else None,
    )
    for _ in range(steps):
        ema.update(model)
    assert ema.step == steps
    assert_ema_equals(ema, initial)


def last_applied_step(steps: int, every: int, start: int) -> int:
    """The last step at which the EMA looked at the weights (0: only at construction)."""
    for s in range(steps, 0, -1):
        n = s - start
        if n <= 0 or n % every == 0:
            return s
    return 0


@SETTINGS
@given(steps=st.integers(1, 20), **common)
def test_decay_zero_is_the_last_weights(steps, dtype, scale, seed, every, start, flat, master):
    model = Small(dtype, scale, seed)
    ema = EMA(
        model, 0.0, every=every, start=start, flat=flat,
        master_dtype=torch.float32 if master else None,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    history = [float_state(model)]
    for _ in range(steps):
        set_weights(model, gen, scale)
        history.append(float_state(model))
        ema.update(model)
    assert_ema_equals(ema, history[last_applied_step(steps, every, start)])
    if every == 1:
        assert_ema_equals(ema, float_state(model))


@SETTINGS
@given(steps=st.integers(1, 20), **common)
def test_decay_one_keeps_the_first_weights(steps, dtype, scale, seed, every, start, flat, master):
    model = Small(dtype, scale, seed)
    ema = EMA(
        model, 1.0, every=every, start=start, flat=flat,
        master_dtype=torch.float32 if master else None,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    history = [float_state(model)]
    for _ in range(steps):
        set_weights(model, gen, scale)
        history.append(float_state(model))
        ema.update(model)
    # weights are copied through step `start`; decay 1 then freezes the float averages
    frozen = history[min(start, steps)]
    expected = {**frozen, "count": history[last_applied_step(steps, every, start)]["count"]}
    assert_ema_equals(ema, expected)


@SETTINGS
@given(
    decay=st.floats(0.999, 0.9999),
    steps=st.integers(1, 50),
    ulps=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_bf16_master_moves_where_a_bf16_average_stalls(decay, steps, ulps, seed):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(64, 80)  # weight: 5120 elements (per-tensor path); bias: small
    with torch.no_grad():
        for p in model.parameters():  # magnitudes in [0.5, 2): bf16 ulp 2**-8 .. 2**-6
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            p.copy_(sign * (0.5 + 1.5 * torch.rand(p.shape, generator=gen)))
    model = model.to(torch.bfloat16)
    initial = float_state(model)
    eps = torch.finfo(torch.bfloat16).eps
    # every weight moves up by 1 to 2 * ulps bf16 ulps: a small change
    nudged = {n: (w.float() + ulps * eps * w.float().abs()).bfloat16() for n, w in initial.items()}
    master = EMA(model, decay)
    kept = EMA(model, decay, master_dtype=None)
    for _ in range(steps):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(nudged[name])
        master.update(model)
        kept.update(model)
    for name, w0 in initial.items():
        m, k = master.tensors()[name], kept.tensors()[name]
        assert m.dtype == torch.float32 and k.dtype == torch.bfloat16
        assert (nudged[name] > w0).all()
        # (1 - d) * (w - ema) is far below half a bf16 ulp: the bf16 average never moves ...
        assert torch.equal(k, w0)
        # ... while the fp32 master moves every entry toward w, by about the right amount
        # (each step's move is >= 6 fp32 ulps, so fp32 rounding is within ~8% of it)
        moved = m.double() - w0.double()
        expected = (1 - decay**steps) * (nudged[name].double() - w0.double())
        assert (moved > 0).all()
        torch.testing.assert_close(moved, expected, rtol=0.1, atol=0)


@SETTINGS
@given(
    split=st.integers(0, 30),
    schedule=schedule_st,
    every=st.integers(1, 3),
    start=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    flat=st.booleans(),
    skip_nonfinite=st.booleans(),
)
def test_resume_from_state_dict_is_bit_exact(
    split, schedule, every, start, seed, dtype, flat, skip_nonfinite
):
    """Saving at any step and resuming into a fresh EMA continues exactly as without a break."""
    total = 30
    name, params = schedule
    kwargs = dict(
        decay=0.9, schedule=name, schedule_params=params, every=every, start=start, flat=flat,
        skip_nonfinite=skip_nonfinite,
    )
    model = Small(dtype, 1.0, seed)
    model_b = copy.deepcopy(model)
    ema = EMA(model, **kwargs)
    ema_b = EMA(model_b, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(1, total + 1):
        state = {n: torch.randn(t.shape, generator=gen) for n, t in float_state(model).items()}
        for m in (model, model_b):
            with torch.no_grad():
                for n, t in list(m.named_parameters()) + list(m.named_buffers()):
                    t.copy_(state[n].to(t.dtype) if t.is_floating_point() else t + 1)
        ema.update(model)
        ema_b.update(model_b)
        if step == split:
            saved = copy.deepcopy(ema_b.state_dict())
            model_b = Small(dtype, 1.0, seed + 7)  # a fresh model, other weights
            model_b.load_state_dict(model.state_dict())
            ema_b = EMA(model_b, **kwargs)
            ema_b.load_state_dict(saved)
            assert ema_b.step == split
    assert ema_b.step == ema.step == total
    a, b = ema.tensors(), ema_b.tensors()
    for n in a:
        assert torch.equal(a[n], b[n]), n
