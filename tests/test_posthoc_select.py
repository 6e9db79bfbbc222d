"""Choosing the EMA length by a score (:func:`d2ema.posthoc.select`, :meth:`PostHocEMA.select`):
a score built to peak at a known length finds it, the returned weights are that length's
reconstruction, ties go to the preferred length, and the arguments are checked."""

from __future__ import annotations

import math

import pytest
import torch
from test_posthoc import Net, power_ref, train, weights

from d2ema.posthoc import (
    DEFAULT_SIGMA_RELS,
    PostHocEMA,
    PostHocError,
    Target,
    reconstruct,
    select,
)

SWEEP = (0.03, 0.05, 0.07, 0.1, 0.15)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """600 steps of a drifting random walk; post-hoc EMAs 0.05/0.10 every 10 steps; the 0.07
    EMA tracked directly by the test's own float64 loop (the score's peak)."""
    folder = tmp_path_factory.mktemp("sel") / "snaps"
    torch.manual_seed(0)
    model = Net()
    ph = PostHocEMA(model, folder, snapshot_every=10, background=False)
    peak = power_ref(0.07)
    train(model, 600, ph, [peak])
    return ph, model, peak.avg


def closeness(tensors, reference) -> float:
    """Minus the relative distance of the float tensors to ``reference`` (higher: closer)."""
    num = sum(float((tensors[n].double() - r).square().sum())
              for n, r in reference.items() if r.is_floating_point())
    den = sum(float(r.square().sum()) for r in reference.values() if r.is_floating_point())
    return -math.sqrt(num / den)


def test_select_finds_the_peak_and_returns_its_weights(run):
    ph, _, peak = run
    calls = []

    def score(tensors):
        calls.append(tensors)
        return closeness(tensors, peak)

    sel = ph.select(score, SWEEP)
    assert sel.sigma_rel == 0.07 and sel.target == Target("sigma_rel", 0.07)
    assert list(sel.scores) == [f"sigma_rel {s:g}" for s in SWEEP] and len(calls) == len(SWEEP)
    assert sel.by_sigma_rel == {s: sel.scores[f"sigma_rel {s:g}"] for s in SWEEP}
    assert sel.score == max(sel.scores.values()) > -1e-4  # rebuilt 0.07 ~ tracked 0.07
    assert sorted(sel.scores.values())[-2] < 10 * sel.score  # the others are clearly worse
    ref = next(reconstruct(ph.folder, [Target("sigma_rel", 0.07)]))
    assert set(sel.tensors) == set(ref.tensors)
    for name, value in ref.tensors.items():
        assert torch.equal(sel.tensors[name], value), name


def test_select_with_a_model_scores_a_copy(run):
    ph, model, peak = run
    before = {n: t.clone() for n, t in weights(model).items()}
    seen = set()

    def score(m):
        seen.add(id(m))
        assert m is not model
        return closeness(weights(m), peak)

    sel = ph.select(score, SWEEP, model=model)
    assert sel.sigma_rel == 0.07 and len(seen) == 1
    assert all(torch.equal(before[n], t) for n, t in weights(model).items())


def test_ties_go_to_the_preferred_length_else_the_first(run):
    ph, _, _ = run
    assert ph.select(lambda t: 1.0, SWEEP, prefer=0.12).sigma_rel == 0.1
    assert ph.select(lambda t: 1.0, SWEEP, prefer=0.02).sigma_rel == 0.03
    assert ph.select(lambda t: 1.0, SWEEP).sigma_rel == 0.03
    nan_first = iter([math.nan, 0.0, 0.0, 0.0, 0.0])
    assert ph.select(lambda t: next(nan_first), SWEEP).sigma_rel == 0.05  # NaN is the worst


def test_default_sweep_and_named_lengths_out_of_range(run):
    ph, _, peak = run
    sel = select(ph.folder, lambda rec: closeness(rec.tensors, peak))
    assert list(sel.scores) == [f"sigma_rel {s:g}" for s in DEFAULT_SIGMA_RELS]  # K = T/60
    assert sel.sigma_rel == 0.07
    with pytest.raises(PostHocError, match="outside what the snapshots can represent"):
        ph.select(lambda t: 0.0, (0.004, 0.07))
    with pytest.raises(PostHocError, match="outside"):
        ph.select(lambda t: 0.0, (0.5,))


def test_docs_block_posthoc_select_loop(run):
    """docs/ema-length.md: PostHocEMA.select with a model, then the best loaded into it."""
    import copy

    from _doc_blocks import doc_block

    from d2ema.posthoc import load_tensors

    ph, model, peak = run
    mine = copy.deepcopy(model)
    ns = {"ph": ph, "model": mine, "load_tensors": load_tensors,
          "validate": lambda m: closeness(weights(m), peak), "print": lambda *a: None}
    exec(compile(doc_block("posthoc-select-loop"), "posthoc-select-loop", "exec"), ns)
    assert ns["best"].sigma_rel == 0.07
    rebuilt = next(reconstruct(ph.folder, [Target("sigma_rel", 0.07)])).tensors
    assert all(torch.equal(t, rebuilt[n]) for n, t in weights(mine).items())
