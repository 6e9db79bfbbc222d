"""A full disk during training (issue 16): at a checkpoint and at a snapshot, the training
stops with one D2EMAError (one line, exit status 2 on the command line), every checkpoint and
snapshot written before is intact, no temporary file is left, and once space is freed the run
resumes and completes with a continuous snapshot series. ``d2ema export`` writes OUT.pth and
OUT.yaml as a pair: when the second cannot be written, the first is not replaced either.

The disk is a small tmpfs where this process may mount one (root in a container), else a write
that raises ENOSPC once the test says the disk is full."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

import _kill_child
from detectron2.engine import HookBase

import d2ema.io.atomic as atomic
from d2ema.cli import main
from d2ema.d2.engine.run_folder import DiskFullError, disk_full_as_error
from d2ema.errors import D2EMAError, one_line
from d2ema.posthoc.snapshots import read_index

pytestmark = pytest.mark.usefixtures("restore_loggers")


class Disk:
    """A folder on a disk the test can fill up and free again."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.mounted, self._full = root, False, False
        root.mkdir()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=4m", f"d2ema{uuid.uuid4().hex[:6]}",
                 str(root)], capture_output=True, timeout=30).returncode == 0
        if not self.mounted:
            write = atomic._Recorder.write

            def full_write(recorder, data):
                if self._full:
                    recorder.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    raise recorder.error
                return write(recorder, data)

            monkeypatch.setattr(atomic._Recorder, "write", full_write)

    def fill(self) -> None:
        self._full = True
        if self.mounted:
            with contextlib.suppress(OSError), open(self.root / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()

    def free(self) -> None:
        self._full = False
        with contextlib.suppress(FileNotFoundError):
            (self.root / "filler").unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "disk", monkeypatch)
    yield d
    d.close()


class _FillAtFirstStep(HookBase):
    """The disk fills up once training runs (the start checks the free space for snapshots)."""

    def __init__(self, fill):
        self.fill = fill

    def before_step(self):
        if self.fill is not None:
            self.fill()
            self.fill = None


def _train(out: Path, max_iter: int, checkpoint_period: int, posthoc: bool, fill=None):
    cfg = _kill_child.config(str(out), max_iter)
    cfg.SOLVER.CHECKPOINT_PERIOD = checkpoint_period
    cfg.MODEL_EMA.POSTHOC.ENABLED = posthoc
    torch.set_num_threads(1)
    trainer = _kill_child.KillTrainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.register_hooks([_FillAtFirstStep(fill)])
    trainer.train()
    return trainer


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["checkpoint", "snapshot"])
def test_disk_full_loses_nothing_and_resumes(disk, where, tally):
    out = disk.root / "run"
    period = 1 if where == "checkpoint" else 100  # snapshot: no checkpoint until the end
    _train(out, 3, period, posthoc=where == "snapshot")
    saved = _digests(out)
    tally["bad_inputs"] += 1
    tally["hostile_checks"] += 1
    with pytest.raises(D2EMAError) as info:
        _train(out, 6, period, posthoc=where == "snapshot", fill=disk.fill)
    line = one_line(info.value)
    assert "No space left on device" in line and "--resume" in line, line
    tally["refused_cleanly"] += 1
    disk.free()
    now = _digests(out)
    lost = {name for name, digest in saved.items() if now.get(name) != digest
            and name not in ("metrics.json", "ema_snapshots/index.json")}
    tally["bytes_lost"] += sum((out / n).stat().st_size if (out / n).exists() else 1
                               for n in lost)
    assert not lost, lost
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left"
    if where == "snapshot":  # the index lists only complete snapshots, up to where it stopped
        for e in read_index(out / "ema_snapshots"):
            torch.load(out / "ema_snapshots" / e.file, weights_only=True)
    trainer = _train(out, 6, period, posthoc=where == "snapshot")
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 5 and trainer.iter == 6  # detectron2: max_iter at the end
    if where == "snapshot":
        steps = sorted((e.sigma_rel, e.step) for e in read_index(out / "ema_snapshots"))
        assert steps == sorted((s, n) for s in (0.05, 0.1) for n in range(1, 7))


def test_any_full_write_under_train_is_one_line():
    with pytest.raises(DiskFullError, match="free disk space, then train again with --resume"), \
            disk_full_as_error("out"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/metrics.json")
    with pytest.raises(PermissionError), disk_full_as_error("out"):
        raise PermissionError(errno.EACCES, "denied")  # not a full disk: left as it is


def test_export_writes_the_pair_or_nothing(tmp_path, monkeypatch, capsys, tally):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {"w": torch.zeros(3)}, "ema_state": {"w": torch.ones(3)}},
               run / "model_final.pth")
    (run / "config.yaml").write_text("MODEL:\n  WEIGHTS: ''\nMODEL_EMA:\n  ENABLED: true\n")
    out = tmp_path / "ema.pth"
    out.write_bytes(b"previous export")
    out.with_suffix(".yaml").write_text("previous config")
    stage = atomic._stage

    def full_for_yaml(output, write):
        if str(output).endswith(".yaml"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output))
        return stage(output, write)

    monkeypatch.setattr(atomic, "_stage", full_for_yaml)
    tally["bad_inputs"] += 1
    assert main(["export", str(run / "model_final.pth"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and "ema.yaml" in err, err
    tally["refused_cleanly"] += 1
    assert out.read_bytes() == b"previous export"
    assert out.with_suffix(".yaml").read_text() == "previous config"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.pth", "ema.yaml", "run"]
    monkeypatch.setattr(atomic, "_stage", stage)
    assert main(["export", str(run / "model_final.pth"), "-o", str(out)]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["model"]["w"], torch.ones(3))
    assert str(out.resolve()) in out.with_suffix(".yaml").read_text()
