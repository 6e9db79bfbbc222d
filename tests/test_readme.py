"""The detectron2 quick starts of README.md and docs/getting-started.md, run as written: the
Python block trains and evaluates raw and EMA, the eval-only block of docs/detectron2.md scores
its checkpoint's EMA, and the command-line block trains, resumes, evaluates and exports."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("detectron2")

import torch
from _doc_blocks import doc_block, doc_commands
from _user_project import BASE_RETINANET, child_yaml, write_coco_split
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2ema.cli import main

NAMES = ("my_train", "my_val")


def _unregister() -> None:
    for name in NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture
def readme_files(tmp_path, monkeypatch):
    """train.json, val.json, images/ and my_config.yaml (with _BASE_) in the working folder."""
    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2)):
        json_file, image_dir = write_coco_split(data, split, count, seed=len(split))
        coco = json.loads(json_file.read_text())
        for image in coco["images"]:
            image["file_name"] = f"{split}/{image['file_name']}"
        (tmp_path / f"{split}.json").write_text(json.dumps(coco))
        shutil.copytree(image_dir, tmp_path / "images" / split)
    (tmp_path / "Base-RetinaNet.yaml").write_text(BASE_RETINANET)
    child = child_yaml(*NAMES)  # the user's config names the datasets (the snippet sets them too)
    (tmp_path / "my_config.yaml").write_text(child.replace("../Base-RetinaNet", "Base-RetinaNet"))
    monkeypatch.chdir(tmp_path)
    _unregister()
    yield tmp_path
    _unregister()


@pytest.mark.usefixtures("restore_loggers")
def test_detectron2_quick_start_trains_and_evaluates(readme_files):
    namespace: dict = {}
    exec(compile(doc_block("detectron2-quick-start"), "detectron2-quick-start", "exec"), namespace)
    trainer = namespace["trainer"]
    results = trainer._last_eval_results  # what detectron2's final EvalHook reported
    assert set(results) == {"bbox", "ema/bbox"}
    assert "AP" in results["bbox"] and "AP" in results["ema/bbox"]
    assert (readme_files / "output" / "model_final.pth").is_file()

    # docs/detectron2.md: the checkpoint's EMA scored in the user's own eval script
    from d2ema.d2 import EMACheckpointer, EMATrainer, get_model_ema

    cfg = namespace["cfg"].clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = "output/model_final.pth"
    ns = {"cfg": cfg, "Trainer": EMATrainer, "EMACheckpointer": EMACheckpointer,
          "get_model_ema": get_model_ema}
    exec(compile(doc_block("evaluate-checkpoint-ema"), "evaluate-checkpoint-ema", "exec"), ns)
    assert set(ns["results"]) == {"bbox", "ema/bbox"}
    saved = torch.load("output/model_final.pth", map_location="cpu", weights_only=True)
    ema = get_model_ema(ns["model"])
    assert ema.state_dict()["ema_meta"]["step"] == saved["ema_meta"]["step"] == 2
    for name, value in saved["ema_state"].items():
        assert torch.equal(ema.tensors()[name].cpu(), value), name


@pytest.mark.usefixtures("restore_loggers")
def test_command_line_quick_start(readme_files, capsys):
    """Train with the datasets given on the command line, resume from the run's config,
    evaluate the EMA, export it: each command as written, in the order written."""
    commands = doc_commands("command-line-quick-start")
    assert [c[0] for c in commands] == ["train", "train", "train", "export"]
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        _unregister()  # the next command registers the run's datasets again, as a new process
    out = readme_files / "output"
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    exported = torch.load(readme_files / "model_ema.pth", map_location="cpu", weights_only=True)
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert exported["model"].keys() <= saved["ema_state"].keys()
    for name, value in exported["model"].items():
        assert torch.equal(value, saved["ema_state"][name]), name
    assert (readme_files / "model_ema.yaml").is_file()
