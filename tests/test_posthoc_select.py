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
    assert list(sel.scores) == [Target("sigma_rel", s) for s in SWEEP] and len(calls) == len(SWEEP)
    assert sel.by_sigma_rel == {s: sel.scores[Target("sigma_rel", s)] for s in SWEEP}
    assert sel.scores[0.07] == sel.scores["sigma_rel 0.07"] == sel.score  # value or label too
    assert 0.07 in sel.scores and 0.08 not in sel.scores and sel.scores.get(0.08) is None
    assert sel.raw_score is None and not sel.raw_won and sel.chosen == "sigma_rel 0.07"
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
    assert sel.raw_score is not None and sel.raw_score < sel.score and not sel.raw_won


def test_select_hands_back_the_raw_weights_when_they_beat_every_length(run):
    """A score that peaks at the raw weights: the selection says raw won and its tensors are the
    model's own; the same call with the raw weights left out hands back the best EMA."""
    ph, model, _ = run
    raw = {n: t.clone() for n, t in weights(model).items()}
    score = lambda m: closeness(weights(m), raw)  # noqa: E731
    sel = ph.select(score, SWEEP, model=model)
    assert sel.raw_won and sel.chosen == "raw weights" and sel.raw_score == 0.0
    assert sel.score < 0.0 and sel.sigma_rel == 0.03  # the shortest length is the closest EMA
    for name, value in raw.items():
        assert torch.equal(sel.tensors[name], value), name
    without = ph.select(score, SWEEP, model=model, include_raw=False)
    assert not without.raw_won and without.raw_score is None and without.sigma_rel == 0.03


def test_select_raw_score_and_tensors_go_together(run):
    ph = run[0]
    with pytest.raises(PostHocError, match="together"):
        select(ph.folder, lambda rec: 0.0, [Target("sigma_rel", 0.05)], raw_score=1.0)
    nan = select(ph.folder, lambda rec: 0.0, [Target("sigma_rel", 0.05)],
                 raw_score=math.nan, raw_tensors={})
    assert not nan.raw_won  # NaN never wins


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
    assert list(sel.scores) == [Target("sigma_rel", s) for s in DEFAULT_SIGMA_RELS]  # K = T/60
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
