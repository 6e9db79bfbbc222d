"""d2ema runs wherever detectron2 runs: ``d2ema train`` on your own COCO data, ``d2ema posthoc
--eval`` and ``d2ema export`` work in a process where OpenCV and scikit-learn cannot be imported
(neither is a requirement of detectron2; detectron2 imports OpenCV only inside ``try``). The
demo's datasets need OpenCV, and say so in one line when it is missing.

The optional packages are blocked as an environment without them would be: ``None`` in
``sys.modules`` makes every ``import cv2`` raise ImportError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2ema.app.data.registry import ensure_dataset, get_dataset_spec
from d2ema.app.model_configs import tiny_detector_config

OPTIONAL = ("cv2", "sklearn")  # detectron2's setup.py requires neither

_CHILD = """
import json, os, sys
blocked = os.environ["D2EMA_TEST_BLOCK"].split(",")
for name in blocked:
    sys.modules[name] = None
from d2ema.cli import main
rc = main(sys.argv[1:])
print("IMPORTED " + json.dumps([m for m in blocked if sys.modules.get(m) is not None]))
sys.exit(rc)
"""


def _d2ema(*argv: str, blocked=OPTIONAL) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "D2EMA_TEST_BLOCK": ",".join(blocked)}
    child = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, (child.stdout + child.stderr)[-3000:]
    assert "IMPORTED []" in child.stdout
    return child.stdout + child.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny RetinaNet config on two small COCO sets given with --dataset (written here, with
    OpenCV: the child process only reads them)."""
    root = tmp_path_factory.mktemp("data")
    datasets = []
    for name, source, size in (("own_train", "shapes_train", 8), ("own_val", "shapes_val", 4)):
        files = ensure_dataset(get_dataset_spec(source, size), root)
        datasets += ["--dataset", f"{name}={files.json_file}:{files.image_root}"]
    cfg = tiny_detector_config("retinanet", num_classes=5, image_size=64)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("own_train",), ("own_val",)
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SEED = 2, 3, 0
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.POSTHOC.ENABLED, cfg.MODEL_EMA.POSTHOC.PERIOD = True, 1
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(cfg.dump())
    return path, datasets


def test_train_posthoc_and_export_without_opencv(project, tmp_path):
    path, datasets = project
    out = tmp_path / "run"
    printed = _d2ema("train", "--config-file", str(path), *datasets, "OUTPUT_DIR", str(out))
    assert "[d2ema train] done" in printed and (out / "model_final.pth").is_file()
    printed = _d2ema("posthoc", str(out), "--eval", "--sigma-rel", "0.05,0.1")
    assert "best: " in printed or "raw weights beat" in printed
    assert json.loads((out / "posthoc" / "results.json").read_text())["rows"]
    printed = _d2ema("export", str(out / "model_final.pth"), "-o", str(tmp_path / "ema.pth"))
    assert (tmp_path / "ema.pth").is_file()


def test_demo_data_without_opencv_says_what_to_install(tmp_path):
    """Drawing a demo image without OpenCV: one line naming the package."""
    child = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['cv2'] = None\n"
         "from d2ema.app.data.registry import ensure_dataset, get_dataset_spec\n"
         f"ensure_dataset(get_dataset_spec('shapes_val', 2), {str(tmp_path)!r})"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True,
        text=True, timeout=300)
    assert child.returncode != 0
    last = child.stderr.strip().splitlines()[-1]
    assert last.startswith("d2ema.errors.DatasetError: the demo datasets need OpenCV")
    assert "pip install opencv-python-headless" in last
    assert not list(Path(tmp_path).glob("shapes_val-*/annotations.json"))  # nothing half-written
