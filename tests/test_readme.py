"""The README's detectron2 quick start, run as written: it trains and evaluates raw and EMA."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from _user_project import BASE_RETINANET, child_yaml, write_coco_split
from detectron2.data import DatasetCatalog, MetadataCatalog

README = Path(__file__).resolve().parent.parent / "README.md"
NAMES = ("my_train", "my_val")


def quick_start_block() -> str:
    text = README.read_text()
    section = text.split("## Quick start: detectron2", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


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
    child = child_yaml("coco_2017_train", "coco_2017_val")  # the snippet sets the datasets
    (tmp_path / "my_config.yaml").write_text(child.replace("../Base-RetinaNet", "Base-RetinaNet"))
    monkeypatch.chdir(tmp_path)
    _unregister()
    yield tmp_path
    _unregister()


@pytest.mark.usefixtures("restore_loggers")
def test_readme_detectron2_quick_start_trains_and_evaluates(readme_files):
    namespace: dict = {}
    exec(compile(quick_start_block(), str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    results = trainer._last_eval_results  # what detectron2's final EvalHook reported
    assert set(results) == {"bbox", "ema/bbox"}
    assert "AP" in results["bbox"] and "AP" in results["ema/bbox"]
    assert (readme_files / "output" / "model_final.pth").is_file()
