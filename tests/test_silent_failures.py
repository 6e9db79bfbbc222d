"""An EMA never reports weights it does not have, and detectron2's standard patterns either do the
right thing or fail loudly with the fix (issue 9): the eval-only pattern with a plain
DetectionCheckpointer, the mixin in the wrong place, contradictory settings, --eval-only without
weights, resuming without EMA, and loading an EMA under a config that differs from training's."""

from __future__ import annotations

import logging
import re
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from _user_project import child_yaml, make_project
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer

from d2ema import EMA
from d2ema.cli import main
from d2ema.d2 import (
    ConfigError,
    EMACheckpointer,
    EMANotLoadedError,
    EMATrainer,
    EMATrainerMixin,
    TrainerError,
    add_model_ema_configs,
    build_model_ema,
    evaluate_with_ema,
    get_model_ema,
    register_coco_dataset,
)
from d2ema.errors import EMAStateError, one_line

TRAIN, VAL = "guard_train", "guard_val"


pytestmark = pytest.mark.usefixtures("restore_loggers")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("project"))
    register_coco_dataset(TRAIN, project.train_json, project.train_images)
    register_coco_dataset(VAL, project.val_json, project.val_images)
    project.write("my/retinanet_R18.yaml", child_yaml(TRAIN, VAL))
    return project


def make_cfg(project, out, **overrides):
    """What a user's train_net.py does: get_cfg, add_model_ema_configs, merge_from_file."""
    cfg = get_cfg()
    add_model_ema_configs(cfg)
    cfg.merge_from_file(str(project.configs / "my/retinanet_R18.yaml"))
    cfg.OUTPUT_DIR = str(out)
    cfg.merge_from_list([x for kv in overrides.items() for x in (kv[0].replace("__", "."),
                                                                 str(kv[1]))])
    return cfg


@pytest.fixture(scope="module")
def run(project, tmp_path_factory):
    """A 2-iteration EMATrainer run (NORM BN, FREEZE_AT 2): out/model_final.pth has an EMA."""
    out = tmp_path_factory.mktemp("run")
    trainer = EMATrainer(make_cfg(project, out))
    trainer.resume_or_load(resume=False)
    trainer.train()
    (out / "config.yaml").write_text(trainer.cfg.dump())
    return out


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def recorded_tests(monkeypatch):
    """The weights of head.cls_score each time detectron2's plain test runs."""
    seen = []
    plain_test = DefaultTrainer.__dict__["test"].__func__

    def recording(cls, cfg, model, evaluators=None):
        seen.append(model.head.cls_score.weight.detach().clone())
        return plain_test(cls, cfg, model, evaluators)

    monkeypatch.setattr(DefaultTrainer, "test", classmethod(recording))
    return seen


# ----------------------------------------------------------------------------- eval-only pattern
def test_plain_checkpointer_eval_only_pattern_refuses_the_unloaded_ema(
        project, run, recorded_tests):
    cfg = make_cfg(project, run / "eval")
    model = EMATrainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        str(run / "model_final.pth"), resume=False)
    with pytest.raises(EMANotLoadedError) as err:
        EMATrainer.test(cfg, model)
    assert "EMACheckpointer" in str(err.value) and ".load(path)" in str(err.value)
    assert recorded_tests == []  # refused before anything was evaluated
    # resume_or_load(resume=False) of an EMACheckpointer loads the model only: refused too
    EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model)).resume_or_load(
        str(run / "model_final.pth"), resume=False)
    with pytest.raises(EMANotLoadedError):
        EMATrainer.test(cfg, model)


def test_ema_checkpointer_eval_only_pattern_evaluates_the_checkpoint_ema(
        project, run, recorded_tests):
    cfg = make_cfg(project, run / "eval")
    model = EMATrainer.build_model(cfg)
    EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model)).load(
        str(run / "model_final.pth"))
    results = EMATrainer.test(cfg, model)
    assert set(results) == {"bbox", "ema/bbox"}
    checkpoint = _load(run / "model_final.pth")
    raw, ema = checkpoint["model"], checkpoint["ema_state"]
    name = "head.cls_score.weight"
    assert not torch.equal(raw[name], ema[name])
    assert torch.equal(recorded_tests[0], raw[name]) and torch.equal(recorded_tests[1], ema[name])


def test_provenance_of_the_core_ema():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5)
    assert ema.provenance == "built"
    with pytest.raises(EMANotLoadedError):
        evaluate_with_ema(lambda m: {"x": 1}, model, ema)
    ema.reset(model)
    assert ema.provenance == "reset"
    assert set(evaluate_with_ema(lambda m: {"x": 1}, model, ema)) == {"x", "ema/x"}
    ema.update(model)
    assert ema.provenance == "updated"
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.provenance == "loaded"


def test_provenance_refusal_leaves_raw_evaluation_possible():
    model = nn.Linear(3, 2)
    ema = EMA(model)
    assert evaluate_with_ema(lambda m: {"x": 1}, model, None) == {"x": 1}
    with pytest.raises(EMANotLoadedError, match="neither loaded from a checkpoint nor updated"):
        evaluate_with_ema(lambda m: {"x": 1}, model, ema, raw=True)


# ----------------------------------------------------------------------------- trainer classes
def test_mixin_after_default_trainer_is_refused_when_the_class_is_defined():
    with pytest.raises(TrainerError) as err:
        class Trainer(DefaultTrainer, EMATrainerMixin):
            pass
    assert "class Trainer(EMATrainerMixin, DefaultTrainer)" in str(err.value)

    class MyTrainer(DefaultTrainer):  # a user's own trainer with its own evaluator
        pass

    with pytest.raises(TrainerError, match="MyTrainer comes before EMATrainerMixin"):
        class Wrong(MyTrainer, EMATrainerMixin):
            pass


def test_mixin_in_good_places_is_accepted():
    class MyTrainer(DefaultTrainer):
        pass

    class Logging:
        pass

    class Right(EMATrainerMixin, MyTrainer):
        pass

    class Sub(EMATrainer):
        pass

    class WithOtherMixin(Logging, EMATrainerMixin, DefaultTrainer):
        pass

    assert Right.build_hooks is EMATrainerMixin.build_hooks
    assert Sub.test.__func__ is EMATrainerMixin.test.__func__
    assert WithOtherMixin.build_model.__func__ is EMATrainerMixin.build_model.__func__


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ENABLED": False, "USE_EMA_WEIGHTS_FOR_EVAL_ONLY": True},
         "USE_EMA_WEIGHTS_FOR_EVAL_ONLY = True asks to evaluate EMA weights, but "
         "MODEL_EMA.ENABLED is False"),
        ({"ENABLED": False, "EVAL_BOTH": False}, "EVAL_BOTH = False asks to evaluate the EMA"),
        ({"DISCARD_ON_RESUME": True}, "DISCARD_ON_RESUME = True drops"),
        ({"SCHEDULE": "yolov5", "DECAY_WARM_UP_FACTOR": 10.0}, "selects the 'tf' warm-up"),
        ({"TAU": 500.0}, "TAU = 500.0 has no effect with MODEL_EMA.SCHEDULE = 'constant'"),
        ({"SCHEDULE": "yolov5", "POWER": 0.75}, "a parameter of 'power'"),
    ],
)
def test_contradictory_settings_are_refused_at_build_time(project, tmp_path, settings, message):
    cfg = make_cfg(project, tmp_path)
    for key, value in settings.items():
        cfg.MODEL_EMA[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model_ema(cfg, nn.Linear(2, 2))


def test_contradiction_is_refused_when_the_trainer_builds_its_model(project, tmp_path):
    cfg = make_cfg(project, tmp_path, MODEL_EMA__ENABLED=False,
                   MODEL_EMA__USE_EMA_WEIGHTS_FOR_EVAL_ONLY=True)
    with pytest.raises(ConfigError, match="ENABLED"):
        EMATrainer.build_model(cfg)


def test_lazy_settings_are_checked_the_same_way():
    from omegaconf import OmegaConf

    from d2ema.d2 import ema_settings, lazy_model_ema_defaults

    cfg = OmegaConf.create({"train": {"device": "cpu", "model_ema": {
        **lazy_model_ema_defaults(), "use_ema_weights_for_eval_only": True}}})
    with pytest.raises(ConfigError, match=r"train\.model_ema\.enabled is False"):
        ema_settings(cfg)
    cfg.train.model_ema.update(enabled=True, schedule="yolov5", tau=5, decay=1)
    assert ema_settings(cfg).schedule.tau == 5.0  # integers where floats are expected


def test_eval_only_without_weights_is_refused(project, run, capsys, tmp_path):
    config = str(run / "config.yaml")
    rc = main(["train", "--config-file", config, "--eval-only", "MODEL.WEIGHTS", "",
               "OUTPUT_DIR", str(tmp_path)])
    assert rc == 2
    line = capsys.readouterr().err.strip()
    assert "MODEL.WEIGHTS is empty (that would evaluate random weights)" in line
    assert "--resume" in line
    # the alternative the message offers: the last checkpoint of OUTPUT_DIR
    shutil.copy(run / "model_final.pth", tmp_path / "model_final.pth")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    rc = main(["train", "--config-file", config, "--eval-only", "--resume", "MODEL.WEIGHTS", "",
               "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", "True", "OUTPUT_DIR", str(tmp_path)])
    assert rc == 0
    assert "ema/bbox/AP" in capsys.readouterr().out


# ----------------------------------------------------------------------------- resume without EMA
def test_cli_resume_without_ema_is_refused_before_anything_is_written(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc = main(["train", "--config-file", str(out / "config.yaml"), "--resume",
               "MODEL_EMA.ENABLED", "False", "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)])
    assert rc == 2
    line = capsys.readouterr().err.strip()
    assert "has an EMA, but MODEL_EMA.ENABLED is False" in line
    assert "MODEL_EMA.DISCARD_ON_RESUME True" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_trainer_resume_without_ema_is_refused_or_discards_on_request(
        project, run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    cfg = make_cfg(project, out, MODEL_EMA__ENABLED=False, SOLVER__MAX_ITER=3)
    trainer = EMATrainer(cfg)
    untouched = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ConfigError, match="would be written without it"):
        trainer.resume_or_load(resume=True)
    assert all(torch.equal(v, untouched[k]) for k, v in trainer.model.state_dict().items())
    cfg = make_cfg(project, out, MODEL_EMA__ENABLED=False, MODEL_EMA__DISCARD_ON_RESUME=True,
                   SOLVER__MAX_ITER=3, DATASETS__TEST="()")
    trainer = EMATrainer(cfg)
    with caplog.at_level(logging.WARNING):
        trainer.resume_or_load(resume=True)
    assert any("Dropping the EMA" in r.getMessage() for r in caplog.records)
    trainer.train()
    checkpoint = _load(out / "model_final.pth")
    assert checkpoint["iteration"] == 2 and "ema_state" not in checkpoint


# ----------------------------------------------------------------------------- lenient loading
@pytest.mark.parametrize(("freeze_at", "differs"), [(0, "keep the model's values"),
                                                    (3, "are ignored")])
def test_ema_loads_under_another_freeze_at(project, run, tmp_path, caplog, freeze_at, differs):
    """Trained with FREEZE_AT 2 (BN -> FrozenBN in stem, res2). FREEZE_AT 0 has BN there
    (num_batches_tracked the EMA lacks); FREEZE_AT 3 has FrozenBN in res3 too (entries of the
    EMA the model lacks). Both load, with a warning saying what differs."""
    cfg = make_cfg(project, tmp_path, MODEL__BACKBONE__FREEZE_AT=freeze_at)
    model = EMATrainer.build_model(cfg)
    ema = get_model_ema(model)
    with caplog.at_level(logging.WARNING):
        EMACheckpointer(model, str(tmp_path), ema=ema).load(str(run / "model_final.pth"))
    warning = " ".join(r.getMessage() for r in caplog.records if "The EMA of" in r.getMessage())
    from detectron2.layers import FrozenBatchNorm2d

    if "num_batches_tracked" in FrozenBatchNorm2d(1)._buffers:  # registered, None until converted
        assert warning == ""  # detectron2 main: FrozenBatchNorm keeps the counter, same names
    else:  # v0.6
        assert differs in warning and "FREEZE_AT" in warning and "num_batches_tracked" in warning
    assert ema.provenance == "loaded"
    saved = _load(run / "model_final.pth")["ema_state"]
    buffers = dict(model.named_buffers())
    for name, value in ema.tensors().items():
        expected = saved[name] if name in saved else buffers[name]
        assert torch.equal(value, expected.to(value.dtype)), name


def test_ema_of_another_model_is_refused_and_changes_nothing(project, run, tmp_path, capsys):
    cfg = make_cfg(project, tmp_path, MODEL__RETINANET__NUM_CONVS=2)
    model = EMATrainer.build_model(cfg)
    ema = get_model_ema(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in ema.tensors().items()}
    with pytest.raises(EMAStateError) as err:
        EMACheckpointer(model, str(tmp_path), ema=ema).load(str(run / "model_final.pth"))
    assert "4 parameters of this model are missing in the checkpoint's EMA" in str(err.value)
    assert "head.cls_subnet.2.weight" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ema_before[k]) for k, v in ema.tensors().items())
    # a shape mismatch through the command line: one line, no stray ":;"
    rc = main(["train", "--config-file", str(run / "config.yaml"), "--eval-only",
               "MODEL.WEIGHTS", str(run / "model_final.pth"), "MODEL.RETINANET.NUM_CLASSES", "3",
               "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", "True", "OUTPUT_DIR", str(tmp_path)])
    assert rc == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and ":;" not in line
    assert "head.cls_score.weight: shape" in line


def test_one_line_joins_a_heading_with_a_space():
    assert one_line("cannot load:\n  a\n  b") == "cannot load: a; b"
    assert one_line("first\nsecond") == "first; second"
