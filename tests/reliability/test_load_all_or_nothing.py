"""Property: a state dict that ``EMA.load_state_dict`` refuses leaves the EMA byte-identical.

Hypothesis builds states that would change every tensor, the step and the skip count if they
loaded, spoils them with one to three random faults (a meta, sparse, NaN/Inf, misshapen or
mistyped tensor anywhere in the dict order; a metadata value of the wrong type or range) and
shuffles their order, so that a fault after valid entries would catch a write-then-raise.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import fingerprint, loadable_but_different
from torch import nn

from d2ema import EMA, EMAStateError


def _tensor_fault(fn):
    def apply(state, name):
        state["ema_state"][name] = fn(state["ema_state"][name])
    return apply


def _meta_fault(key, value):
    def apply(state, name):
        state["ema_meta"][key] = value
    return apply


def _poke(value):
    def fn(t):
        t = t.clone().float() if not t.is_floating_point() else t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return fn


FAULTS = [
    _tensor_fault(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")),
    _tensor_fault(lambda t: t.float().to_sparse() if t.dim() else t.float().reshape(1)),
    _tensor_fault(_poke(float("nan"))),
    _tensor_fault(_poke(float("inf"))),
    _tensor_fault(_poke(float("-inf"))),
    _tensor_fault(lambda t: torch.zeros(*t.shape, 2)),
    _tensor_fault(lambda t: t.to(torch.int64) if t.is_floating_point() else t.double() + 0.5),
    _tensor_fault(lambda t: t.tolist()),
    lambda state, name: state["ema_state"].pop(name),
    lambda state, name: state["ema_state"].__setitem__(name + ".extra", torch.zeros(1)),
    *[_meta_fault("step", v) for v in (-1, "3", 1.5, True, None)],
    *[_meta_fault("num_skipped", v) for v in (-2, "0")],
    *[_meta_fault("every", v) for v in (0, -3, "2", 1.0)],
    *[_meta_fault("start", v) for v in (-1, 2.5)],
    *[_meta_fault("format_version", v) for v in (-1, 99, "1", False)],
    *[_meta_fault("schedule", v) for v in (5, torch.ones(2), [1], {"decay": 0.5})],
    *[_meta_fault("master_dtype", v) for v in (5, torch.float32)],
    *[_meta_fault("nonfinite_step", v) for v in (-1, "x")],
]

_MODEL = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
_EMA = EMA(_MODEL, decay=0.5)
_NAMES = sorted(_EMA.tensors())


def _loadable_but_different() -> dict:
    return loadable_but_different(_EMA)


def test_the_unspoilt_state_would_change_everything():
    ema = EMA(_MODEL, decay=0.5)
    before = fingerprint(_MODEL, ema)
    ema.load_state_dict(_loadable_but_different())
    after = fingerprint(_MODEL, ema)
    assert all(after[0][n] != before[0][n] for n in _NAMES) and after[1:3] != before[1:3]


@settings(max_examples=120, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    faults=st.lists(st.sampled_from(range(len(FAULTS))), min_size=1, max_size=3),
    targets=st.lists(st.sampled_from(_NAMES), min_size=3, max_size=3),
    order=st.randoms(use_true_random=False),
)
def test_refused_load_leaves_ema_byte_identical(faults, targets, order, tally):
    state = _loadable_but_different()
    for fault, name in zip(faults, targets):
        if name in state["ema_state"]:
            FAULTS[fault](state, name)
    items = list(state["ema_state"].items())
    order.shuffle(items)
    state["ema_state"] = dict(items)
    before = fingerprint(_MODEL, _EMA)
    tally["bad_inputs"] += 1
    with pytest.raises(EMAStateError, match="the EMA is unchanged"):
        _EMA.load_state_dict(state)
    assert fingerprint(_MODEL, _EMA) == before
    tally["refused_cleanly"] += 1


def test_every_fault_alone_is_refused():
    """No fault is accidentally loadable on its own."""
    rng = random.Random(0)
    for fault in FAULTS:
        state = _loadable_but_different()
        fault(state, rng.choice(_NAMES))
        before = fingerprint(_MODEL, _EMA)
        with pytest.raises(EMAStateError):
            _EMA.load_state_dict(state)
        assert fingerprint(_MODEL, _EMA) == before
