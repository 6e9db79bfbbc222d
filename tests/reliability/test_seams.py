"""The third stranger's round (issue 23): what came in at the seams, where one kind of file was
read by two paths or a check matched a string rather than the object it names. Each finding is
a test here: code named through an allowed module, data lost, hangs, silent acceptance, writes
outside the run, tracebacks. Marker files stand for code that ran."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from _hostile import files_outside, finished_run, snapshot

from d2ema.cli import main

pytestmark = pytest.mark.usefixtures("restore_loggers")


@pytest.fixture
def run(tmp_path) -> Path:
    return finished_run(tmp_path)


def _refused(tally, capsys, argv, *names, seconds: float = 60.0) -> str:
    tally["bad_inputs"] += 1
    tally["hostile_checks"] += 1
    start = time.monotonic()
    assert main(argv) == 2
    took = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    line = err[-1]
    for name in names:
        assert str(name) in line, f"{name!r} not in: {line}"
    assert "Traceback" not in "\n".join(err)
    assert took < seconds, f"refused after {took:.0f} s"
    tally["refused_cleanly"] += 1
    return line


def _no_code(tally, marker: Path) -> None:
    tally["code_executions"] += int(marker.exists())
    tally["hostile_checks"] += 1
    assert not marker.exists(), f"{marker} was created: code ran"


# ----------------------------------------------------------------------------- saved configs
def _lazy(run: Path, model: str) -> Path:
    path = run / "config.yaml"
    path.write_text("train:\n  output_dir: x\n  max_iter: 1\nmodel:\n" + model
                    + "dataloader: {}\noptimizer: {}\nlr_multiplier: {}\n")
    return path


THROUGH = {  # an allowed module's attribute that is code from elsewhere
    "coco_os_system": "  _target_: detectron2.data.datasets.coco.os.system\n  command: {cmd!r}\n",
    "module_torch_load": "  _target_: torch.nn.modules.module.torch.load\n  f: {m!r}\n",
    "name_tag": "  _target_: detectron2.modeling.build_model\n"
                "  cfg: !!python/name:detectron2.data.datasets.coco.os.system ''\n",
}


@pytest.mark.parametrize("case", sorted(THROUGH))
def test_a_target_through_an_allowed_module_runs_nothing(run, tmp_path, case, tally, capsys):
    marker = tmp_path / "marker"
    _lazy(run, THROUGH[case].format(cmd=f"touch {marker}", m=str(marker)))
    _refused(tally, capsys, ["train", "--config-file", str(run / "config.yaml"), "--resume"],
             "config.yaml", "outside the allowed packages")
    _no_code(tally, marker)
    _refused(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
             "config.yaml", "outside the allowed packages")
    _no_code(tally, marker)


def test_an_alias_bomb_is_refused_at_once(run, tally, capsys):
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
    (run / "config.yaml").write_text("train: {output_dir: x}\nmodel: {}\n" + bomb)
    _refused(tally, capsys, ["train", "--config-file", str(run / "config.yaml"), "--resume"],
             "aliases", seconds=10)


def test_a_deeply_nested_config_is_one_line_in_export(run, tmp_path, tally, capsys):
    (run / "config.yaml").write_text("MODEL:\n  WEIGHTS: " + "[" * 3000 + "]" * 3000 + "\n")
    torch.save({"model": {"w": torch.zeros(2)}, "ema_state": {"w": torch.ones(2)}},
               run / "model_final.pth")
    _refused(tally, capsys, ["export", str(run / "model_final.pth"), "-o",
                             str(tmp_path / "e.pth")], "nested more than")


# ----------------------------------------------------------------------------- data lost
def _series(run: Path) -> dict[Path, float]:
    return snapshot(run / "ema_snapshots")


def test_a_weights_only_resume_point_is_never_trained_from(run, tmp_path, tally, capsys):
    """``last_checkpoint`` naming an export (``{"model": ...}``): skipped for the newest
    complete checkpoint, or refused when there is none; the series is kept either way."""
    from d2ema.d2.checkpoint.resume import find_resume_checkpoint

    torch.save({"model": torch.load(run / "model_final.pth")["model"]}, run / "model_ema.pth")
    (run / "last_checkpoint").write_text("model_ema.pth")
    found = find_resume_checkpoint(run)
    assert found.path.name == "model_final.pth" and "not a training checkpoint" in found.warning
    (run / "model_final.pth").unlink()
    before = _series(run)
    _refused(tally, capsys, ["train", "--config-file", str(run / "config.yaml"), "--resume"],
             "model_ema.pth", "not a training checkpoint")
    assert _series(run) == before


def test_a_new_run_never_deletes_another_runs_series(run, tmp_path, tally, capsys):
    """Forgetting --resume on a finished run: refused in one line naming the choices, before
    anything is written; the core refuses too (PostHocEMA at step 0 on another run's series)."""
    import _kill_child

    from d2ema import PostHocEMA
    from d2ema.errors import D2EMAError

    before = _series(run)
    _refused(tally, capsys, ["train", "--config-file", str(run / "config.yaml")],
             "holds another run", "--resume", "--start-over", "another OUTPUT_DIR")
    tally["bad_inputs"] += 1
    tracker = PostHocEMA(_kill_child.ReliabilityTinyNet(), run / "ema_snapshots", (0.05, 0.1),
                         background=False)
    with pytest.raises(D2EMAError, match="another run's series"):
        tracker.update(_kill_child.ReliabilityTinyNet(), 1)
    tally["refused_cleanly"] += 1
    assert _series(run) == before


def test_start_over_moves_the_earlier_run_aside(run):
    from d2ema.d2.engine.run_folder import earlier_run, move_earlier_run
    from d2ema.d2.engine.train_net import load_config

    cfg = load_config(str(run / "config.yaml"))
    sizes = {p.relative_to(run): p.stat().st_size for p in run.rglob("*") if p.is_file()}
    assert earlier_run(cfg) == ["1 checkpoints", "ema_snapshots/ snapshots"]
    aside = move_earlier_run(cfg)
    assert aside is not None and aside.parent == run and aside.name.startswith("previous-")
    assert earlier_run(cfg) == []
    moved = {p.relative_to(aside): p.stat().st_size for p in aside.rglob("*") if p.is_file()}
    kept = {p.relative_to(run): p.stat().st_size for p in run.rglob("*") if p.is_file()
            and aside not in p.parents}
    assert moved | kept == sizes  # nothing deleted, nothing copied
    assert Path("model_final.pth") in moved and Path("ema_snapshots/index.json") in moved


# ----------------------------------------------------------------------------- one reader
def _with_ema(run: Path, change) -> Path:
    """model_final.pth as a training with an EMA saves it, then ``change``-d."""
    path = run / "model_final.pth"
    data = torch.load(path, weights_only=True)
    data["ema_state"] = {k: v.clone() for k, v in data["model"].items()}
    data["ema_meta"] = {"format_version": 1, "step": 3}
    change(data)
    torch.save(data, path)
    return path


def _first_float(data) -> str:
    return next(k for k, v in data["model"].items() if v.is_floating_point())


BAD_CHECKPOINTS = {
    "int_ema": (lambda d: d["ema_state"].update({_first_float(d): torch.full_like(
        d["model"][_first_float(d)], 7, dtype=torch.int64)}), "another kind"),
    "bool_ema": (lambda d: d["ema_state"].update({_first_float(d): torch.ones_like(
        d["model"][_first_float(d)], dtype=torch.bool)}), "another kind"),
    "complex_nan": (lambda d: d["ema_state"].update({_first_float(d): torch.full_like(
        d["model"][_first_float(d)], complex(float("nan"), 0), dtype=torch.complex64)}),
        "another kind"),
    "format_99": (lambda d: d["ema_meta"].update(format_version=99), "format_version 99"),
    "meta_tensor": (lambda d: d["ema_state"].update({_first_float(d): torch.empty(
        d["model"][_first_float(d)].shape, device="meta")}), "meta device"),
    "step_1e30": (lambda d: d["ema_meta"].update(step=10**30), "more than"),
    "iteration_1e12": (lambda d: d.update(iteration=10**12), "not a step number"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_every_command_refuses_a_bad_checkpoint_with_the_same_line(run, tmp_path, case, tally,
                                                                   capsys):
    change, expected = BAD_CHECKPOINTS[case]
    path = _with_ema(run, change)
    out = tmp_path / "export.pth"
    lines = [
        _refused(tally, capsys, ["export", str(path), "-o", str(out)], expected, path.name),
        _refused(tally, capsys, ["train", "--config-file", str(run / "config.yaml"),
                                 "--eval-only", "MODEL.WEIGHTS", str(path)], expected),
    ]
    assert not out.exists()
    reason = lines[0][lines[0].index(str(path)):]
    assert all(reason.split(";")[0] in line for line in lines), lines


def test_a_fifo_or_huge_last_checkpoint_never_hangs(run, tally):
    from d2ema.d2.checkpoint.resume import find_resume_checkpoint

    tag = run / "last_checkpoint"
    tag.unlink()
    os.mkfifo(tag)
    start = time.monotonic()
    found = find_resume_checkpoint(run)  # skipped, with the reason: never opened for reading
    assert found.path.name == "model_final.pth" and "not a regular file" in found.warning
    tag.unlink()
    with open(tag, "wb") as f:
        f.truncate(6 << 30)  # sparse: 6 GB that take no disk
    found = find_resume_checkpoint(run)
    assert found.path.name == "model_final.pth" and "bytes" in found.warning
    assert time.monotonic() - start < 10
    tally["bad_inputs"] += 2
    tally["refused_cleanly"] += 2


# ----------------------------------------------------------------------------- snapshots
def _victim(run: Path) -> tuple[Path, dict]:
    from d2ema.posthoc.snapshots import read_index

    entry = next(e for e in read_index(run / "ema_snapshots") if e.step == 4)
    path = run / "ema_snapshots" / entry.file
    return path, torch.load(path, weights_only=True)


def _forge(path: Path, data: dict) -> None:
    """Rewrite a snapshot and its index entry (size and checksum), as a forger would."""
    import json

    from d2ema.posthoc.snapshots import file_crc32

    torch.save(data, path)
    index = path.parent / "index.json"
    raw = json.loads(index.read_text())
    for e in raw["snapshots"]:
        if e["file"] == path.name:
            e["bytes"], e["crc32"] = path.stat().st_size, file_crc32(path)
    index.write_text(json.dumps(raw))


def _weight(data: dict) -> str:
    return next(n for n in data["dtypes"] if n.endswith("weight"))


SNAPSHOT_CASES = {
    "int64_weight": lambda d: d["tensors"].update({_weight(d): torch.full_like(
        d["tensors"][_weight(d)], 7, dtype=torch.int64)}),
    "int64_weight_unlisted": lambda d: (d["tensors"].update({_weight(d): torch.full_like(
        d["tensors"][_weight(d)], 7, dtype=torch.int64)}), d["dtypes"].pop(_weight(d))),
    "complex_nan": lambda d: d["tensors"].update({_weight(d): torch.full_like(
        d["tensors"][_weight(d)], complex(float("nan"), 0), dtype=torch.complex64)}),
}


def _rebuild_into_model(run: Path) -> None:
    """What ``d2ema posthoc --eval`` and the selection do: rebuild, then load into the model."""
    import _kill_child

    from d2ema.posthoc import Target, load_tensors, reconstruct

    for rec in reconstruct(run / "ema_snapshots", [Target("sigma_rel", 0.07)]):
        load_tensors(_kill_child.ReliabilityTinyNet(), rec.tensors)


def _refused_call(tally, call, *names) -> str:
    from d2ema.errors import D2EMAError

    tally["bad_inputs"] += 1
    with pytest.raises(D2EMAError) as e:
        call()
    line = str(e.value)
    assert "\n" not in line and all(str(n) in line for n in names), line
    tally["refused_cleanly"] += 1
    return line


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_a_snapshot_of_another_dtype_is_never_mixed_in(run, case, tally):
    path, data = _victim(run)
    SNAPSHOT_CASES[case](data)
    _forge(path, data)
    _refused_call(tally, lambda: _rebuild_into_model(run),
                  "int64" if case.startswith("int64") else "complex64")


def test_a_same_size_bit_flip_is_named(run, tally):
    path, _ = _victim(run)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    _refused_call(tally, lambda: _rebuild_into_model(run), path.name, "checksum")


def test_an_index_without_checksums_still_loads(run):
    """What 0.2.0 wrote: version 1, no crc32."""
    import json

    from d2ema.posthoc import Target, reconstruct

    index = run / "ema_snapshots" / "index.json"
    raw = json.loads(index.read_text())
    raw["version"] = 1
    for e in raw["snapshots"]:
        del e["crc32"]
    index.write_text(json.dumps(raw))
    (rec,) = reconstruct(run / "ema_snapshots", [Target("sigma_rel", 0.07)])
    assert rec.step == 4 and rec.tensors


def test_a_forged_index_of_20000_entries_is_refused_before_any_solve(run, tally, capsys):
    import json

    from d2ema.posthoc.profiles import sigma_rel_to_gamma

    index = run / "ema_snapshots" / "index.json"
    raw = json.loads(index.read_text())
    entries = []
    for step in range(1, 10_001):
        for s in (0.05, 0.1):
            entries.append({**raw["snapshots"][0], "sigma_rel": s, "gamma": sigma_rel_to_gamma(s),
                            "t": step, "step": step, "file": f"sigma{s:g}_step{step:08d}.pth"})
    raw["snapshots"] = entries
    index.write_text(json.dumps(raw))
    _refused(tally, capsys, ["posthoc", str(run), "--sigma-rel", "0.07"], "20000 snapshots",
             seconds=20)


# ----------------------------------------------------------------------------- writes outside
def test_a_posthoc_folder_linked_out_is_refused_before_evaluation(run, tmp_path, tally, capsys):
    victim = tmp_path / "OUTSIDE" / "posthoc"
    victim.mkdir()
    (victim / "results.json").write_text("keep me")
    os.symlink(victim, run / "posthoc")
    before = snapshot(tmp_path / "OUTSIDE")
    _refused(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
             "symbolic link", str(victim))
    changed = files_outside(tmp_path / "OUTSIDE", before)
    tally["outside_touched"] += len(changed)
    assert not changed and [p.name for p in victim.iterdir()] == ["results.json"]


def _no_evaluation(monkeypatch) -> list:
    from d2ema.d2.evaluation.run_eval import RunEvaluator

    calls: list = []
    monkeypatch.setattr(RunEvaluator, "load", lambda *a, **k: calls.append(a))
    return calls


def test_a_read_only_run_is_one_line_before_evaluation(run, monkeypatch, tally, capsys):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    calls = _no_evaluation(monkeypatch)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)  # root writes through chmod
    _refused(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
             "Read-only file system", "posthoc")
    assert not calls


def test_a_full_disk_is_one_line_before_evaluation(run, monkeypatch, tally, capsys):
    import collections
    import shutil

    calls = _no_evaluation(monkeypatch)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    _refused(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
             "MB free", "posthoc")
    assert not calls


# ----------------------------------------------------------------------------- distributed
def test_a_busy_port_is_one_line_naming_it(tally):
    import socket

    from d2ema.d2.engine.launch import launch
    from d2ema.errors import UsageError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        tally["bad_inputs"] += 1
        with pytest.raises(UsageError, match=f"port {port} .* in use.*--dist-url"):
            launch(print, 2, dist_url=f"tcp://127.0.0.1:{port}")
        tally["refused_cleanly"] += 1


def test_a_dead_rank_ends_the_others_with_one_line(tally):
    from _hostile import rank_one_dies

    from d2ema.d2.engine.launch import launch
    from d2ema.errors import D2EMAError

    tally["kills"] += 1
    start = time.monotonic()
    with pytest.raises(D2EMAError) as e:
        launch(rank_one_dies, 2, dist_url="auto")
    line = str(e.value)
    assert "rank 1" in line and "SIGKILL" in line and "--resume" in line, line
    assert time.monotonic() - start < 50  # rank 0 was stopped, not waited for
