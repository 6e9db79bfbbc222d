"""``d2ema export`` under faults: signals and a full disk mid-write, SIGKILL leftovers, and an
EMA poisoned by NaN (refused unless --allow-nonfinite). Each failure is one line on stderr,
exit status 2 (128 + signal for a signal), no temporary file, and the old output untouched."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import d2ema
from d2ema import EMA
from d2ema.averaging.health import NonfiniteWatch
from d2ema.cli import main
from d2ema.d2.checkpoint.export import export_ema


@pytest.fixture(autouse=True)
def exact_nan_watch(monkeypatch):
    """These tests check the exact step: the watch looks at every update (default: every 32)."""
    monkeypatch.setattr(NonfiniteWatch, "every", 1)


CONSOLE = [sys.executable, "-c", "import sys; from d2ema.cli import main; sys.exit(main())"]
ENV = {**os.environ, "PYTHONPATH": str(Path(d2ema.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
OLD = b"the previous export"


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """32 MB of EMA: writing it takes long enough to be interrupted."""
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    ema = EMA(model, decay=0.5)
    path = tmp_path_factory.mktemp("big") / "model_final.pth"
    torch.save({"model": model.state_dict(), **ema.state_dict(), "iteration": 9}, path)
    return path


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


FAULTS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


@pytest.fixture(scope="module")
def faulted_exports(big_checkpoint, tmp_path_factory) -> dict:
    """The console script, one process per signal, all at once (each start imports torch): the
    signal is sent as soon as its temporary file appears. Each writes over an existing output."""
    runs = {}
    for name in FAULTS:
        folder = tmp_path_factory.mktemp(name.replace(" ", "_"))
        (folder / "ema.pth").write_bytes(OLD)
        proc = subprocess.Popen(
            [*CONSOLE, "export", str(big_checkpoint), "-o", str(folder / "ema.pth")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )
        runs[name] = (proc, folder)
    pending = set(FAULTS)
    deadline = time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            proc, folder = runs[name]
            if _temps(folder):
                proc.send_signal(FAULTS[name])
                pending.discard(name)
            elif proc.poll() is not None:
                pending.discard(name)
        time.sleep(0.001)
    results = {}
    for name, (proc, folder) in runs.items():
        _, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, err, folder)
    return results


def test_sigterm_during_export(faulted_exports):
    rc, err, folder = faulted_exports["SIGTERM"]
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip() == "d2ema export: interrupted by SIGTERM"
    assert _temps(folder) == [] and (folder / "ema.pth").read_bytes() == OLD


def _export_in_process(checkpoint: Path, out: Path, fault, monkeypatch, capsys):
    """``main(["export", ...])`` whose ``torch.save`` meets ``fault`` after 1000 bytes."""
    real_save = torch.save

    def faulty_save(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        fault()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", faulty_save)
    out.write_bytes(OLD)
    rc = main(["export", str(checkpoint), "-o", str(out)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert _temps(out.parent) == [] and out.read_bytes() == OLD
    return rc, err.strip()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_signal_mid_write(big_checkpoint, tmp_path, monkeypatch, capsys, sig):
    def signal_self():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises before this ends

    # the signal's usual action, whatever this test process inherited (nohup ignores SIGHUP)
    default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
    inherited = signal.signal(sig, default)
    try:
        rc, err = _export_in_process(big_checkpoint, tmp_path / "ema.pth", signal_self,
                                     monkeypatch, capsys)
        assert signal.getsignal(sig) is default  # handlers restored
    finally:
        signal.signal(sig, inherited)
    assert rc == 128 + sig
    assert err == f"d2ema export: interrupted{'' if sig == signal.SIGINT else ' by ' + sig.name}"


def _usual_action(sig):
    return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_as_the_temporary_file_is_created(tmp_path, monkeypatch, sig):
    """A signal right after the temporary file is created (before its descriptor is even
    stored) finds its name known: nothing is left behind."""
    from d2ema.io import atomic
    from d2ema.io.interrupts import signals_as_interrupts

    real_create = atomic._create

    def create_then_signal(tmp):
        fd = real_create(tmp)
        os.kill(os.getpid(), sig)
        return fd

    monkeypatch.setattr(atomic, "_create", create_then_signal)
    out = tmp_path / "ema.pth"
    out.write_bytes(OLD)
    inherited = signal.signal(sig, _usual_action(sig))
    try:
        with pytest.raises(KeyboardInterrupt), signals_as_interrupts():
            atomic.atomic_save({"x": torch.zeros(3)}, out)
    finally:
        signal.signal(sig, inherited)
    assert _temps(tmp_path) == [] and out.read_bytes() == OLD


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_inside_torch_save_stays_an_interrupt(tmp_path, monkeypatch, sig):
    """torch.save's zip writer turns an exception raised while it writes into a RuntimeError
    ("unexpected pos"): the interrupt behind it is what comes out, and nothing is left."""
    from d2ema.io import atomic
    from d2ema.io.interrupts import signals_as_interrupts

    real_write, calls = atomic._Recorder.write, []

    def write_then_signal(self, data):
        calls.append(len(data))
        if len(calls) == 2:
            os.kill(os.getpid(), sig)
        return real_write(self, data)

    monkeypatch.setattr(atomic._Recorder, "write", write_then_signal)
    out = tmp_path / "ema.pth"
    out.write_bytes(OLD)
    inherited = signal.signal(sig, _usual_action(sig))
    try:
        with pytest.raises(KeyboardInterrupt), signals_as_interrupts():
            atomic.atomic_save({"x": torch.zeros(1000)}, out)
    finally:
        signal.signal(sig, inherited)
    assert len(calls) >= 2 and _temps(tmp_path) == [] and out.read_bytes() == OLD


def test_ignored_sighup_is_left_ignored(big_checkpoint, tmp_path, capsys):
    """Under nohup SIGHUP is ignored: the export must go on and finish, not stop."""
    inherited = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    real_save = torch.save

    def hangup_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)
        return real_save(obj, f, *args, **kwargs)

    try:
        torch.save = hangup_save
        rc = main(["export", str(big_checkpoint), "-o", str(tmp_path / "ema.pth")])
    finally:
        torch.save = real_save
        signal.signal(signal.SIGHUP, inherited)
    assert rc == 0, capsys.readouterr().err
    exported = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert "model" in exported and "ema_state" not in exported
    assert _temps(tmp_path) == []


def test_disk_full_mid_write(big_checkpoint, tmp_path, monkeypatch, capsys):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def disk_full():  # this process may write no more than 2 kB per file: EFBIG, as when full
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))

    try:
        rc, err = _export_in_process(big_checkpoint, tmp_path / "ema.pth", disk_full,
                                     monkeypatch, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "cannot write" in err and "File too large" in err, err


def test_sigkill_leftover_is_removed_by_the_next_write(faulted_exports, big_checkpoint):
    rc, _, folder = faulted_exports["SIGKILL"]
    assert rc == -signal.SIGKILL
    assert _temps(folder) and (folder / "ema.pth").read_bytes() == OLD  # cannot be caught
    export_ema(big_checkpoint, folder / "ema.pth")
    assert _temps(folder) == []
    assert torch.load(folder / "ema.pth", weights_only=True)["model"].keys() == torch.load(
        big_checkpoint, weights_only=True)["model"].keys()


# ----------------------------------------------------------------------------- NaN, guard off
def _poisoned(skip_nonfinite: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9, skip_nonfinite=skip_nonfinite)
    for step in range(1, 9):
        with torch.no_grad():
            model[0].weight.add_(0.01)
            if step == 5:
                model[0].weight[0, 0] = float("nan")
        ema.update(model)
    return model, ema


def test_first_nonfinite_step_is_recorded():
    _, ema = _poisoned()
    assert ema.nonfinite_step == 5
    assert ema.meta()["nonfinite_step"] == 5
    _, guarded = _poisoned(skip_nonfinite=True)
    assert guarded.nonfinite_step is None and guarded.num_skipped == 4
    assert "nonfinite_step" not in guarded.meta()


def test_an_overflowing_sum_is_no_false_alarm():
    """The per-step check is a sum: huge finite weights overflow it, the exact check does not."""
    model = nn.Linear(1000, 1000, bias=False)
    with torch.no_grad():
        model.weight.fill_(3e35)  # the sum, 3e41, is above float32's 3.4e38
    ema = EMA(model, decay=0.5)
    ema.update(model)
    assert ema.nonfinite_step is None
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    ema.update(model)
    assert ema.nonfinite_step == 2


def test_nonfinite_reported_at_save_and_evaluation(tmp_path, caplog):
    pytest.importorskip("detectron2")
    from d2ema.d2 import EMACheckpointer, evaluate_with_ema

    model, ema = _poisoned()
    checkpointer = EMACheckpointer(model, str(tmp_path), ema=ema)
    with caplog.at_level(logging.WARNING):
        checkpointer.save("model_0000007", iteration=7)
        evaluate_with_ema(lambda m: {"ok": 1.0}, model, ema)
    reports = [r.getMessage() for r in caplog.records if "NaN/Inf since step 5" in r.getMessage()]
    assert len(reports) == 2 and "saving model_0000007.pth" in reports[0]
    assert torch.load(tmp_path / "model_0000007.pth", weights_only=True)["ema_meta"][
        "nonfinite_step"] == 5


def test_export_refuses_nonfinite_ema_without_flag(tmp_path, capsys, tally):
    model, ema = _poisoned()
    src, out = tmp_path / "model_final.pth", tmp_path / "ema.pth"
    torch.save({"model": model.state_dict(), **ema.state_dict()}, src)
    tally["bad_inputs"] += 1
    assert main(["export", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN or Inf (since step 5)" in err
    assert "--allow-nonfinite" in err and not out.exists()
    tally["refused_cleanly"] += 1
    assert main(["export", str(src), "-o", str(out), "--allow-nonfinite"]) == 0
    assert torch.isnan(torch.load(out, weights_only=True)["model"]["0.weight"]).any()
