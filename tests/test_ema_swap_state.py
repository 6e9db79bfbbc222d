"""Swapping EMA weights in and out, checkpoints, wrappers, NaN guard and re-binding."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2ema import EMA, FORMAT_VERSION, EMAStateError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.big = nn.Linear(80, 70)  # > 4096 elements

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def named(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(list(model.named_parameters()) + list(model.named_buffers()))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in named(model).items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


def trained(dtype=torch.float32, steps=5, **ema_kwargs) -> tuple[nn.Module, EMA]:
    """A model and an EMA that differ in every float entry."""
    torch.manual_seed(0)
    model = Net().to(dtype)
    ema = EMA(model, 0.5, **ema_kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for t in named(model).values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=gen).to(dtype))
                else:
                    t.add_(1)
        ema.update(model)
    return model, ema


def ema_values_as_model(ema: EMA, model: nn.Module) -> dict[str, torch.Tensor]:
    cur = named(model)
    return {n: t.to(cur[n].dtype) for n, t in ema.tensors().items()}


# ---------------------------------------------------------------- swapped()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flat", [False, True])
def test_swap_puts_ema_in_and_restores_bit_exact(dtype, flat):
    model, ema = trained(dtype, flat=flat)
    before = snapshot(model)
    inside = ema_values_as_model(ema, model)
    assert any(not torch.equal(before[n], inside[n]) for n in before if "num_batches" not in n)
    for _ in range(2):  # the second swap reuses the backup buffers
        with ema.swapped(model) as m:
            assert m is model
            assert_same(snapshot(model), inside)
            model.eval()
            model(torch.randn(2, 3, 6, 6).to(dtype))
        assert_same(snapshot(model), before)
    ema.update(model)  # still bound, still works


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_restores_after_an_exception(dtype):
    model, ema = trained(dtype)
    before = snapshot(model)
    ema_before = {n: t.clone() for n, t in ema.tensors().items()}
    with pytest.raises(KeyError, match="boom"), ema.swapped(model):
        with torch.no_grad():
            model.fc.weight.mul_(0)  # an in-block write before the error: kept in the EMA
        raise KeyError("boom")
    assert_same(snapshot(model), before)
    after = ema.tensors()
    assert torch.equal(after["fc.weight"], torch.zeros_like(after["fc.weight"]))
    for n in ema_before:
        if n != "fc.weight":
            assert torch.equal(after[n], ema_before[n]), n
    # usable again
    with ema.swapped(model):
        pass
    assert_same(snapshot(model), before)


def test_swap_is_zero_copy_for_the_same_dtype():
    model, ema = trained(torch.float32)
    tensors = ema.tensors()
    outside = {n: t.data_ptr() for n, t in named(model).items()}
    with ema.swapped(model):
        for n, t in named(model).items():
            assert t.data_ptr() == tensors[n].data_ptr(), n
            assert t.data_ptr() != outside[n]
    assert {n: t.data_ptr() for n, t in named(model).items()} == outside


def test_swap_keeps_parameter_identity():
    model, ema = trained(torch.bfloat16)
    params = {n: id(p) for n, p in model.named_parameters()}
    with ema.swapped(model):
        assert {n: id(p) for n, p in model.named_parameters()} == params
        assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert {n: id(p) for n, p in model.named_parameters()} == params


def test_nested_swap_and_update_inside_swap_raise():
    model, ema = trained()
    before = snapshot(model)
    with ema.swapped(model):
        with pytest.raises(RuntimeError, match="already active"), ema.swapped(model):
            pass
        step = ema.step
        with pytest.raises(RuntimeError, match="inside"):
            ema.update(model)
        assert ema.step == step
    assert_same(snapshot(model), before)
    ema.update(model)
    assert ema.step == step + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_statistics_recomputed_inside_the_swap_land_in_the_ema(dtype):
    model, ema = trained(dtype)
    before = snapshot(model)
    x = torch.randn(8, 3, 7, 7).to(dtype)
    ema_weights = ema_values_as_model(ema, model)
    with ema.swapped(model):
        model.train()
        with torch.no_grad():
            model.bn.reset_running_stats()
            model.bn.momentum = None  # cumulative average: exactly the batch statistics
            model(x)
            model.bn.momentum = 0.1
        stats = {k: getattr(model.bn, k).detach().clone()
                 for k in ("running_mean", "running_var", "num_batches_tracked")}
    assert_same(snapshot(model), before)
    # the expected statistics: the BN input computed with the EMA's conv weight
    feats = F.conv2d(x, ema_weights["conv.weight"])
    mean = feats.float().mean((0, 2, 3))
    var = feats.float().var((0, 2, 3), unbiased=True)
    got = ema.tensors()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got["bn.running_mean"].float(), mean, **tol)
    torch.testing.assert_close(got["bn.running_var"].float(), var, **tol)
    assert got["bn.num_batches_tracked"].item() == 1
    for k, v in stats.items():
        assert torch.equal(got[f"bn.{k}"], v.to(got[f"bn.{k}"].dtype)), k
    # untouched entries are unchanged
    for n in ("conv.weight", "fc.bias", "big.weight"):
        assert torch.equal(got[n].to(dtype), ema_weights[n]), n


# ---------------------------------------------------------------- copy_to / model_copy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_to_and_model_copy(dtype):
    model, ema = trained(dtype)
    before = snapshot(model)
    expected = ema_values_as_model(ema, model)
    clone = ema.model_copy(nn.DataParallel(model))
    assert clone is not model and type(clone) is Net
    assert_same(snapshot(clone), expected)
    assert_same(snapshot(model), before)  # untouched
    assert all(not torch.equal(named(clone)[n], before[n]) for n in ("fc.weight", "big.weight"))
    ema.copy_to(model)
    assert_same(snapshot(model), expected)


def test_model_copy_drops_references_to_the_ema():
    model, ema = trained()
    model.ema_state = ema  # e.g. detectron2 attaches it to the model
    clone = ema.model_copy(model)
    assert clone.ema_state is None
    assert model.ema_state is ema


# ---------------------------------------------------------------- state dicts
def test_state_dict_layout():
    model, ema = trained(schedule="yolov5", schedule_params={"tau": 30.0}, every=2, start=1)
    sd = ema.state_dict()
    assert set(sd) == {"ema_state", "ema_meta"}
    assert sorted(sd["ema_state"]) == sorted(named(model))
    meta = sd["ema_meta"]
    assert meta == {
        "format_version": FORMAT_VERSION,
        "step": 5,
        "num_skipped": 0,
        "schedule": {"name": "yolov5", "decay": 0.5, "tau": 30.0},
        "every": 2,
        "start": 1,
        "master_dtype": "torch.float32",
    }
    tensors = ema.tensors()
    assert ema.num_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert "step=5" in repr(ema) and f"tensors={len(tensors)}" in repr(ema)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_through_torch_save(dtype):
    model, ema = trained(dtype, skip_nonfinite=True)
    ema.num_skipped = 3
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), **ema.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(123)
    fresh_model = Net().to(dtype)  # different weights
    fresh = EMA(fresh_model, 0.5, skip_nonfinite=True)
    result = fresh.load_state_dict(ckpt)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert (fresh.step, fresh.num_skipped) == (5, 3)
    assert_same(fresh.tensors(), {n: t.clone() for n, t in ema.tensors().items()})
    # both continue identically
    fresh_model.load_state_dict(ckpt["model"])
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        with torch.no_grad():
            for m in (model, fresh_model):
                for t in m.parameters():
                    t.mul_(0.5)
            noise = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
            for m in (model, fresh_model):
                for n, p in m.named_parameters():
                    p.add_(noise[n].to(dtype))
        ema.update(model)
        fresh.update(fresh_model)
    assert_same(fresh.tensors(), {n: t.clone() for n, t in ema.tensors().items()})


def mismatch_cases(ema: EMA):
    sd = ema.state_dict()
    state = {n: t.clone() for n, t in sd["ema_state"].items()}
    meta = dict(sd["ema_meta"])

    def fmt(tensors=None, **meta_changes):
        tensors = state if tensors is None else tensors
        return {"ema_state": tensors, "ema_meta": {**meta, **meta_changes}}

    missing = {n: t for n, t in state.items() if n != "fc.bias"}
    unexpected = {**state, "extra.weight": torch.zeros(3)}
    wrong_shape = {**state, "fc.weight": torch.zeros(5, 7)}
    int_for_float = {**state, "bn.running_mean": torch.zeros(6, dtype=torch.long)}
    float_for_int = {**state, "bn.num_batches_tracked": torch.tensor(2.0)}
    not_tensor = {**state, "fc.bias": [0.0] * 5}
    return [
        ("missing", fmt(missing), "fc.bias"),
        ("unexpected", fmt(unexpected), "extra.weight"),
        ("wrong shape", fmt(wrong_shape), r"fc.weight: shape \(5, 7\)"),
        ("int for float", fmt(int_for_float), "bn.running_mean: dtype torch.int64"),
        ("float for int", fmt(float_for_int), "bn.num_batches_tracked: dtype torch.float32"),
        ("not a tensor", fmt(not_tensor), "not tensors"),
        ("newer format", fmt(format_version=FORMAT_VERSION + 1), "format_version"),
        ("bad step", fmt(step="12"), "step"),
        ("negative step", fmt(step=-1), "step"),
        ("meta not a dict", {"ema_state": state, "ema_meta": [1]}, "ema_meta"),
        ("plain missing", missing, "fc.bias"),
        ("plain wrong shape", wrong_shape, "fc.weight"),
        ("several", fmt(wrong_shape | {"extra.weight": torch.zeros(1)}), "extra.weight"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_state_is_refused_and_changes_nothing(case):
    _model, ema = trained(skip_nonfinite=True)
    ema.num_skipped = 2
    label, state, match = mismatch_cases(ema)[case]
    # make every loadable value differ from the EMA's, so a partial load would show
    if isinstance(state.get("ema_state"), dict):
        for t in state["ema_state"].values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.add_(1)
    before = {n: t.clone() for n, t in ema.tensors().items()}
    with pytest.raises(EMAStateError, match=match) as info:
        ema.load_state_dict(state)
    assert "cannot load this EMA state" in str(info.value), label
    assert (ema.step, ema.num_skipped) == (5, 2), label
    assert_same(dict(ema.tensors()), before)


def test_several_problems_are_listed_together():
    _model, ema = trained()
    state = {n: t.clone() for n, t in ema.tensors().items()}
    del state["fc.bias"]
    state["fc.weight"] = torch.zeros(1)
    state["nope"] = torch.zeros(1)
    with pytest.raises(EMAStateError) as info:
        ema.load_state_dict(state)
    message = str(info.value)
    assert "fc.bias" in message and "fc.weight" in message and "nope" in message


def test_non_strict_load_returns_missing_and_unexpected():
    _model, ema = trained()
    state = {n: t.clone() + 1 if t.is_floating_point() else t.clone()
             for n, t in ema.tensors().items()}
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    before_bias = ema.tensors()["fc.bias"].clone()
    result = ema.load_state_dict({"ema_state": state}, strict=False)
    assert list(result.missing_keys) == ["fc.bias"]
    assert list(result.unexpected_keys) == ["extra.weight"]
    got = ema.tensors()
    assert torch.equal(got["fc.bias"], before_bias)
    assert torch.equal(got["fc.weight"], state["fc.weight"])
    # shape mismatches are refused also when not strict
    state["fc.weight"] = torch.zeros(3)
    with pytest.raises(EMAStateError, match=r"fc\.weight"):
        ema.load_state_dict(state, strict=False)


def test_plain_d2go_style_dict_loads_and_keeps_the_step():
    _model, ema = trained()
    plain = {n: t.clone() * 2 if t.is_floating_point() else t.clone() + 7
             for n, t in ema.tensors().items()}
    plain["fc.weight"] = plain["fc.weight"].double()  # another float dtype is converted
    ema.load_state_dict(plain)
    assert ema.step == 5
    got = ema.tensors()
    for n, t in plain.items():
        assert got[n].dtype == ema.state_dict()["ema_state"][n].dtype
        assert torch.equal(got[n], t.to(got[n].dtype)), n


def test_module_prefix_is_aligned():
    _model, ema = trained()
    prefixed = {f"module.{n}": t.clone() + 1 if t.is_floating_point() else t.clone()
                for n, t in ema.tensors().items()}
    ema.load_state_dict({"ema_state": prefixed, "ema_meta": ema.state_dict()["ema_meta"]})
    for n, t in ema.tensors().items():
        assert torch.equal(t, prefixed[f"module.{n}"]), n
    # a partial prefix is not guessed at
    mixed = dict(prefixed)
    mixed["fc.bias"] = mixed.pop("module.fc.bias")
    with pytest.raises(EMAStateError, match="unexpected in the checkpoint"):
        ema.load_state_dict(mixed)


def test_loading_warns_about_another_schedule(caplog):
    _, ema = trained(schedule="tf")
    sd = ema.state_dict()
    _, other = trained(schedule="yolov5")
    with caplog.at_level(logging.WARNING, logger="d2ema.ema"):
        other.load_state_dict(sd)
    assert "schedule" in caplog.text and "tf" in caplog.text


# ---------------------------------------------------------------- wrappers
def test_wrappers_give_plain_names():
    torch.manual_seed(0)
    model = Net()
    names = sorted(EMA(model).tensors())
    assert names == sorted(named(model))
    dp = nn.DataParallel(model)
    compiled = torch.compile(model)  # nothing is compiled until it is called
    assert any(n.startswith("module.") for n, _ in dp.named_parameters())
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    for wrapped in (dp, compiled, nn.DataParallel(compiled)):
        ema = EMA(wrapped, 0.5)
        assert sorted(ema.tensors()) == names
        with torch.no_grad():
            model.fc.bias.add_(1)
        ema.update(wrapped)
        ema.update(model)  # the same module: no re-binding needed
        assert ema.step == 2
        state = ema.state_dict()["ema_state"]
        assert sorted(state) == names


def test_ema_of_wrapped_loads_into_ema_of_plain():
    torch.manual_seed(0)
    model = Net()
    ema_wrapped = EMA(nn.DataParallel(model), 0.5)
    ema_plain = EMA(copy.deepcopy(model), 0.5)
    ema_plain.load_state_dict(ema_wrapped.state_dict())
    assert_same(dict(ema_plain.tensors()), dict(ema_wrapped.tensors()))


# ---------------------------------------------------------------- skip_nonfinite
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_nonfinite(bad, flat, dtype, caplog):
    model, ema = trained(dtype, skip_nonfinite=True, flat=flat)
    before = {n: t.clone() for n, t in ema.tensors().items()}
    good = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="d2ema.ema"):
        for k in range(3):
            with torch.no_grad():
                model.big.weight[k, 3] = bad  # one entry of a large tensor
            ema.update(model)
            assert ema.num_skipped == k + 1
            assert ema.step == 6 + k  # the counter still advances
            assert_same(dict(ema.tensors()), before)
    records = [r for r in caplog.records if r.name == "d2ema.ema"]
    assert len(records) == 1 and "NaN or Inf" in records[0].getMessage()
    # a finite step updates again
    with torch.no_grad():
        model.big.weight.copy_(good["big.weight"])
        model.fc.bias.add_(4)
    ema.update(model)
    assert ema.num_skipped == 3
    got = ema.tensors()
    expected = 0.5 * before["fc.bias"].double() + 0.5 * model.fc.bias.double()
    torch.testing.assert_close(got["fc.bias"].double(), expected, rtol=1e-6, atol=1e-6)


def test_nonfinite_in_small_tensor_or_buffer_is_caught():
    for where in ("fc.bias", "bn.running_var"):
        model, ema = trained(skip_nonfinite=True)
        before = {n: t.clone() for n, t in ema.tensors().items()}
        with torch.no_grad():
            named(model)[where][2] = float("nan")
        ema.update(model)
        assert ema.num_skipped == 1, where
        assert_same(dict(ema.tensors()), before)


@pytest.mark.parametrize("flat", [False, True])
def test_skip_nonfinite_with_empty_tensors(flat):
    """Zero-element tensors (placeholder buffers) have no inf-norm; they must not break it."""
    model = Net()
    model.register_buffer("placeholder", torch.empty(0))
    model.register_buffer("half_placeholder", torch.empty(0, dtype=torch.float16))  # own group
    ema = EMA(model, 0.5, skip_nonfinite=True, flat=flat)
    ema.update(model)
    assert ema.num_skipped == 0
    with torch.no_grad():
        model.fc.bias[1] = float("nan")
    ema.update(model)
    assert ema.num_skipped == 1
    assert not torch.isnan(ema.tensors()["fc.bias"]).any()


def test_without_skip_nonfinite_nan_propagates():
    model, ema = trained()
    with torch.no_grad():
        model.fc.bias[0] = float("nan")
    ema.update(model)
    assert ema.num_skipped == 0
    assert torch.isnan(ema.tensors()["fc.bias"][0])


# ---------------------------------------------------------------- re-binding
@pytest.mark.parametrize("to", [torch.bfloat16, torch.float64])
def test_model_converted_after_building_is_rebound(to):
    model, ema = trained()
    before = {n: t.clone() for n, t in ema.tensors().items()}
    model.to(to)
    with torch.no_grad():
        model.fc.bias.add_(2)
    ema.update(model)
    got = ema.tensors()
    assert got["fc.bias"].dtype == torch.float32  # the EMA keeps its dtype
    expected = 0.5 * before["fc.bias"].double() + 0.5 * model.fc.bias.double()
    torch.testing.assert_close(got["fc.bias"].double(), expected, rtol=1e-6, atol=1e-6)
    # swapping into the converted model works and restores it
    after = snapshot(model)
    with ema.swapped(model):
        assert model.fc.bias.dtype == to
        assert torch.equal(model.fc.bias, got["fc.bias"].to(to))
    assert_same(snapshot(model), after)


def test_replaced_buffer_is_followed():
    model, ema = trained()
    model.bn.running_mean = torch.full((6,), 4.0)  # a new tensor object
    ema_before = ema.tensors()["bn.running_mean"].clone()
    ema.update(model)
    expected = 0.5 * ema_before + 0.5 * 4.0
    torch.testing.assert_close(ema.tensors()["bn.running_mean"], expected)


def test_replaced_tensor_with_wrong_shape_raises_clearly():
    model, ema = trained()
    model.bn.running_mean = torch.zeros(7)
    step = ema.step
    with pytest.raises(EMAStateError, match=r"bn.running_mean: shape \(7,\)"):
        ema.update(model)
    assert ema.step == step  # a refused update changes nothing, not even the counter


def test_replaced_middle_tensor_is_followed():
    model, ema = trained()
    model.bn.running_var = torch.full((6,), 4.0)  # a re-registration, noticed by itself
    ema_before = ema.tensors()["bn.running_var"].clone()
    ema.update(model)
    expected = 0.5 * ema_before + 0.5 * 4.0
    torch.testing.assert_close(ema.tensors()["bn.running_var"], expected)


def test_data_assigned_to_a_middle_tensor_is_followed_after_rebind():
    model, ema = trained()
    model.bn.running_var.data = torch.full((6,), 4.0)  # not a registration: needs rebind()
    ema.rebind(model)
    ema_before = ema.tensors()["bn.running_var"].clone()
    ema.update(model)
    torch.testing.assert_close(ema.tensors()["bn.running_var"], 0.5 * ema_before + 0.5 * 4.0)


def test_another_model_is_checked():
    model, ema = trained()
    other = nn.Linear(3, 3)
    with pytest.raises(EMAStateError, match="does not fit"):
        ema.update(other)
    with pytest.raises(EMAStateError, match="does not fit"), ema.swapped(other):
        pass
    # a structurally identical copy is accepted
    twin = copy.deepcopy(model)
    with ema.swapped(twin):
        assert torch.equal(twin.fc.bias, ema.tensors()["fc.bias"])
