"""``MODEL_EMA.POSTHOC.SELECT``: a ``d2ema train`` run chooses its EMA length at the end.

One tiny RetinaNet run (6 iterations, a snapshot every iteration) with SELECT on; the other
tests resume copies of it (a finished run resumed with SELECT on runs the selection only).
Datasets are tiny copies of the embedded shapes sets passed with ``--dataset``, so that the
spawned processes of ``--num-gpus 2`` and a killed child see the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import _select_helpers
import pytest
import torch
from _loggers import loggers_restored
from test_cli import _error_line

from d2ema.app.data.registry import ensure_dataset, get_dataset_spec
from d2ema.app.model_configs import tiny_detector_config
from d2ema.cli import build_parser, main
from d2ema.d2.engine.train_net import train_main
from d2ema.d2.evaluation import select as posthoc_select
from d2ema.posthoc import Target, reconstruct

pytestmark = pytest.mark.usefixtures("restore_loggers")
SELECT = ["MODEL_EMA.POSTHOC.ENABLED", "True", "MODEL_EMA.POSTHOC.PERIOD", "1",
          "MODEL_EMA.POSTHOC.SELECT", "True"]
OUTPUTS = ("model_final_posthoc.pth", "model_final_posthoc.yaml", "posthoc")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config path, --dataset arguments): sel_train (16 images), sel_val (6), sel_hold (6)."""
    root = tmp_path_factory.mktemp("data")
    datasets = []
    for name, source, size in (("sel_train", "shapes_train", 16), ("sel_val", "shapes_val", 6),
                               ("sel_hold", "shapes_train", 6)):
        files = ensure_dataset(get_dataset_spec(source, size), root)
        datasets += ["--dataset", f"{name}={files.json_file}:{files.image_root}"]
    cfg = tiny_detector_config("retinanet", num_classes=5, image_size=64)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("sel_train",), ("sel_val",)
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SEED = 2, 6, 0
    cfg.MODEL_EMA.ENABLED, cfg.MODEL_EMA.DECAY = True, 0.5
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(cfg.dump())
    return path, datasets


def train(setup, out, *extra, opts=()) -> tuple[int, str]:
    path, datasets = setup
    printed = io.StringIO()
    with loggers_restored(), contextlib.redirect_stdout(printed):
        rc = main(["train", "--config-file", str(path), *datasets, *extra, "OUTPUT_DIR", str(out),
                   *SELECT, *opts])
    return rc, printed.getvalue()


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    """The run, its selection scored by :func:`_select_helpers.weight_score` (real AP: all 0)."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        weight_scored(patch)
        rc, printed = train(setup, out)
    assert rc == 0, printed
    return out, printed


def weight_scored(patch) -> None:
    patch.setattr(posthoc_select, "_evaluate", posthoc_select._evaluate)  # restored after
    _select_helpers.weight_score(None)


def finished_copy(run_dir: Path, dst: Path) -> Path:
    """The finished run without what the selection wrote."""
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(*OUTPUTS))
    return dst


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and (p.suffix == ".pth" or "ema_snapshots" in p.parts) and "posthoc" not in p.name}


def test_selection_writes_the_chosen_ema_and_reports_it(run):
    out, printed = run
    data = json.loads((out / "posthoc" / "results.json").read_text())
    chosen = data["chosen"]
    assert data["select_on"] == data["report_on"] == "sel_val" and data["optimistic"] is True
    swept = [r for r in data["rows"] if r["kind"] == "sigma_rel"]
    assert len(swept) >= 3 and chosen["target"] in {r["target"] for r in swept}
    # the file is the chosen length rebuilt from the snapshots, the rest the raw weights
    rec = next(reconstruct(out / "ema_snapshots", [Target("sigma_rel", chosen["value"])]))
    exported = torch.load(out / "model_final_posthoc.pth", weights_only=True)
    raw = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert set(exported["model"]) == set(raw)  # (non-persistent buffers are not exported)
    for name, value in exported["model"].items():
        expected = rec.tensors[name] if name in rec.tensors else raw[name]
        assert torch.equal(value, expected.to(value.dtype)), name
    assert exported["d2ema_export"]["posthoc"] == chosen["target"]
    plain = (out / "model_final_posthoc.yaml").read_text()
    assert "MODEL_EMA" not in plain and f"WEIGHTS: {out / 'model_final_posthoc.pth'}" in plain
    # the curve: one scalar per length in metrics.json and TensorBoard, at MAX_ITER
    last = json.loads((out / "metrics.json").read_text().splitlines()[-1])
    tags = {f"posthoc/sel_val/sigma{r['value']:g}/bbox/AP" for r in swept}
    assert last["iteration"] == 6 and tags <= set(last) and "posthoc/sel_val/chosen/bbox/AP" in last
    assert "posthoc/sel_val/raw/bbox/AP" in last  # each tag names the dataset it was scored on
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = set()
    for events in out.glob("events.out.tfevents.*"):
        seen |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert tags <= seen
    # the summary: chosen length, selection set, test AP; the optimism said once
    summary = [line for line in printed.splitlines() if "post-hoc EMA: chose" in line]
    assert len(summary) == 1
    assert f"chose {chosen['target']} on sel_val, the test set itself" in summary[0]
    assert "chosen EMA AP" in summary[0] and "(optimistic)" in summary[0]
    assert printed.count("is optimistic") == 1
    assert summary[0][summary[0].index("post-hoc EMA"):] in (out / "log.txt").read_text()
    assert "posthoc/bbox/AP=" in next(line for line in printed.splitlines()
                                      if "final evaluation:" in line)
    assert (out / "posthoc" / "ap_vs_length.png").stat().st_size > 1000
    table = (out / "posthoc" / "table.txt").read_text().splitlines()
    assert [line.split()[1] for line in table if line.startswith("sigma_rel")] == [
        f"{r['value']:g}" for r in swept]
    assert table[-1].startswith("misfit: how far") and "sum|x|: " in table[-1]  # the legend
    assert table[-1] in printed
    assert data["raw_won"] is False
    assert data["verdict"] == f"{chosen['target']} is the best on sel_val"


def test_raw_weights_that_beat_every_length_are_handed_back(setup, run, tmp_path, monkeypatch):
    """The evaluation is faked so that the raw weights beat every length on the held-out set:
    the run hands back the raw weights and every output says so."""
    def fake(trainer, dataset, label):
        ap = 60.0 if label == "raw weights" and dataset == "sel_hold" else 30.0 \
            if label == "chosen raw weights" else 20.0 + len(label) / 10
        return {"bbox": {"AP": ap, "AP50": ap}}

    monkeypatch.setattr(posthoc_select, "_evaluate", fake)
    out = finished_copy(run[0], tmp_path / "raw")
    rc, printed = train(setup, out, "--resume", opts=["MODEL_EMA.POSTHOC.SELECT_ON", "sel_hold"])
    assert rc == 0, printed
    data = json.loads((out / "posthoc/results.json").read_text())
    assert data["raw_won"] is True and data["chosen"]["target"] == "raw weights"
    assert data["verdict"] == "raw weights beat every EMA length on sel_hold"
    table = (out / "posthoc" / "table.txt").read_text().splitlines()
    assert table[-2] == "chosen: raw weights beat every EMA length on sel_hold"
    assert data["chosen"]["AP"] == 60.0 and data["chosen"]["test_AP"] == 30.0
    exported = torch.load(out / "model_final_posthoc.pth", weights_only=True)
    raw = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert set(exported["model"]) == set(raw)
    assert all(torch.equal(v, raw[n].to(v.dtype)) for n, v in exported["model"].items())
    assert exported["d2ema_export"]["posthoc"] == "raw weights"
    assert "post-hoc EMA: raw weights beat every EMA length on sel_hold (held out): AP 60.00" \
        in printed and "so the raw weights are kept" in printed and "chosen AP 30.00" in printed
    last = json.loads((out / "metrics.json").read_text().splitlines()[-1])
    assert last["posthoc/sel_hold/raw/bbox/AP"] == 60.0
    assert last["posthoc/sel_val/chosen/bbox/AP"] == 30.0 and "posthoc/chosen_sigma_rel" not in last
    assert (out / "posthoc" / "ap_vs_length.png").stat().st_size > 1000


def test_select_on_a_held_out_set_is_honoured(setup, run, tmp_path, monkeypatch):
    """The evaluation is faked so that each set favours one length: sel_val (the test set)
    sigma_rel 0.05, sel_hold 0.1. Choosing on sel_hold must pick 0.1 and report it on
    sel_val; choosing on the test set picks 0.05."""
    favourite = {"sel_val": "sigma_rel 0.05", "sel_hold": "sigma_rel 0.1"}
    calls = []

    def fake(trainer, dataset, label):
        calls.append((dataset, label))
        ap = 40.0 if label == "chosen sigma_rel 0.1" else 50.0 if favourite[dataset] == label \
            else 10.0
        return {"bbox": {"AP": ap, "AP50": ap}}

    monkeypatch.setattr(posthoc_select, "_evaluate", fake)
    test_set = finished_copy(run[0], tmp_path / "test_set")
    assert train(setup, test_set, "--resume")[0] == 0
    assert json.loads((test_set / "posthoc/results.json").read_text())["chosen"]["target"] \
        == "sigma_rel 0.05"
    calls.clear()
    held = finished_copy(run[0], tmp_path / "held")
    rc, printed = train(setup, held, "--resume",
                        opts=["MODEL_EMA.POSTHOC.SELECT_ON", "sel_hold"])
    assert rc == 0
    data = json.loads((held / "posthoc/results.json").read_text())
    assert data["chosen"]["target"] == "sigma_rel 0.1" and data["optimistic"] is False
    assert data["test_AP"]["chosen"] == data["chosen"]["test_AP"] == 40.0
    assert {d for d, _ in calls[:-1]} == {"sel_hold"} and calls[-1] == (
        "sel_val", "chosen sigma_rel 0.1")
    assert "chose sigma_rel 0.1 on sel_hold (held out)" in printed
    assert "chosen EMA AP 40.00;" in printed and "is optimistic" not in printed


_KILL_CHILD = """
import os, signal, sys
import _select_helpers
from d2ema.d2.evaluation import select as posthoc_select
_select_helpers.weight_score(None)
real, calls = posthoc_select._evaluate, []
def evaluate(trainer, dataset, label):
    calls.append(label)
    if len(calls) == 3:  # the raw weights and one length scored: in the middle of the sweep
        os.kill(os.getpid(), signal.SIGKILL)
    return real(trainer, dataset, label)
posthoc_select._evaluate = evaluate
from d2ema.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_selection_then_resume_completes_it(setup, run, tmp_path, monkeypatch):
    out = finished_copy(run[0], tmp_path / "run")
    before = digests(out)
    path, datasets = setup
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", _KILL_CHILD, "train", "--config-file", str(path), *datasets,
         "--resume", "OUTPUT_DIR", str(out), *SELECT], env=env, capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert digests(out) == before  # checkpoints and snapshots untouched
    assert not any((out / name).exists() for name in OUTPUTS[:2])
    assert not [p for p in out.rglob("*.tmp")]
    weight_scored(monkeypatch)
    rc, printed = train(setup, out, "--resume")
    assert rc == 0 and "post-hoc EMA: chose" in printed
    assert digests(out) == before
    data = json.loads((out / "posthoc/results.json").read_text())
    assert data["chosen"]["target"] == json.loads(
        (run[0] / "posthoc/results.json").read_text())["chosen"]["target"]
    assert (out / "model_final_posthoc.pth").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode runs where there is no GPU")
def test_two_processes_choose_as_one(setup, run, tmp_path):
    """The finished run's selection (one process) against its selection resumed by 2
    processes (gloo), both scored by :func:`_select_helpers.weight_score` (a score of the
    weights every process holds, so a process left without the rebuilt weights changes it)."""
    path, datasets = setup
    out = finished_copy(run[0], tmp_path / "two")
    args = build_parser().parse_args(
        ["train", "--config-file", str(path), *datasets, "--resume", "--num-gpus", "2",
         "OUTPUT_DIR", str(out), *SELECT])
    with loggers_restored(), contextlib.redirect_stdout(io.StringIO()):
        assert train_main(args, prepare=_select_helpers.weight_score) == 0
    assert (out / "model_final_posthoc.pth").is_file()
    one = json.loads((run[0] / "posthoc/results.json").read_text())
    two = json.loads((out / "posthoc/results.json").read_text())
    assert two["chosen"]["target"] == one["chosen"]["target"]
    assert [(r["target"], r["AP"]) for r in two["rows"]] == [
        (r["target"], r["AP"]) for r in one["rows"]]
    assert len({r["AP"] for r in one["rows"]}) > 2  # the score tells the lengths apart


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["MODEL_EMA.POSTHOC.ENABLED", "False"],
         "MODEL_EMA.POSTHOC.SELECT = True chooses among post-hoc EMAs, but "
         "MODEL_EMA.POSTHOC.ENABLED is False"),
        (["MODEL_EMA.POSTHOC.SELECT_ON", "sel_hol"], "unknown dataset 'sel_hol' in "
         "MODEL_EMA.POSTHOC.SELECT_ON (did you mean 'sel_hold'?)"),
        (["MODEL_EMA.POSTHOC.SELECT_SIGMA_RELS", "[0.05, 0.4]"],
         "MODEL_EMA.POSTHOC.SELECT_SIGMA_RELS = [0.05, 0.4] must be a list of distinct numbers"),
        (["MODEL_EMA.POSTHOC.SELECT_SIGMA_RELS", "[0.05, 0.003]"],
         "MODEL_EMA.POSTHOC.SELECT_SIGMA_RELS: sigma_rel 0.003 is outside what the snapshots "
         "can represent"),
        (["MODEL_EMA.POSTHOC.SELECT", "1"], "MODEL_EMA.POSTHOC.SELECT"),
        (["DATASETS.TEST", "()"], "DATASETS.TEST is empty"),
    ],
)
def test_refused_before_training(setup, tmp_path, capsys, opts, message):
    path, datasets = setup
    with loggers_restored():
        rc = main(["train", "--config-file", str(path), *datasets, "OUTPUT_DIR", str(tmp_path),
                   *SELECT, *opts])
    assert rc == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_posthoc_command_select_on(run, tmp_path, capsys):
    """``d2ema posthoc --select-on``: the run's config.yaml records its --dataset sets."""
    out = finished_copy(run[0], tmp_path / "run")
    assert main(["posthoc", str(out), "--eval", "--sigma-rel", "0.05,0.1", "--select-on",
                 "sel_hold"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "posthoc/results.json").read_text())
    assert data["select_on"] == "sel_hold" and data["report_on"] == "sel_val"
    best = next(r for r in data["rows"] if r["target"] in printed.split("best: ")[1])
    assert f"on sel_hold; on the test set AP {best['test_AP']:.1f}" in printed
    assert main(["posthoc", str(out), "--eval", "--select-on", "nope"]) == 2
    assert "--select-on nope: no dataset of that name is registered" in _error_line(capsys)


def test_posthoc_command_hands_back_raw_weights_that_win(run, tmp_path, capsys, monkeypatch):
    """``d2ema posthoc --eval --select-on --export-best``, the raw weights scoring best (the
    evaluation faked): the export holds the raw weights and the command says why."""
    from d2ema.d2.evaluation.run_eval import RunEvaluator

    real = RunEvaluator.evaluate

    def fake(self, tensors, dataset=None):
        real(self, tensors, dataset)  # the weights are loaded as for a real evaluation
        ap = 50.0 if tensors is None else 10.0
        return {"bbox": {"AP": ap, "AP50": ap}}

    monkeypatch.setattr(RunEvaluator, "evaluate", fake)
    out = finished_copy(run[0], tmp_path / "run")
    best = tmp_path / "best.pth"
    assert main(["posthoc", str(out), "--eval", "--sigma-rel", "0.05,0.1", "--select-on",
                 "sel_hold", "--export-best", str(best)]) == 0
    printed = capsys.readouterr().out
    assert "raw weights beat every EMA length on sel_hold (AP 50.0" in printed
    exported = torch.load(best, weights_only=True)
    raw = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(v, raw[n].to(v.dtype)) for n, v in exported["model"].items())
    assert exported["d2ema_export"]["posthoc"] == "raw weights"


def test_lazy_config_refused_with_the_alternative():
    from omegaconf import OmegaConf

    from d2ema.errors import ConfigError

    cfg = OmegaConf.create({"train": {"model_ema": {"posthoc": {"select": True}}}})
    with pytest.raises(ConfigError, match="d2ema posthoc OUTPUT_DIR --eval --export-best"):
        posthoc_select.check_selection(cfg)


def test_docs_block_posthoc_select(setup, tmp_path, monkeypatch):
    """docs/ema-length.md's command, run as written in a folder holding what it names."""
    from _doc_blocks import doc_commands

    path, datasets = setup
    monkeypatch.chdir(tmp_path)
    for spec, split in zip(datasets[1::2], ("train", "val", "holdout")):
        json_file, images = spec.split("=", 1)[1].split(":")
        shutil.copy(json_file, f"{split}.json")
        shutil.copytree(images, f"{split}_images")
    Path("cfg.yaml").write_text(path.read_text().replace("sel_train", "my_train")
                                .replace("sel_val", "my_val"))
    [argv] = doc_commands("posthoc-select")
    printed = io.StringIO()
    with loggers_restored(), contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    data = json.loads(Path("output/posthoc/results.json").read_text())
    assert data["select_on"] == "my_holdout" and data["report_on"] == "my_val"
    assert Path("output/model_final_posthoc.pth").is_file()
    assert "on my_holdout (held out)" in printed.getvalue()
