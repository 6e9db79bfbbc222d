"""Post-hoc EMA core: the closed forms against quadrature, and reconstructions from snapshots
against EMAs tracked directly by an independent float64 loop (one Python step per tensor, its
own gamma by bisection, its own beta formula), on a synthetic weight trajectory."""

from __future__ import annotations

import copy
import json
import math
import weakref

import pytest
import torch
from test_ema_reference import gamma_for as gamma_ref  # bisection, shares no code
from torch import nn

from d2ema import EMA
from d2ema.posthoc import (
    PostHocEMA,
    PostHocError,
    Target,
    check_fit,
    profile_dot,
    reconstruct,
    representable_range,
    solve,
)
from d2ema.posthoc import rebuild as rec_mod
from d2ema.posthoc import snapshots as snap_mod
from d2ema.posthoc.snapshots import read_index

T = 1200


# ---------------------------------------------------------------- independent references
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**{n: p.detach() for n, p in model.named_parameters()}, **dict(model.named_buffers())}


def move(model: nn.Module, gen: torch.Generator, step: int) -> None:
    """One 'training step': a drifting random walk of every float tensor; counters count."""
    with torch.no_grad():
        for t in weights(model).values():
            if t.is_floating_point():
                t.add_(0.02 * torch.randn(t.shape, generator=gen) + 0.001 * math.sin(step / 90))
            else:
                t.add_(1)


class RefEMA:
    """``e = beta e + (1 - beta) w`` per tensor in float64; ``beta(t)`` given by the test."""

    def __init__(self, beta, every: int = 1):
        self.beta, self.every, self.t, self.avg = beta, every, 0, {}

    def update(self, model: nn.Module) -> None:
        self.t += 1
        if self.t % self.every:
            return
        b = self.beta(self.t)
        for name, w in weights(model).items():
            if w.is_floating_point():
                prev = self.avg.get(name, torch.zeros_like(w, dtype=torch.float64))
                self.avg[name] = b * prev + (1 - b) * w.double()
            else:
                self.avg[name] = w.clone()


def power_ref(sigma_rel: float, every: int = 1) -> RefEMA:
    g = gamma_ref(sigma_rel)
    return RefEMA(lambda t: (1 - every / t) ** (g + 1), every)


def rel_err(rec: dict, ref: dict, raw: dict) -> tuple[float, float]:
    """(||rec - ref|| / ||ref||, ||rec - ref|| / ||ref - raw||) over the float tensors."""
    num = den = lag = 0.0
    for name, r in ref.items():
        if not r.is_floating_point():
            assert torch.equal(rec[name], r), name
            continue
        num += float((rec[name].double() - r).square().sum())
        den += float(r.square().sum())
        lag += float((r - raw[name].double()).square().sum())
    return math.sqrt(num / den), math.sqrt(num / lag)


def train(model, steps, ph: PostHocEMA | None, refs=(), gen=None, start=1):
    gen = gen or torch.Generator().manual_seed(0)
    for step in range(start, steps + 1):
        move(model, gen, step)
        if ph is not None:
            ph.update(model)
        for r in refs:
            r.update(model)
    return gen


# ---------------------------------------------------------------- closed forms
def test_profile_dot_matches_quadrature():
    def profile(tau, t, g):
        return (g + 1) * tau**g / t ** (g + 1)

    for (ta, ga, tb, gb) in [(1.0, 6.94, 0.5, 16.97), (0.3, 2.0, 0.9, 0.0), (0.7, 40.0, 0.7, 1.5)]:
        tau = torch.linspace(0, min(ta, tb), 2_000_001, dtype=torch.float64)  # both non-zero
        numeric = torch.trapezoid(profile(tau, ta, ga) * profile(tau, tb, gb), tau)
        assert float(profile_dot(ta, ga, tb, gb)) == pytest.approx(float(numeric), rel=1e-6)
        assert float(profile_dot(tb, gb, ta, ga)) == float(profile_dot(ta, ga, tb, gb))
    # no overflow for steep profiles far apart
    assert math.isfinite(float(profile_dot(1.0, 300.0, 1e-3, 300.0)))


def test_decay_target_matches_quadrature_and_power_target_is_exact():
    """A target equal to a stored EMA gets that snapshot alone; a decay target's products
    match numerical integration of the exponential profile (checked through the misfit)."""
    times, gammas = [50.0, 100.0, 50.0, 100.0], [gamma_ref(0.05)] * 2 + [gamma_ref(0.1)] * 2
    fit = solve(times, gammas, [Target("sigma_rel", 0.1)])[0]
    assert fit.weights == pytest.approx([0, 0, 0, 1], abs=1e-9) and fit.residual < 1e-6
    d = 0.97
    fit = solve(times, gammas, [Target("decay", d)])[0]
    tau = torch.linspace(0, 100, 1_000_001, dtype=torch.float64)[1:]
    lam = -math.log(d)
    q = lam * torch.exp(-lam * (100 - tau))
    mix = sum(x * torch.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0 * tau)
              for x, t, g in zip(fit.weights, times, gammas))
    misfit = math.sqrt(float(torch.trapezoid((mix - q) ** 2, tau) / torch.trapezoid(q * q, tau)))
    assert fit.residual == pytest.approx(misfit, rel=1e-4)
    assert fit.init_share == pytest.approx(d**100)


def test_solver_refusals():
    g = gamma_ref(0.05)
    with pytest.raises(PostHocError, match="twice"):
        solve([10, 10], [g, g], [Target("sigma_rel", 0.05)])
    with pytest.raises(PostHocError, match="no snapshot at time 15"):
        solve([10, 20], [g, g], [Target("sigma_rel", 0.05)], at=15)
    with pytest.raises(PostHocError, match="outside"):
        Target("sigma_rel", 0.3)
    with pytest.raises(PostHocError, match="outside"):
        Target("decay", 1.0)
    sparse = [250, 500, 750, 1000] * 2
    gammas = [gamma_ref(0.05)] * 4 + [gamma_ref(0.1)] * 4
    fit = solve(sparse, gammas, [Target("sigma_rel", 0.01)])[0]
    span = representable_range(sparse, gammas)
    assert span is not None and span[0] > 0.01
    with pytest.raises(PostHocError, match="outside what the snapshots can represent"):
        check_fit(fit, representable=span)
    fit = solve(sparse, gammas, [Target("decay", 0.999)])[0]  # 0.999**1000 = 37% initial
    with pytest.raises(PostHocError, match=r"36\.8%.*at most 0\.9954"):
        check_fit(fit)


# ---------------------------------------------------------------- reconstruction
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One synthetic run: post-hoc EMAs 0.05/0.10 snapshotted every 10 steps, and the
    references tracked directly (power 0.03/0.07/0.15, classic 0.99)."""
    folder = tmp_path_factory.mktemp("run") / "snaps"
    torch.manual_seed(0)
    model = Net()
    ph = PostHocEMA(model, folder, snapshot_every=10)
    refs = {0.03: power_ref(0.03), 0.07: power_ref(0.07), 0.15: power_ref(0.15)}
    classic = RefEMA(lambda t: 0.99)
    classic.avg = {n: w.double().clone() for n, w in weights(model).items()}
    train(model, T, ph, [*refs.values(), classic])
    ph.close()
    return folder, refs, classic, weights(model)


def thinned(folder, tmp_path, every: int):
    """A copy of the series keeping the snapshots whose time is a multiple of ``every``."""
    entries = [e for e in read_index(folder) if e.t % every == 0]
    out = tmp_path / f"k{every}"
    out.mkdir()
    for e in entries:
        (out / e.file).hardlink_to(folder / e.file)  # a link leading out is refused
    (out / "index.json").write_text(json.dumps({
        "format": snap_mod.FORMAT, "version": 1,
        "snapshots": [snap_mod.dataclasses.asdict(e) for e in entries]}))
    return out


def test_untracked_sigma_rel_matches_direct_ema_with_error_from_K(run, tmp_path):
    """Error relative to the EMA's distance from the raw weights is bounded by the profile
    misfit, which the solver computes from K alone; it shrinks steeply as K shrinks."""
    folder, refs, _, raw = run
    table = []
    for K in (10, 40, 120):
        src = thinned(folder, tmp_path, K) if K != 10 else folder
        recs = list(reconstruct(src, [Target("sigma_rel", s) for s in refs]))
        for rec, (s, ref) in zip(recs, refs.items()):
            err, err_lag = rel_err(rec.tensors, ref.avg, raw)
            table.append((K, s, rec.fit.residual, err, err_lag))
            assert err_lag <= rec.fit.residual + 2e-6, (K, s, err_lag, rec.fit.residual)
    print("\nK  sigma_rel  misfit  err/||ema||  err/||ema-raw||")
    for row in table:
        print("{:3d} {:5.2f} {:9.2e} {:9.2e} {:9.2e}".format(*row))
    err07 = {K: e for K, s, _, _, e in table if s == 0.07}
    assert err07[10] < 1e-4 and err07[10] < err07[40] < err07[120]


def test_classic_decay_target_matches_direct_classic_ema(run):
    folder, _, classic, raw = run
    rec = next(reconstruct(folder, [Target("decay", 0.99)]))
    err, err_lag = rel_err(rec.tensors, classic.avg, raw)
    assert rec.fit.init_share < 1e-5
    assert err_lag < 5e-3 and err < 1e-3
    far = next(reconstruct(folder, [Target("sigma_rel", 0.05)]))  # the stored one
    assert rel_err(far.tensors, classic.avg, raw)[1] > 20 * err_lag


def test_earlier_step_and_buffers(run):
    """Reconstruct at an earlier snapshot: only snapshots up to it are used; float buffers
    are mixed like parameters, the integer counter is the latest snapshot's."""
    folder, _, _, _ = run
    torch.manual_seed(0)
    model = Net()
    ref = power_ref(0.07)
    train(model, 600, None, [ref])
    rec = next(reconstruct(folder, [Target("sigma_rel", 0.07)], step=600))
    assert rec.step == 600 and rec.fit.used == 120
    assert rel_err(rec.tensors, ref.avg, weights(model))[1] < 1e-4
    assert int(rec.tensors["bn.num_batches_tracked"]) == 600
    with pytest.raises(PostHocError, match="no snapshot at step 605"):
        next(reconstruct(folder, [Target("sigma_rel", 0.07)], step=605))


def test_every_U_path(tmp_path):
    """EMAs updated every U steps use (1 - U/t)**(g+1): matches the reference loop exactly,
    and the reconstruction matches a directly tracked every-U EMA."""
    U = 4
    torch.manual_seed(1)
    model = Net()
    ph = PostHocEMA(model, tmp_path, snapshot_every=20, every=U)
    direct = EMA(model, schedule="sigma_rel", schedule_params={"sigma_rel": 0.1}, every=U)
    refs = {0.07: power_ref(0.07, U), 0.1: power_ref(0.1, U)}
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 801):
        move(model, gen, step)
        ph.update(model)
        direct.update(model)
        for r in refs.values():
            r.update(model)
    ph.close()
    mine = direct.tensors()
    for name, r in refs[0.1].avg.items():
        torch.testing.assert_close(mine[name].to(r.dtype), r, rtol=1e-5, atol=1e-6)
    rec = next(ph.reconstruct([Target("sigma_rel", 0.07)]))
    assert rel_err(rec.tensors, refs[0.07].avg, weights(model))[1] <= rec.fit.residual
    assert rec.fit.residual < 1e-3


def test_resume_mid_series_equals_uninterrupted(tmp_path):
    """Kill after step 530 with the last checkpoint at 400: the resumed run drops the
    snapshots after 400, writes them again, and ends with the same series and result."""
    def fresh():
        torch.manual_seed(2)
        return Net()

    model = fresh()
    full = PostHocEMA(model, tmp_path / "full", snapshot_every=25, background=False)
    train(model, 800, full)
    full.close()

    model = fresh()
    ph = PostHocEMA(model, tmp_path / "resumed", snapshot_every=25)
    gen = train(model, 400, ph)
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "posthoc": copy.deepcopy(ph.state_dict()), "gen": gen.get_state()}  # as saved
    train(model, 530, ph, gen=gen, start=401)  # ... killed here
    ph.close()
    assert max(e.step for e in read_index(tmp_path / "resumed")) == 525

    model = fresh()
    model.load_state_dict(ckpt["model"])
    ph = PostHocEMA(model, tmp_path / "resumed", snapshot_every=25)
    ph.load_state_dict(ckpt["posthoc"])
    gen = torch.Generator()
    gen.set_state(ckpt["gen"])
    train(model, 800, ph, gen=gen, start=401)
    ph.close()
    a, b = read_index(tmp_path / "full"), read_index(tmp_path / "resumed")
    key = [(e.t, e.sigma_rel, e.step) for e in a]
    assert key == [(e.t, e.sigma_rel, e.step) for e in b] and len(set(key)) == len(key) == 64
    ra = next(reconstruct(tmp_path / "full", [Target("sigma_rel", 0.07)]))
    rb = next(reconstruct(tmp_path / "resumed", [Target("sigma_rel", 0.07)]))
    for name, t in ra.tensors.items():
        assert torch.equal(t, rb.tensors[name]), name


def test_state_dict_waits_for_the_pending_snapshot(tmp_path, monkeypatch):
    """What a checkpoint saves resumes the series at its step: the snapshots up to that step
    are on disk before state_dict() returns, however slow the background write."""
    import threading

    gate = threading.Event()
    real_save = snap_mod.SnapshotWriter._save

    def gated_save(self, jobs):
        gate.wait(10)
        real_save(self, jobs)

    monkeypatch.setattr(snap_mod.SnapshotWriter, "_save", gated_save)
    model = Net()
    ph = PostHocEMA(model, tmp_path / "snaps", snapshot_every=2)
    train(model, 3, ph)
    assert not (tmp_path / "snaps" / "index.json").exists()  # step 2's write is still pending
    threading.Timer(0.2, gate.set).start()
    state = ph.state_dict()
    assert [e.step for e in read_index(tmp_path / "snaps")] == [2, 2]
    assert all(s["ema_meta"]["step"] == 3 for s in state.values())
    ph.close()


def test_streaming_holds_one_snapshot_at_a_time(run, monkeypatch):
    folder, _, _, _ = run
    alive: list[weakref.ref] = []
    load = rec_mod._load

    def tracked(folder, entry):
        assert all(r() is None for r in alive), "an earlier snapshot is still in memory"
        data = load(folder, entry)
        alive.append(weakref.ref(next(iter(data["tensors"].values()))))
        return data

    monkeypatch.setattr(rec_mod, "_load", tracked)
    targets = [Target("sigma_rel", s) for s in (0.03, 0.07, 0.15)]
    recs = list(reconstruct(folder, targets, batch=2))
    assert len(recs) == 3 and len(alive) == 2 * 240  # two passes over 240 files


def test_low_precision_snapshots_and_their_measured_error(tmp_path):
    torch.manual_seed(3)
    model = Net()
    with torch.no_grad():
        model.bn.running_var.fill_(1e6)  # beyond float16: must stay float32
    ph = PostHocEMA(model, tmp_path, snapshot_every=50, dtype="float16")
    ref = power_ref(0.07)
    train(model, 500, ph, [ref])
    ph.close()
    entries = read_index(tmp_path)
    assert {e.dtype for e in entries} == {"float16"}
    assert all(1e-6 < e.rounding < 1e-3 for e in entries)
    rec = next(reconstruct(tmp_path, [Target("sigma_rel", 0.07)]))
    assert rec.tensors["bn.running_var"].dtype == torch.float32
    assert rec.tensors["bn.running_var"].min() > 9e5
    err, _ = rel_err(rec.tensors, ref.avg, weights(model))
    assert err < 5 * max(e.rounding for e in entries)
    with pytest.raises(PostHocError, match="float32"):
        PostHocEMA(model, tmp_path, dtype="int8")


def test_clear_errors_for_broken_series(run, tmp_path):
    folder, _, _, _ = run
    with pytest.raises(PostHocError, match="no post-hoc EMA snapshots"):
        read_index(tmp_path)
    broken = thinned(folder, tmp_path, 40)
    victim = read_index(broken)[5]
    (broken / victim.file).unlink()
    with pytest.raises(PostHocError, match="missing"):
        next(reconstruct(broken, [Target("sigma_rel", 0.07)]))
    data = (folder / victim.file).read_bytes()
    (broken / victim.file).write_bytes(data[: len(data) // 2])
    with pytest.raises(PostHocError, match="truncated"):
        next(reconstruct(broken, [Target("sigma_rel", 0.07)]))
    # a snapshot after the requested step does not matter
    assert next(reconstruct(broken, [Target("sigma_rel", 0.07)], step=victim.step - 40))


def test_writer_skips_duplicates_and_refuses_other_emas(tmp_path):
    model = Net()
    ph = PostHocEMA(model, tmp_path, snapshot_every=0, background=False)
    train(model, 30, ph)
    ph.snapshot()
    ph.snapshot()
    assert len(read_index(tmp_path)) == 2
    other = PostHocEMA(model, tmp_path, sigma_rels=(0.2,))
    other.load_state_dict({"sigma0.2": EMA(model, schedule="sigma_rel", schedule_params={
        "sigma_rel": 0.2}).state_dict() | {"ema_meta": {"format_version": 1, "step": 30}}})
    with pytest.raises(PostHocError, match=r"this run tracks 0\.2"):
        other.snapshot()


def test_only_the_writing_process_writes(tmp_path):
    """``enabled=False`` (every process but the main one) keeps the EMAs, writes nothing."""
    model = Net()
    quiet = PostHocEMA(model, tmp_path / "rank1", snapshot_every=5, enabled=False)
    train(model, 20, quiet)
    quiet.snapshot()
    quiet.close()
    assert not (tmp_path / "rank1").exists() and quiet.step == 20
