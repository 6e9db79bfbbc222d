"""SIGKILL a tiny d2ema training at random points, again and again, and resume it each time.

The training saves a checkpoint every iteration (``model_NNNNNNN.pth``) and ``model_final.pth``
at its end; every completed run raises MAX_ITER by 3, so the next one rewrites
``model_final.pth`` (the case that lost the only checkpoint in issue 10). Kills land in the
middle of writing a checkpoint (at a random byte), just before or just after its rename, or at
a random time. After every kill:

* every checkpoint under its final name is complete (loads), and ``last_checkpoint`` names one:
  nothing saved is ever lost;
* the next run resumes from the newest complete checkpoint, and the model, the EMA and its step
  it continues from are bit-equal to that file's;
* every post-hoc EMA snapshot the index lists is complete, and after a completed run the series
  has one snapshot per EMA and step, from the first to the last (no gap, no duplicate).
"""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

import _kill_child

from d2ema.posthoc.snapshots import read_index

MIN_KILLS = 20
RUNS_CAP = 80


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def _checkpoints(folder: Path) -> dict[Path, object]:
    return {p: _load(p) for p in sorted(folder.glob("model_*.pth"))}


def _resume_point(folder: Path):
    """What the next run must continue from: the tagged checkpoint; the latest complete one
    if the kill came between a rename and the tag (None: nothing saved yet)."""
    found = {p: c for p, c in _checkpoints(folder).items() if c is not None}
    tag = folder / "last_checkpoint"
    if tag.exists():
        tagged = folder / tag.read_text().strip()
        assert tagged in found, f"last_checkpoint names {tagged.name}, which is not complete"
        return tagged, found[tagged]
    if not found:
        return None
    return max(found.items(), key=lambda item: item[1]["iteration"])


def _assert_snapshots_sound(folder: Path, completed_at: int | None) -> None:
    if not (folder / "index.json").exists():
        assert completed_at is None
        return
    entries = read_index(folder)
    for e in entries:
        assert _load(folder / e.file) is not None, f"snapshot {e.file} is not complete"
    if completed_at is not None:
        steps = sorted((e.sigma_rel, e.step) for e in entries)
        assert steps == sorted((s, n) for s in (0.05, 0.1) for n in range(1, completed_at + 1))


def _assert_continues_exactly(dump: dict, expected) -> None:
    if expected is None:
        assert dump["resumed_from"] is None and dump["start_iter"] == 0
        return
    path, checkpoint = expected
    resumed = Path(dump["resumed_from"] or path)
    loaded = _load(resumed)
    assert loaded is not None, f"resumed from {resumed.name}, which is not complete"
    assert loaded["iteration"] == checkpoint["iteration"], (resumed.name, path.name)
    assert dump["start_iter"] == loaded["iteration"] + 1
    assert dump["ema_step"] == loaded["ema_meta"]["step"]
    assert dump["model"].keys() == loaded["model"].keys()
    for name, value in loaded["model"].items():
        assert torch.equal(dump["model"][name], value), name
    assert dump["ema"].keys() == loaded["ema_state"].keys()
    for name, value in loaded["ema_state"].items():
        assert torch.equal(dump["ema"][name], value), name


def _plan(rng: random.Random, start: int, max_iter: int, has_final: bool):
    names = [f"model_{i:07d}" for i in range(start, max_iter)]
    target = "model_final" if has_final and rng.random() < 0.5 else rng.choice(
        [*names, "model_final"]
    )
    kind = rng.choices(["mid_write", "before_rename", "after_rename", "timed"],
                       weights=[4, 1.5, 1.5, 3])[0]
    return kind, target, rng.random()


def test_sigkill_anywhere_loses_nothing(tmp_path, tally):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "detectron2.engine", "d2ema.d2", "_kill_child"])
    rng = random.Random(10)
    out = tmp_path / "run"
    max_iter, kills, exact, final_rewrites = 4, 0, 0, 0
    expected = None
    for run in range(RUNS_CAP):
        if kills >= MIN_KILLS and final_rewrites >= 3:
            break
        start = expected[1]["iteration"] + 1 if expected else 0
        had_final = (out / "model_final.pth").exists()
        plan = _plan(rng, start, max_iter, had_final)
        dump, log = tmp_path / f"dump{run}.pth", tmp_path / f"run{run}.log"
        proc = ctx.Process(target=_kill_child.run,
                           args=(str(out), max_iter, plan, str(dump), str(log)))
        proc.start()
        deadline = time.monotonic() + 120
        while not dump.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if plan[0] == "timed":
            time.sleep(rng.uniform(0.0, 0.25))
            proc.kill()
        proc.join(120)
        text = log.read_text() if log.exists() else ""
        assert proc.exitcode in (0, -9), f"run {run} {plan} exited {proc.exitcode}:\n{text[-3000:]}"
        assert dump.exists(), f"run {run} died before it resumed:\n{text[-3000:]}"
        _assert_continues_exactly(torch.load(dump, weights_only=True), expected)
        exact += expected is not None
        if proc.exitcode == -9:
            kills += 1
            final_rewrites += had_final and plan[1] == "model_final" and plan[0] != "timed"
        else:
            max_iter += 3
        checkpoints = _checkpoints(out)
        sizes = [p.stat().st_size for p, c in checkpoints.items() if c is not None]
        broken = [p for p, c in checkpoints.items() if c is None]
        tally["bytes_lost"] += len(broken) * max(sizes, default=0)
        assert not broken, f"after run {run} {plan}: truncated checkpoints {broken}"
        _assert_snapshots_sound(out / "ema_snapshots",
                                max_iter - 3 if proc.exitcode == 0 else None)
        expected = _resume_point(out)
    tally["kills"] += kills
    tally["exact_resumes"] += exact
    assert kills >= MIN_KILLS and final_rewrites >= 3, (kills, final_rewrites)
    # The last run completed: it removed the temporary files the killed writers left.
    proc = ctx.Process(target=_kill_child.run, args=(str(out), max_iter + 1, ("none", "", 0.0),
                                                       str(tmp_path / "last.pth"),
                                                       str(tmp_path / "last.log")))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
