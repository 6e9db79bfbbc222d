"""Hostile files in a run folder and hostile weights (issue 16): nothing outside the folder is
read or deleted, no pickle and no saved config runs code, and each is refused in one line
(exit status 2) while detectron2's own ``.pkl`` weights and a user's YAML with Python tags keep
working. Marker files stand for code: a pickle or config that ran would create one."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

import _kill_child
from _hostile import (
    evil_pickle,
    evil_torch_file,
    files_outside,
    finished_run,
    snapshot,
    tiny_state,
    tiny_yaml,
)

from d2ema import PostHocEMA
from d2ema.cli import main
from d2ema.d2.checkpoint.resume import find_resume_checkpoint
from d2ema.errors import D2EMAError, OutsideFolderError, PickleRefusedError, one_line
from d2ema.io.safe_pickle import TRUST_ENV, load_pickle, trust_pickles
from d2ema.posthoc import Target, plan, reconstruct
from d2ema.posthoc.snapshots import SnapshotWriter, file_crc32

pytestmark = pytest.mark.usefixtures("restore_loggers")


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)  # --trust-pickle sets it for the process


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    return err[-1]


def _refused_cli(tally, capsys, argv, *names) -> str:
    tally["bad_inputs"] += 1
    tally["hostile_checks"] += 1
    assert main(argv) == 2
    line = _error(capsys)
    for name in names:
        assert str(name) in line, f"{name!r} not in: {line}"
    assert "Traceback" not in line
    tally["refused_cleanly"] += 1
    return line


def _no_code(tally, marker: Path) -> None:
    ran = marker.exists()
    tally["code_executions"] += int(ran)
    tally["hostile_checks"] += 1
    assert not ran, f"{marker} was created: code ran"


def _untouched(tally, root: Path, before) -> None:
    changed = files_outside(root, before)
    tally["outside_touched"] += len(changed)
    assert not changed, changed


# ----------------------------------------------------------------------------- a run folder
@pytest.fixture
def run(tmp_path) -> Path:
    return finished_run(tmp_path)


def _plant(run: Path, **fields) -> None:
    index = run / "ema_snapshots" / "index.json"
    data = json.loads(index.read_text())
    entry = dict(data["snapshots"][-1], **fields)
    data["snapshots"].append(entry)
    index.write_text(json.dumps(data))


def test_the_run_fixture_is_good(run, capsys):
    """What the refusals below are measured against: the untouched folder works."""
    assert main(["posthoc", str(run), "--sigma-rel", "0.07"]) == 0
    assert "sigma_rel 0.07" in capsys.readouterr().out.replace("σ", "sigma") or True
    entries, fits, step = plan(run / "ema_snapshots", [Target("sigma_rel", 0.07)])
    assert step == 4 and len(entries) == 8 and fits


ESCAPES = {
    "absolute": lambda run: str(run.parent / "OUTSIDE" / "sigma0.05_step00000009.pth"),
    "dotdot": lambda run: "../../OUTSIDE/sigma0.05_step00000009.pth",
    "symlink": lambda run: "sigma0.1_step00000009.pth",  # the name the entry's snapshot has
}


@pytest.mark.parametrize("kind", sorted(ESCAPES))
def test_planted_index_entry_deletes_and_reads_nothing_outside(run, kind, tally, capsys):
    folder = run / "ema_snapshots"
    name = ESCAPES[kind](run)
    if kind == "symlink":
        os.symlink(run.parent / "OUTSIDE" / "sigma0.05_step00000009.pth", folder / name)
    _plant(run, file=name, step=9, t=9)
    before_out, before_in = snapshot(run.parent / "OUTSIDE"), snapshot(folder)
    writer = SnapshotWriter(folder, {"sigma0.05": PostHocEMA(
        _kill_child.ReliabilityTinyNet(), folder, (0.05,)).emas["sigma0.05"]}, background=False)
    tally["bad_inputs"] += 1
    for resume_at in (0, 2):  # a fresh run, and a resume at step 2: would delete steps 3..9
        with pytest.raises(D2EMAError) as info:
            writer.sync(resume_at)
        assert "snapshot entry 8" in one_line(info.value)
        assert ("symbolic link" in one_line(info.value)) == (kind == "symlink")
    tally["refused_cleanly"] += 1
    _refused_cli(tally, capsys, ["posthoc", str(run), "--sigma-rel", "0.07"], "entry 8")
    _untouched(tally, run.parent / "OUTSIDE", before_out)
    assert snapshot(folder) == before_in  # nothing deleted inside either


@pytest.mark.parametrize("name", ["/abs/x.pth", "../elsewhere/x.pth", "link.pth"])
def test_last_checkpoint_outside_the_folder_is_refused(run, name, tally, capsys, tmp_path):
    victim = tmp_path / "OUTSIDE" / "victim.pth"
    if name == "link.pth":
        os.symlink(victim, run / name)
    elif name == "/abs/x.pth":
        name = str(victim)
    (run / "last_checkpoint").write_text(name)
    before = snapshot(tmp_path / "OUTSIDE")
    with pytest.raises(OutsideFolderError):
        find_resume_checkpoint(run)
    _refused_cli(tally, capsys, ["train", "--config-file", str(tiny_yaml(tmp_path, run)),
                                 "--resume"], "link.pth" if name == "link.pth" else
                 "last_checkpoint")
    _untouched(tally, tmp_path / "OUTSIDE", before)


def test_escaping_checkpoint_links_are_never_resume_candidates(run, tmp_path):
    (run / "last_checkpoint").unlink()
    (run / "model_final.pth").unlink()
    os.symlink(tmp_path / "OUTSIDE" / "victim.pth", run / "model_0000099.pth")
    with pytest.raises(D2EMAError, match="cannot resume"):
        find_resume_checkpoint(run)


# ----------------------------------------------------------------------------- pickles
def test_the_marker_pickle_really_runs_code_when_trusted(tmp_path):
    """The refusals below are not vacuous: trusted (--trust-pickle), the same file creates its
    marker; the opt-in ends with the command."""
    from d2ema.cli import build_parser

    path = evil_pickle(tmp_path / "w.pkl", tmp_path / "marker")
    with pytest.raises(PickleRefusedError, match="pathlib"):
        load_pickle(path)
    assert not (tmp_path / "marker").exists()
    with trust_pickles(True):
        load_pickle(path)
    assert (tmp_path / "marker").exists() and TRUST_ENV not in os.environ
    for command in (["train", "--config-file", "c.yaml"], ["posthoc", "run"]):
        assert build_parser().parse_args([*command, "--trust-pickle"]).trust_pickle
        assert not build_parser().parse_args(command).trust_pickle


def _zoo_files(folder: Path) -> dict[str, Path]:
    state = tiny_state()
    files = {
        "zoo": {"model": state, "__author__": "Detectron", "matching_heuristics": True},
        "caffe2_blobs": {"blobs": {**state, "conv.weight_momentum": state["conv.weight"]}},
        "imagenet": dict(state),
    }
    out = {}
    for name, data in files.items():
        for proto in (2, pickle.HIGHEST_PROTOCOL):
            out[f"{name}_p{proto}"] = folder / f"{name}_p{proto}.pkl"
            out[f"{name}_p{proto}"].write_bytes(pickle.dumps(data, protocol=proto))
    return out


def test_detectron2_style_pkl_weights_still_load(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    from d2ema.d2.checkpoint.checkpointers import AtomicCheckpointer

    state = tiny_state()
    for name, path in _zoo_files(tmp_path).items():
        torch.manual_seed(0)
        model = _kill_child.ReliabilityTinyNet()
        torch.manual_seed(0)
        reference = _kill_child.ReliabilityTinyNet()
        AtomicCheckpointer(model).load(str(path))
        DetectionCheckpointer(reference).load(str(path))  # detectron2's own pickle.load
        loaded = model.state_dict()
        for key, value in reference.state_dict().items():
            assert torch.equal(loaded[key], value), (name, key)
        if name.startswith("zoo"):  # names as in the model: every array lands as it is
            assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())


@pytest.mark.parametrize("mode", ["train", "eval_only", "resume_without_checkpoint"])
def test_pickled_weights_never_run(mode, tmp_path, tally, capsys):
    marker = tmp_path / "marker"
    weights = evil_pickle(tmp_path / "weights.pkl", marker)
    out = tmp_path / "out"
    argv = ["train", "--config-file", str(tiny_yaml(tmp_path, out)),
            *(["--eval-only"] if mode == "eval_only" else []),
            *(["--resume"] if mode == "resume_without_checkpoint" else []),
            "MODEL.WEIGHTS", str(weights)]
    _refused_cli(tally, capsys, argv, "weights.pkl", "pathlib", "--trust-pickle")
    _no_code(tally, marker)


def test_last_checkpoint_naming_a_pickle_never_runs(run, tmp_path, tally, capsys):
    marker = tmp_path / "marker"
    evil_pickle(run / "model_9.pkl", marker)
    (run / "last_checkpoint").write_text("model_9.pkl")
    (run / "model_final.pth").unlink()
    _refused_cli(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
                 "model_9.pkl", "--trust-pickle")
    _no_code(tally, marker)
    _refused_cli(tally, capsys, ["train", "--config-file", str(tiny_yaml(tmp_path, run)),
                                 "--resume"], "cannot resume")
    _no_code(tally, marker)


def test_snapshot_file_with_code_never_runs(run, tmp_path, tally, capsys):
    marker = tmp_path / "marker"
    victim = run / "ema_snapshots" / "sigma0.1_step00000004.pth"
    size = victim.stat().st_size
    evil_torch_file(victim, marker)
    index = run / "ema_snapshots" / "index.json"
    data = json.loads(index.read_text())
    for e in data["snapshots"]:
        if e["file"] == victim.name:
            e["bytes"], e["crc32"] = victim.stat().st_size, file_crc32(victim)
    index.write_text(json.dumps(data))
    assert size != victim.stat().st_size
    tally["bad_inputs"] += 1
    with pytest.raises(D2EMAError, match="cannot be read"):
        list(reconstruct(run / "ema_snapshots", [Target("sigma_rel", 0.07)]))
    tally["refused_cleanly"] += 1
    _no_code(tally, marker)
    model = run / "last.pth"
    evil_torch_file(model, marker)
    _refused_cli(tally, capsys, ["export", str(model), "-o", str(tmp_path / "o.pth")], "last.pth")
    _no_code(tally, marker)


# ----------------------------------------------------------------------------- saved configs
def _tag(marker: Path) -> str:
    return f"!!python/object/apply:os.makedirs [{str(marker)!r}]"


def test_run_config_with_python_tag_is_refused_everywhere(run, tmp_path, tally, capsys):
    marker = tmp_path / "marker"
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("SEED: 3", f"SEED: {_tag(marker)}"))
    _refused_cli(tally, capsys, ["train", "--config-file", str(config), "--resume"],
                 "python/object/apply:os.makedirs")
    _no_code(tally, marker)
    _refused_cli(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
                 "python/object/apply:os.makedirs")
    _no_code(tally, marker)
    out = tmp_path / "export.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "ema_state": {"w": torch.ones(2)}},
               run / "model_final.pth")
    _refused_cli(tally, capsys, ["export", str(run / "model_final.pth"), "-o", str(out)],
                 "config.yaml")
    _no_code(tally, marker)
    assert not out.exists() and not out.with_suffix(".yaml").exists()  # the pair, or nothing


LAZY_CODE = {  # what a LazyConfig's saved yaml could name to run code
    "target": ("  _target_: os.makedirs\n  name: {m!r}\n", "model._target_ = 'os.makedirs'"),
    "d2ema_command": ("  _target_: d2ema.cli.main\n  argv: [demo, -o, {m!r}]\n",
                      "'d2ema.cli.main'"),
    "name_tag": ("  _target_: detectron2.modeling.build_model\n  cfg: !!python/name:os.system ''\n",
                 "python/name:os.system"),
    "partial": ("  _target_: detectron2.modeling.build_model\n  cfg: !!python/object/apply:"
                "functools.partial [!!python/name:os.makedirs '', {m!r}]\n",
                "python/name:os.makedirs"),
}


@pytest.mark.parametrize("case", sorted(LAZY_CODE))
def test_lazy_run_config_cannot_name_code(run, tmp_path, case, tally, capsys):
    marker = tmp_path / "marker"
    model, expected = LAZY_CODE[case]
    (run / "config.yaml").write_text(
        "train:\n  output_dir: x\n  max_iter: 1\nmodel:\n" + model.format(m=str(marker))
        + "dataloader: {}\noptimizer: {}\nlr_multiplier: {}\n")
    _refused_cli(tally, capsys, ["train", "--config-file", str(run / "config.yaml"), "--resume"],
                 expected)
    _no_code(tally, marker)


def test_lazy_run_config_of_library_classes_stays_loadable(run):
    """What LazyConfig.save writes for ``partial(nn.LayerNorm, eps=1e-6)`` and ``nn.GELU``."""
    import functools

    import yaml

    from d2ema.d2.config.saved import check_saved_config

    (run / "config.yaml").write_text(yaml.dump({
        "model": {"_target_": "detectron2.modeling.GeneralizedRCNN", "act": torch.nn.GELU,
                  "norm": functools.partial(torch.nn.LayerNorm, eps=1e-6)},
        "train": {"output_dir": "x"}}))
    check_saved_config(run / "config.yaml")


def test_a_users_own_config_stays_code(tmp_path):
    """A config the user wrote (not in a run folder) may use Python tags, as in detectron2."""
    from d2ema.d2.engine.train_net import load_config

    path = tiny_yaml(tmp_path, tmp_path / "out")
    path.write_text(path.read_text().replace("SEED: 3", "SEED: !!python/object/apply:eval "
                                             "['2 + 5']"))
    assert load_config(str(path)).SEED == 7


@pytest.mark.parametrize("name", ["config.yaml", "metrics.json", "log.txt", "model_final.pth",
                                  "ema_snapshots/index.json"])
def test_planted_links_make_a_training_write_nothing_outside(run, name, tmp_path, tally,
                                                             capsys):
    """detectron2 writes config.yaml, log.txt and metrics.json into OUTPUT_DIR following links;
    a link leading out of the folder is refused before anything is written (by posthoc too)."""
    victim = tmp_path / "OUTSIDE" / "victim.txt"
    victim.write_text("keep me")
    (run / name).unlink(missing_ok=True)
    os.symlink(victim, run / name)
    before = snapshot(tmp_path / "OUTSIDE")
    _refused_cli(tally, capsys, ["train", "--config-file", str(tiny_yaml(tmp_path, run)),
                                 "--resume"], "symbolic link", "victim.txt")
    _refused_cli(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
                 "symbolic link", "victim.txt")
    _untouched(tally, tmp_path / "OUTSIDE", before)


def test_export_reads_no_config_from_outside_the_run(run, tmp_path, tally, capsys):
    victim = tmp_path / "OUTSIDE" / "secret.yaml"
    victim.write_text("MODEL:\n  WEIGHTS: secret\n")
    (run / "config.yaml").unlink()
    os.symlink(victim, run / "config.yaml")
    torch.save({"model": {"w": torch.zeros(2)}, "ema_state": {"w": torch.ones(2)}},
               run / "model_final.pth")
    out = tmp_path / "export.pth"
    _refused_cli(tally, capsys, ["export", str(run / "model_final.pth"), "-o", str(out)],
                 "symbolic link", "secret.yaml", "--config")
    assert not out.exists() and not out.with_suffix(".yaml").exists()
