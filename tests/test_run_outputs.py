"""What ``d2ema train`` tells and where it writes (issue 17): d2ema's own log lines on the
console and in ``log.txt`` (one process and two), raw and EMA evaluations labelled and in
folders of their own, the COCO evaluation in Python where detectron2's compiled ops are missing
(also from a user's ``build_evaluator``), and a post-hoc series too large for the disk refused
before training."""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple

import pytest
import torch

pytest.importorskip("detectron2")

from _d2_helpers import VAL, make_cfg, register_tiny
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from d2ema.cli import main
from d2ema.d2 import EMATrainerMixin, add_model_ema_configs  # noqa: F401
from d2ema.d2.config.settings import PostHocSettings
from d2ema.d2.evaluation.evaluator import has_compiled_ops

pytestmark = pytest.mark.usefixtures("restore_loggers")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    cfg = make_cfg("retinanet", "unused", max_iter=2, evaluate=True, decay=0.5)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # detections from a barely trained model
    cfg.DATASETS.TRAIN = ("shapes_train",)  # generated and registered by `d2ema train`
    cfg.DATASETS.TEST = ("shapes_val",)
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(cfg.dump())
    return path


EMA_LINE = "d2ema.d2.evaluation.evaluator INFO: Evaluating the EMA weights: results under ema/"


def test_d2ema_lines_reach_console_and_log_and_outputs_are_apart(config_file, tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["train", "--config-file", str(config_file), "OUTPUT_DIR", str(out)]) == 0
    console = capfd.readouterr().out
    assert "Evaluating the raw (trained) weights" in console
    assert "Evaluating the EMA weights: results under ema/" in console
    log = (out / "log.txt").read_text()
    assert EMA_LINE in log and "d2ema.d2.evaluation.evaluator INFO: Evaluating the raw" in log
    raw = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    ema = json.loads((out / "inference_ema" / "coco_instances_results.json").read_text())
    assert raw and ema and raw != ema  # two evaluations, neither overwrote the other


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode runs where there is no GPU")
def test_d2ema_lines_with_two_processes(config_file, tmp_path, capfd):
    out = tmp_path / "out"
    rc = main(["train", "--config-file", str(config_file), "--num-gpus", "2", "--dist-url",
               "auto", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out)])
    for name in ("detectron2", "fvcore", "d2ema"):  # handlers bound to captured streams
        logging.getLogger(name).handlers.clear()
    console = capfd.readouterr().out
    assert rc == 0
    assert console.count("Evaluating the EMA weights: results under ema/") == 1  # main only
    assert EMA_LINE in (out / "log.txt").read_text()
    assert EMA_LINE in (out / "log.txt.rank1").read_text()  # every rank, as detectron2's


def test_eval_only_keeps_the_runs_config(config_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--config-file", str(config_file), "OUTPUT_DIR", str(out),
                 "DATASETS.TEST", "()"]) == 0
    before = (out / "config.yaml").read_bytes()
    assert main(["train", "--config-file", str(out / "config.yaml"), "--eval-only",
                 "MODEL.WEIGHTS", str(out / "model_final.pth"), "DATASETS.TEST",
                 "('shapes_val',)", "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", "True"]) == 0
    assert (out / "config.yaml").read_bytes() == before
    (folder,) = (out / "eval").iterdir()
    assert (folder / "inference_ema" / "coco_instances_results.json").is_file()
    assert b"shapes_val" in (folder / "config.yaml").read_bytes()  # the evaluation's config


def test_posthoc_series_larger_than_the_disk_is_refused_before_training(
        config_file, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    out = tmp_path / "out"
    rc = main(["train", "--config-file", str(config_file), "OUTPUT_DIR", str(out),
               "MODEL_EMA.POSTHOC.ENABLED", "True"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GB free" in err[0] and "POSTHOC.PERIOD" in err[0], err
    assert not (out / "model_final.pth").exists() and not (out / "ema_snapshots").exists()
    assert not (out / "metrics.json").exists() or not (out / "metrics.json").read_text()


@pytest.mark.parametrize(("max_iter", "period"),
                         [(30, 10), (5, 5), (1, 1), (1000, 10), (90_000, 900)])
def test_automatic_snapshot_period(max_iter, period):
    """At most about 100 snapshots, at least 10 iterations apart (a 30-iteration run: 3)."""
    assert PostHocSettings((0.05,), 0, "float32", "").period_for(max_iter) == period
    assert PostHocSettings((0.05,), 1, "float32", "").period_for(max_iter) == 1


@pytest.mark.skipif(has_compiled_ops(), reason="the fallback is for installs without _C")
def test_users_build_evaluator_with_fast_coco_runs_without_compiled_ops(tmp_path):
    """detectron2's tools/train_net.py: COCOEvaluator(dataset_name, output_dir=...), whose
    fast implementation needs the compiled ops."""
    register_tiny(tmp_path / "data")

    class Trainer(EMATrainerMixin, DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return COCOEvaluator(dataset_name, output_dir=output_folder or f"{cfg.OUTPUT_DIR}/"
                                 "inference")

    cfg = make_cfg("retinanet", tmp_path / "out", max_iter=2, evaluate=True, decay=0.5)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = trainer._last_eval_results
    assert "AP" in results["bbox"] and "AP" in results["ema/bbox"]
    detections = json.loads(
        (tmp_path / "out" / "inference" / "coco_instances_results.json").read_text())
    assert detections  # the fast implementation would have raised MissingCompiledOp here
    assert (tmp_path / "out" / "inference_ema" / "coco_instances_results.json").is_file()
    assert VAL


def test_misspelt_key_suggests_the_right_one(config_file, capsys):
    assert main(["train", "--config-file", str(config_file), "MODEL_EMA.DECAYY", "0.99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean MODEL_EMA.DECAY?" in err[0], err


def test_ctrl_c_under_train_says_resume_continues(config_file, capsys, monkeypatch):
    import d2ema.d2.engine.train_net as train_net

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_net, "train_main", interrupted)
    assert main(["train", "--config-file", str(config_file)]) == 130
    assert capsys.readouterr().err.strip() == (
        "d2ema train: interrupted; checkpoints kept: --resume continues")


def test_ctrl_c_says_which_iteration_a_resume_starts_from(config_file, tmp_path, capsys,
                                                           monkeypatch):
    """Interrupted after the checkpoint of iteration index 4 was saved: --resume starts at 5."""
    import d2ema.d2.engine.launch as launch_module
    from d2ema.d2.engine.train_net import resume_note

    out = tmp_path / "out"
    assert resume_note(out) == "no checkpoint was saved yet: --resume starts from iteration 0"

    def interrupted(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "model_0000004.pth").write_bytes(b"")
        (out / "last_checkpoint").write_text("model_0000004.pth")
        raise KeyboardInterrupt

    monkeypatch.setattr(launch_module, "launch", interrupted)
    assert main(["train", "--config-file", str(config_file), "OUTPUT_DIR", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "d2ema train: interrupted; checkpoints kept: --resume continues from iteration 5 "
        "(model_0000004.pth)")
    (out / "model_final.pth").write_bytes(b"")
    (out / "last_checkpoint").write_text("model_final.pth")
    assert resume_note(out) == "--resume continues after the last iteration (model_final.pth)"
