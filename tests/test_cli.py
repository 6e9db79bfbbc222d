"""The ``d2ema`` command line: helpful one-line errors, and ``train`` (YAML and LazyConfig)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.engine import DefaultTrainer

from d2ema.app.data import register_datasets
from d2ema.app.model_configs import tiny_detector_config
from d2ema.cli import main

CONSOLE_SCRIPT = Path(sys.executable).parent / "d2ema"


pytestmark = pytest.mark.usefixtures("restore_loggers")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- errors
def test_unknown_dataset(capsys, tmp_path):
    assert main(["demo", "--dataset", "coco", "--output", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "unknown dataset 'coco'" in line and "shapes" in line and "digits" in line


def test_missing_config(capsys, tmp_path):
    assert main(["train", "--config-file", str(tmp_path / "nope.yaml")]) == 2
    line = _error_line(capsys)
    assert "does not exist" in line and "nope.yaml" in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("MODEL: [unclosed\n", "not valid YAML"),
        ("NOT_A_KEY: 1\n", "NOT_A_KEY"),
    ],
)
def test_unreadable_config(capsys, tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["train", "--config-file", str(path)]) == 2
    assert expected in _error_line(capsys)


def test_config_is_a_folder(capsys, tmp_path):
    folder = tmp_path / "cfg.yaml"
    folder.mkdir()
    assert main(["train", "--config-file", str(folder)]) == 2
    assert "not a file" in _error_line(capsys)


def test_broken_lazy_config(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("train = dict(\n")
    assert main(["train", "--config-file", str(path)]) == 2
    assert "cannot load LazyConfig" in _error_line(capsys)
    path.write_text("train = dict(device='cpu', max_iter=1)\n")
    assert main(["train", "--config-file", str(path)]) == 2
    assert "defines no model, dataloader, optimizer, lr_multiplier" in _error_line(capsys)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    """A tiny RetinaNet config on the embedded shapes datasets (small copies of them)."""
    root = tmp_path_factory.mktemp("data")
    register_datasets(root=root, sizes={"shapes_train": 16, "shapes_val": 6},
                      names=["shapes_train", "shapes_val"])
    cfg = tiny_detector_config("retinanet", num_classes=5, image_size=64)
    cfg.DATASETS.TRAIN = ("shapes_train",)
    cfg.DATASETS.TEST = ("shapes_val",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 2
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.DECAY = 0.5
    cfg.SEED = 0
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(cfg.dump())
    return path


def test_invalid_ema_override(capsys, tiny_yaml, tmp_path):
    rc = main(["train", "--config-file", str(tiny_yaml), "MODEL_EMA.DECAY", "1.5",
               "OUTPUT_DIR", str(tmp_path)])
    assert rc == 2
    line = _error_line(capsys)
    assert "MODEL_EMA.DECAY" in line and "1.5" in line and "[0.0, 1.0]" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tiny_yaml):
    assert main(["train", "--config-file", str(tiny_yaml), "MODEL.DEVICE", "cuda"]) == 2
    line = _error_line(capsys)
    assert "no CUDA device" in line and "MODEL.DEVICE cpu" in line


def test_invalid_override_key(capsys, tiny_yaml):
    assert main(["train", "--config-file", str(tiny_yaml), "SOLVER.NO_SUCH_KEY", "1"]) == 2
    assert "SOLVER.NO_SUCH_KEY" in _error_line(capsys)


def test_missing_weights_for_eval_only(capsys, tiny_yaml, tmp_path):
    rc = main(["train", "--config-file", str(tiny_yaml), "--eval-only",
               "MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    assert rc == 2
    assert "missing.pth" in _error_line(capsys)


def test_missing_checkpoint_for_export(capsys, tmp_path):
    assert main(["export", str(tmp_path / "none.pth"), "-o", str(tmp_path / "o.pth")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_checkpoint_without_ema(capsys, tmp_path):
    src = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, src)
    assert main(["export", str(src), "-o", str(tmp_path / "o.pth")]) == 2
    assert "no EMA" in _error_line(capsys)


def test_verbose_shows_traceback(capsys, tmp_path):
    assert main(["export", "--verbose", str(tmp_path / "x.pth"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "does not exist" in err


@pytest.mark.parametrize("command", ["export", "train"])
def test_console_script_error(tmp_path, tiny_yaml, command):
    """The installed ``d2ema`` script: exit status 2 and one line, nothing else on stderr."""
    cmd = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "d2ema.cli"]
    if command == "export":
        cmd += ["export", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "o.pth")]
    else:
        cmd += ["train", "--config-file", str(tiny_yaml), "MODEL_EMA.DECAY", "1.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"d2ema {command}: error:")


def test_bench_passes_arguments_through(monkeypatch, capsys):
    import d2ema.app.speed.update_speed as speed

    def fake_main(argv=None, prog=None):
        print("bench got", argv, prog)
        return 0

    monkeypatch.setattr(speed, "main", fake_main)
    assert main(["bench", "--quick", "--models", "tiny500", "--help"]) == 0
    assert "bench got ['--quick', '--models', 'tiny500', '--help'] d2ema bench" in (
        capsys.readouterr().out
    )


def test_bench_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: d2ema bench") and "--seconds" in out


# ----------------------------------------------------------------------------- train
@pytest.fixture(scope="module")
def trained(tiny_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    saved = {n: list(logging.getLogger(n).handlers) for n in ("detectron2", "fvcore")}
    try:
        rc = main(["train", "--config-file", str(tiny_yaml), "SOLVER.MAX_ITER", "2",
                   "OUTPUT_DIR", str(out)])
    finally:
        for name, handlers in saved.items():
            logger = logging.getLogger(name)
            for h in [h for h in logger.handlers if h not in handlers]:
                logger.removeHandler(h)
    assert rc == 0
    return out


def _covers_model(checkpoint) -> None:
    """Every float weight of the model has its EMA (the EMA may also hold buffers that the
    model's state dict leaves out, e.g. detectron2's non-persistent pixel_mean/cell_anchors)."""
    floats = {n for n, t in checkpoint["model"].items() if t.is_floating_point()}
    assert floats <= set(checkpoint["ema_state"])


def test_train_writes_ema_checkpoint(trained):
    checkpoint = torch.load(trained / "model_final.pth", map_location="cpu", weights_only=True)
    _covers_model(checkpoint)
    assert checkpoint["ema_meta"]["step"] == 2
    model = checkpoint["model"]
    changed = [n for n, t in checkpoint["ema_state"].items()
               if n in model and t.is_floating_point() and not torch.equal(t, model[n])]
    assert changed  # decay 0.5: the average differs from the last weights
    assert (trained / "config.yaml").is_file()


@pytest.mark.parametrize("use_ema", [True, False])
def test_eval_only_uses_ema_weights(trained, tiny_yaml, monkeypatch, capsys, use_ema):
    checkpoint = torch.load(trained / "model_final.pth", map_location="cpu", weights_only=True)
    name = "head.cls_score.weight"
    evaluated = []
    plain_test = DefaultTrainer.__dict__["test"].__func__

    def recording_test(cls, cfg, model, evaluators=None):
        evaluated.append(dict(model.named_parameters())[name].detach().clone())
        return plain_test(cls, cfg, model, evaluators)

    monkeypatch.setattr(DefaultTrainer, "test", classmethod(recording_test))
    rc = main(["train", "--config-file", str(tiny_yaml), "--eval-only",
               "MODEL.WEIGHTS", str(trained / "model_final.pth"),
               "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", str(use_ema),
               "OUTPUT_DIR", str(trained / "eval")])
    assert rc == 0
    ema_w, raw_w = checkpoint["ema_state"][name], checkpoint["model"][name]
    assert not torch.equal(ema_w, raw_w)
    out = capsys.readouterr().out
    if use_ema:  # EVAL_BOTH (default True): raw, then EMA
        assert len(evaluated) == 2
        assert torch.equal(evaluated[0], raw_w) and torch.equal(evaluated[1], ema_w)
        assert "ema/bbox" in out
    else:
        assert len(evaluated) == 1 and torch.equal(evaluated[0], raw_w)
        assert "ema/bbox" not in out


LAZY_CONFIG = """
import torch
from detectron2.config import LazyCall as L
from detectron2.data import (DatasetMapper, build_detection_test_loader,
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import LinearParamScheduler
from omegaconf import OmegaConf

from d2ema.d2 import lazy_model_ema_defaults
from d2ema.app.model_configs import tiny_detector_config

model = L(build_model)(cfg=L(tiny_detector_config)(arch="retinanet", num_classes=5,
                                                   image_size=64))
resize = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=64)]
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
    mapper=L(DatasetMapper)(is_train=True, augmentations=resize, image_format="BGR"),
    total_batch_size=2, num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(is_train=False, augmentations=resize, image_format="BGR"),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="shapes_val", use_fast_impl=False)
optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(), lr=0.01, momentum=0.9, weight_decay=1e-4
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(LinearParamScheduler)(start_value=1.0, end_value=0.5), warmup_length=0.0,
    warmup_factor=1.0,
)
train = dict(
    output_dir="output/lazy", init_checkpoint="", max_iter=10, device="cpu",
    amp=dict(enabled=False), ddp=dict(broadcast_buffers=False, find_unused_parameters=False),
    checkpointer=dict(period=1000, max_to_keep=2), eval_period=0, log_period=20,
    model_ema={**lazy_model_ema_defaults(), "enabled": True, "decay": 0.5},
)
"""


def test_lazy_config_trains(tiny_yaml, tmp_path, capsys):
    pytest.importorskip("d2ema.compat")
    path = tmp_path / "tiny_lazy.py"
    path.write_text(textwrap.dedent(LAZY_CONFIG))
    out = tmp_path / "out"
    rc = main(["train", "--config-file", str(path), f"train.output_dir={out}",
               "train.max_iter=2"])
    assert rc == 0
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    _covers_model(checkpoint)
    assert "ema/bbox" in capsys.readouterr().out  # the final evaluation scored the EMA too


def test_lazy_invalid_ema_value(capsys, tmp_path):
    path = tmp_path / "tiny_lazy.py"
    path.write_text(textwrap.dedent(LAZY_CONFIG))
    assert main(["train", "--config-file", str(path), "train.model_ema.decay=2.0"]) == 2
    assert "train.model_ema.decay" in _error_line(capsys)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "train", "export", "bench"))
