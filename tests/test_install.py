"""The environment the repo builds: real detectron2 v0.6 without compiled ops, and its installer."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
INSTALLER = ROOT / "tools" / "install_detectron2.py"


def run_installer(sdist: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "D2EMA_DETECTRON2_SDIST": str(sdist)}
    return subprocess.run(
        [sys.executable, str(INSTALLER)], env=env, capture_output=True, text=True, timeout=120
    )


def fake_sdist(path: Path) -> Path:
    """A well-formed tar.gz that is not the pinned sdist (a substituted file)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"print('not detectron2')\n"
        info = tarfile.TarInfo("pb1-detectron2-0.6/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("kind", ["substituted", "corrupted"])
def test_wrong_sdist_hash_stops_the_install(tmp_path, kind):
    sdist = tmp_path / "pb1-detectron2-0.6.tar.gz"
    if kind == "substituted":
        fake_sdist(sdist)
    else:
        sdist.write_bytes(gzip.compress(b"\x00" * 1000)[:-7])
    before = subprocess.run(
        [sys.executable, "-m", "pip", "show", "-f", "pb1-detectron2"], capture_output=True
    ).stdout
    result = run_installer(sdist)
    assert result.returncode == 1
    assert "sha256" in result.stderr and "corrupted or substituted" in result.stderr
    assert "Nothing was installed" in result.stderr
    after = subprocess.run(
        [sys.executable, "-m", "pip", "show", "-f", "pb1-detectron2"], capture_output=True
    ).stdout
    assert before == after


def test_second_run_leaves_an_installed_detectron2_alone():
    result = subprocess.run(
        [sys.executable, str(INSTALLER)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "already importable; leaving it alone" in result.stdout


def test_compiled_ops_raise_a_clear_error():
    from detectron2 import _C
    from detectron2.layers import nms_rotated

    assert getattr(_C, "D2EMA_STUB", False)
    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match=r"detectron2\._C\.nms_rotated is a compiled op"):
        nms_rotated(boxes, torch.ones(1), 0.5)
    with pytest.raises(RuntimeError, match="use_fast_impl=False"):
        _C.COCOevalAccumulate()


def test_detectron2_retinanet_r18_fpn_trains_one_step_on_cpu():
    import detectron2
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.collect_env import collect_env_info
    from detectron2.utils.events import EventStorage

    from d2ema.app.model_configs import tiny_detector_config

    assert detectron2.__version__ == "0.6"
    assert "detectron2" in collect_env_info()  # works with the _C stub
    torch.manual_seed(0)
    model = build_model(tiny_detector_config("retinanet", num_classes=3, image_size=96))
    inst = Instances(
        (96, 96),
        gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0]])),
        gt_classes=torch.tensor([1]),
    )
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": inst}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
