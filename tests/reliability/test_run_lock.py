"""One training per OUTPUT_DIR (issue 16): a second ``d2ema train`` on a folder a training is
writing into is refused in one line naming the holder's PID, the first finishes unharmed, and
a holder killed with SIGKILL leaves no stale lock."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from _hostile import tiny_yaml

from d2ema.cli import main
from d2ema.d2.engine.run_folder import LOCK_FILE, run_lock
from d2ema.errors import RunLockedError

pytestmark = pytest.mark.usefixtures("restore_loggers")

_ARGS = Namespace(eval_only=False, machine_rank=0)


def _Cfg(out: Path):
    """A yacs config with what the lock reads: OUTPUT_DIR (MODEL makes it a yacs one)."""
    from detectron2.config import CfgNode

    return CfgNode({"MODEL": {}, "OUTPUT_DIR": str(out)})


def _hold(out: str, ready) -> None:
    with run_lock(_Cfg(Path(out)), _ARGS):
        ready.set()
        time.sleep(120)


def _wait_pid(lock: Path, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = lock.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named its holder")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, tally, capsys):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out), ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError, match=f"process {holder.pid} is training"), \
                run_lock(_Cfg(out), _ARGS):
            pass
        # the command line: one line, exit 2, before anything is written into the folder
        before = sorted(p.name for p in out.iterdir())
        assert main(["train", "--config-file", str(tiny_yaml(tmp_path, out))]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"process {holder.pid}" in line and "another OUTPUT_DIR" in line
        assert sorted(p.name for p in out.iterdir()) == before
        tally["concurrent_refused"] += 1
        tally["hostile_checks"] += 1
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
    assert holder.exitcode == -signal.SIGKILL
    with run_lock(_Cfg(out), _ARGS) as lock:  # the kernel released it with the process
        assert lock == out / LOCK_FILE and lock.read_text().strip() == str(os.getpid())
    with run_lock(_Cfg(out), Namespace(eval_only=True, machine_rank=0)) as lock:
        assert lock is None  # --eval-only trains nothing: no lock


def test_two_trainings_on_one_folder(tmp_path, tally, capsys):
    """A real training holds the folder; a second start is refused while it runs; the first
    completes with its checkpoints and snapshot series intact."""
    from d2ema.app.model_configs import tiny_detector_config

    cfg = tiny_detector_config("retinanet", num_classes=5, image_size=64)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("shapes_train",), ()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SEED = 2, 4, 0
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.POSTHOC.ENABLED, cfg.MODEL_EMA.POSTHOC.PERIOD = True, 1
    config = tmp_path / "retina.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-m", "d2ema.cli", "train", "--config-file",
                              str(config), "OUTPUT_DIR", str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_pid(out / LOCK_FILE) == first.pid
        rc = main(["train", "--config-file", str(config), "OUTPUT_DIR", str(out)])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert first.poll() is None, "the first run ended before the second start was tried"
        assert rc == 2 and f"process {first.pid} is training" in line, line
        tally["concurrent_refused"] += 1
        tally["hostile_checks"] += 1
        log, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, log[-3000:]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["ema_meta"]["step"] == 4 and final["iteration"] == 3
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    from d2ema.posthoc.snapshots import read_index

    steps = sorted({e.step for e in read_index(out / "ema_snapshots")})
    assert steps == [1, 2, 3, 4]
