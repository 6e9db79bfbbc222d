"""Decay schedules: values against the formulas written out here, validation, serialisation."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from d2ema import EMA, SCHEDULES, Schedule, make_schedule
from d2ema.schedules import Constant, Power, SigmaRel, TFWarmup, YOLOv5Ramp, sigma_rel_to_gamma

NS = [1, 2, 3, 5, 10, 37, 100, 1000, 2000, 12345, 10**6]


def width(gamma: float) -> float:
    """Relative standard deviation of the power-function EMA profile (Karras et al. 2024, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# (name, params, reference formula d(n) written independently of the implementation)
CASES = [
    ("constant", {"decay": 0.9998}, lambda n: 0.9998),
    ("constant", {"decay": 0.0}, lambda n: 0.0),
    ("constant", {"decay": 1.0}, lambda n: 1.0),
    ("yolov5", {"decay": 0.9999}, lambda n: 0.9999 * (1 - math.exp(-n / 2000))),
    ("yolov5", {"decay": 0.99, "tau": 50.0}, lambda n: 0.99 * (1 - math.exp(-n / 50))),
    ("tf", {"decay": 0.999}, lambda n: min(0.999, (1 + n) / (10 + n))),
    ("tf", {"decay": 0.9, "warmup_factor": 3.0}, lambda n: min(0.9, (1 + n) / (3 + n))),
    ("power", {"decay": 0.9999}, lambda n: min(0.9999, max(0.0, 1 - (1 + n) ** (-2 / 3)))),
    (
        "power",
        {"decay": 0.999, "inv_gamma": 10.0, "power": 0.75, "min_decay": 0.3},
        lambda n: min(0.999, max(0.3, 1 - (1 + n / 10) ** -0.75)),
    ),
]


@pytest.mark.parametrize(("name", "params", "formula"), CASES)
def test_schedule_values_match_formula(name, params, formula):
    sched = make_schedule(name, **params)
    assert isinstance(sched, SCHEDULES[name])
    for n in NS:
        got = sched(n)
        assert isinstance(got, float)
        assert got == pytest.approx(formula(n), rel=1e-14, abs=1e-15), n
        assert 0.0 <= got <= 1.0


def test_default_parameters():
    assert YOLOv5Ramp().tau == 2000.0
    assert TFWarmup().warmup_factor == 10.0
    p = Power()
    assert (p.inv_gamma, p.power, p.min_decay) == (1.0, 2.0 / 3.0, 0.0)
    assert SigmaRel().sigma_rel == 0.05
    assert Constant().decay == 0.9998
    # the module docstring's example
    assert round(make_schedule("yolov5", decay=0.9999, tau=2000)(2000), 6) == 0.632057


def test_ramps_are_monotone_and_reach_the_ceiling():
    for sched in (YOLOv5Ramp(0.999, tau=100.0), TFWarmup(0.999), Power(0.999), SigmaRel()):
        values = [sched(n) for n in range(1, 5000)]
        assert all(a <= b for a, b in itertools.pairwise(values)), sched
    assert YOLOv5Ramp(0.999, tau=100.0)(10**5) == pytest.approx(0.999)
    assert TFWarmup(0.999)(10**5) == 0.999
    assert Power(0.999)(10**8) == 0.999
    assert Power(0.9, min_decay=0.5)(1) == 0.5  # 1 - 2**(-2/3) = 0.37 is clamped up


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28])
def test_sigma_rel_gamma_solves_the_width_equation(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert width(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # the equation as stated, squared form
    lhs = sigma_rel**2
    rhs = (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_sigma_rel_known_values():
    # EDM2 (Karras et al. 2024) pairs sigma_rel 0.05 with gamma 16.97 and 0.10 with 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    # narrower profile <=> larger exponent
    gammas = [sigma_rel_to_gamma(s) for s in (0.02, 0.05, 0.1, 0.2, 0.28)]
    assert gammas == sorted(gammas, reverse=True)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_sigma_rel_schedule_values(sigma_rel):
    sched = make_schedule("sigma_rel", sigma_rel=sigma_rel)
    gamma = sched.gamma
    assert width(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert sched(1) == 0.0  # the first average is a copy of the weights
    for n in NS[1:]:
        assert sched(n) == pytest.approx((1 - 1 / n) ** (gamma + 1), rel=1e-14)
    # decay is not used
    assert make_schedule("sigma_rel", decay=0.5, sigma_rel=sigma_rel)(100) == sched(100)


def test_sigma_rel_profile_is_a_power_function():
    """The product of decays telescopes: step t weighs (1 - b_t) * (t / N) ** (gamma + 1)."""
    sched = SigmaRel(sigma_rel=0.1)
    g1 = sched.gamma + 1
    n_steps = 300
    weights = [0.0] * (n_steps + 1)  # weight of step t in the average after n_steps
    for n in range(1, n_steps + 1):
        d = sched(n)
        weights = [w * d for w in weights]
        weights[n] += 1 - d
    assert sum(weights) == pytest.approx(1.0, rel=1e-12)
    for t in (1, 5, 20, 150, 299, 300):
        expected = (1 - (1 - 1 / t) ** g1) * (t / n_steps) ** g1
        assert weights[t] == pytest.approx(expected, rel=1e-9)
    # late in training the weights grow like t ** gamma
    ratio = weights[150] / weights[300]
    assert ratio == pytest.approx(0.5**sched.gamma, rel=0.05)


@pytest.mark.parametrize("bad", [0.0, -0.1, 12**-0.5, 0.3, 1.0, float("nan")])
def test_sigma_rel_out_of_range(bad):
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="sigma_rel"):
        make_schedule("sigma_rel", sigma_rel=bad)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        make_schedule("cosine")
    message = str(info.value)
    assert "'cosine'" in message
    for name in ("constant", "yolov5", "tf", "power", "sigma_rel"):
        assert name in message
    assert set(SCHEDULES) == {"constant", "yolov5", "tf", "power", "sigma_rel"}


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        make_schedule("yolov5", decay=0.999, tua=100)
    message = str(info.value)
    assert "tua" in message and "tau" in message and "decay" in message
    with pytest.raises(ValueError, match="sigma_rel"):
        make_schedule("constant", sigma_rel=0.1)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("yolov5", {"tau": 0.0}, "tau"),
        ("yolov5", {"tau": -5.0}, "tau"),
        ("tf", {"warmup_factor": 0.5}, "warmup_factor"),
        ("power", {"inv_gamma": 0.0}, "inv_gamma"),
        ("power", {"power": -1.0}, "power"),
        ("power", {"decay": 0.9, "min_decay": 0.95}, "min_decay"),
        ("power", {"min_decay": -0.1}, "min_decay"),
    ],
)
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(name, **params)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("decay", [-0.1, 1.0001, float("nan"), float("inf"), "0.9", None])
def test_decay_out_of_range(name, decay):
    params = {"decay": decay}
    with pytest.raises(ValueError, match="decay"):
        # decay=None in make_schedule means "the default"; pass it to the class directly
        SCHEDULES[name](**params) if decay is None else make_schedule(name, **params)


@pytest.mark.parametrize("decay", [0.0, 1.0, 0, 1])
def test_decay_bounds_are_allowed(decay):
    assert make_schedule("constant", decay)(7) == decay


@pytest.mark.parametrize(
    "sched",
    [
        Constant(0.97),
        YOLOv5Ramp(0.9999, tau=123.0),
        TFWarmup(0.999, warmup_factor=4.0),
        Power(0.9995, inv_gamma=3.0, power=0.8, min_decay=0.1),
        SigmaRel(sigma_rel=0.12),
    ],
)
def test_to_dict_round_trip(sched):
    data = sched.to_dict()
    assert data["name"] == sched.name
    assert json.loads(json.dumps(data)) == data  # plain data, safe in any checkpoint
    rebuilt = make_schedule(data)
    assert rebuilt == sched and type(rebuilt) is type(sched)
    assert rebuilt.to_dict() == data
    assert [rebuilt(n) for n in NS] == [sched(n) for n in NS]
    params = {k: v for k, v in data.items() if k != "name"}
    assert make_schedule(sched.name, **params).to_dict() == data


def test_make_schedule_passes_through_and_overrides():
    sched = YOLOv5Ramp(0.99, tau=10.0)
    assert make_schedule(sched) is sched
    assert make_schedule(sched, decay=0.5) is sched  # a built schedule wins over decay

    def fn(n):
        return 0.5

    assert make_schedule(fn) is fn
    # a saved dict: keyword arguments override its fields
    assert make_schedule({"name": "yolov5", "decay": 0.99, "tau": 10.0}, tau=20.0) == YOLOv5Ramp(
        0.99, tau=20.0
    )
    assert make_schedule({"name": "tf", "decay": 0.99}, decay=0.9) == TFWarmup(0.9)
    with pytest.raises(ValueError, match="unknown"):
        make_schedule({"decay": 0.9})  # no name
    assert isinstance(make_schedule(), Constant)


def test_schedules_are_frozen():
    sched = YOLOv5Ramp(0.99)
    with pytest.raises(AttributeError):
        sched.tau = 1.0  # type: ignore[misc]
    assert isinstance(sched, Schedule)


# ---------------------------------------------------------------- how EMA applies a schedule
def _ema(**kwargs) -> EMA:
    return EMA(nn.Linear(2, 2), **kwargs)


def test_decay_at_uses_start_and_every():
    ema = _ema(decay=0.99, schedule="yolov5", schedule_params={"tau": 7.0}, every=3, start=5)
    for step in range(-2, 6):
        assert ema.decay_at(step) == 0.0
    for step in (6, 9, 20, 100):
        n = step - 5
        assert ema.decay_at(step) == pytest.approx((0.99 * (1 - math.exp(-n / 7))) ** 3, 1e-14)


def test_callable_schedule_and_its_validation():
    ema = _ema(schedule=lambda n: 1 - 1 / (n + 1))
    assert ema.decay_at(3) == pytest.approx(0.75)
    model = nn.Linear(2, 2)
    for bad in (1.5, -0.25, float("nan")):
        ema = EMA(model, schedule=lambda n, bad=bad: bad)
        with pytest.raises(ValueError, match="schedule returned decay"):
            ema.update(model)


def test_ema_schedule_params_and_meta():
    ema = _ema(decay=0.999, schedule="tf", schedule_params={"warmup_factor": 5.0})
    assert ema.schedule == TFWarmup(0.999, warmup_factor=5.0)
    assert ema.state_dict()["ema_meta"]["schedule"] == {
        "name": "tf", "decay": 0.999, "warmup_factor": 5.0,
    }
    with pytest.raises(ValueError, match="cosine"):
        _ema(schedule="cosine")
    with pytest.raises(ValueError, match="decay"):
        _ema(decay=1.5)
    with pytest.raises(ValueError, match="tau"):
        _ema(schedule="yolov5", schedule_params={"tau": 0})
    assert torch.is_tensor(next(iter(_ema().tensors().values())))
