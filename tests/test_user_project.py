"""A new user's own project through ``d2ema train``: a COCO-format dataset on disk, detectron2's
config layouts (``_BASE_`` YAML, relative-import LazyConfig), resume from the saved config,
clear dataset errors, integer values for float keys, and a plain-detectron2 config on export."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

pytest.importorskip("detectron2")

from _user_project import child_yaml, lazy_child, make_project
from detectron2.config import LazyConfig, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2ema.cli import main
from d2ema.d2 import DatasetError, register_coco_dataset
from d2ema.d2.engine.train_net import load_config

TRAIN, VAL = "widgets_train", "widgets_val"  # unique in this test process


pytestmark = pytest.mark.usefixtures("restore_loggers")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert ":;" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("project"))
    project.write("my/retinanet_R18.yaml", child_yaml(TRAIN, VAL))
    return project


@pytest.fixture(scope="module")
def yaml_run(project, tmp_path_factory):
    """``d2ema train --config-file configs/my/retinanet_R18.yaml --dataset ... --dataset ...``"""
    out = tmp_path_factory.mktemp("yaml_run")
    rc = main(["train", "--config-file", str(project.configs / "my/retinanet_R18.yaml"),
               "--dataset", project.spec(TRAIN), "--dataset", project.spec(VAL, "val"),
               "OUTPUT_DIR", str(out)])
    assert rc == 0
    return out


def test_yaml_run_trains_evaluates_and_records_its_datasets(yaml_run, project, capsys):
    checkpoint = torch.load(yaml_run / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["ema_meta"]["step"] == 2 and checkpoint["ema_state"]
    saved = load_config(str(yaml_run / "config.yaml"))  # loadable with d2ema
    assert list(saved.DATASETS.COCO_INSTANCES) == [project.spec(TRAIN), project.spec(VAL, "val")]
    assert saved.MODEL.RESNETS.DEPTH == 18 and saved.MODEL.META_ARCHITECTURE == "RetinaNet"


def test_final_evaluation_scores_raw_and_ema_with_coco(project, tmp_path, capsys):
    """The default evaluator is COCO (detectron2 v0.6 has none): 'bbox' and 'ema/bbox'."""
    rc = main(["train", "--config-file", str(project.configs / "my/retinanet_R18.yaml"),
               "--dataset", project.spec(TRAIN), "--dataset", project.spec(VAL, "val"),
               "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "final evaluation: bbox/AP=" in out and "ema/bbox/AP=" in out
    assert (tmp_path / "inference" / "coco_instances_results.json").is_file()


def test_resume_from_saved_config_needs_no_dataset_argument(yaml_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(yaml_run, run)
    monkeypatch.chdir(tmp_path)  # another folder: the saved paths are absolute
    rc = main(["train", "--config-file", str(run / "config.yaml"), "--resume",
               "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", str(run)])
    assert rc == 0
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 2 and checkpoint["ema_meta"]["step"] == 3


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_equals_sign", "is not NAME=ANNOTATIONS.json:IMAGE_DIR"),
        ("x=only.json", "is not NAME=ANNOTATIONS.json:IMAGE_DIR"),
        ("x=missing.json:{images}", "annotation file"),
        ("x={json}:missing_folder", "image folder"),
    ],
)
def test_malformed_dataset_argument(project, capsys, spec, expected):
    spec = spec.format(json=project.train_json, images=project.train_images)
    rc = main(["train", "--config-file", str(project.configs / "my/retinanet_R18.yaml"),
               "--dataset", spec])
    assert rc == 2
    line = _error_line(capsys)
    assert expected in line and "e.g." in line


def test_unknown_dataset_lists_what_is_registered_and_how_to_add(project, capsys):
    path = project.write("my/missing_val.yaml", child_yaml(TRAIN, "widgets_missing"))
    rc = main(["train", "--config-file", str(path), "--dataset", project.spec(TRAIN)])
    assert rc == 2
    line = _error_line(capsys)
    assert "unknown dataset 'widgets_missing' in DATASETS.TEST" in line
    yours = line.split("Registered: yours: ")[1].split(";")[0]
    assert TRAIN in yours and "coco_2017_train" not in yours and "shapes_train" not in yours
    assert "d2ema's demo datasets: shapes_train" in line and "builtins (" in line
    assert "--dataset widgets_missing=ANNOTATIONS.json:IMAGE_DIR" in line
    assert "DATASETS.COCO_INSTANCES" in line and "register_coco_instances" in line


def test_options_after_overrides_are_named(project, capsys):
    rc = main(["train", "--config-file", str(project.configs / "my/retinanet_R18.yaml"),
               "SOLVER.MAX_ITER", "3", "--dataset", project.spec(TRAIN)])
    assert rc == 2
    assert "options go before the config overrides: '--dataset'" in _error_line(capsys)


def test_registration_is_idempotent_and_refuses_other_files(project):
    name = "widgets_idempotent"
    assert register_coco_dataset(name, project.train_json, project.train_images)
    assert not register_coco_dataset(name, str(project.train_json), project.train_images)
    assert len(DatasetCatalog.get(name)) == 6
    with pytest.raises(DatasetError, match="already registered with other files"):
        register_coco_dataset(name, project.val_json, project.val_images)


# ----------------------------------------------------------------------------- LazyConfig
LAZY_EMA = "dict(enabled=True, decay=0.5, schedule='yolov5', tau=5)"  # tau: an int


def test_lazy_config_registering_its_own_data_loads_twice(project):
    register = ("from d2ema.d2 import register_coco_dataset\n"
                f"register_coco_dataset('widgets_lazy_twice', '{project.train_json}', "
                f"'{project.train_images}')")
    path = project.write("my/lazy_twice.py", lazy_child(register, "widgets_lazy_twice",
                                                         "widgets_lazy_twice", LAZY_EMA))
    for _ in range(2):
        cfg = LazyConfig.load(str(path))
    assert cfg.dataloader.train.dataset.names == "widgets_lazy_twice"


@pytest.fixture(scope="module")
def lazy_run(project, tmp_path_factory):
    """A LazyConfig in detectron2's relative-import layout that registers its training set
    with detectron2's own register_coco_instances (executed once per process), and
    ``--dataset`` for the test set."""
    register = ("from detectron2.data.datasets import register_coco_instances\n"
                f"register_coco_instances('widgets_lazy_train', {{}}, '{project.train_json}', "
                f"'{project.train_images}')")
    path = project.write("my/lazy_retinanet.py", lazy_child(
        register, "widgets_lazy_train", "widgets_lazy_val", LAZY_EMA))
    out = tmp_path_factory.mktemp("lazy_run")
    rc = main(["train", "--config-file", str(path), "--dataset",
               project.spec("widgets_lazy_val", "val"), f"train.output_dir={out}"])
    assert rc == 0
    return out


def test_lazy_run_trains_and_evaluates(lazy_run):
    checkpoint = torch.load(lazy_run / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["ema_meta"]["step"] == 2
    assert checkpoint["ema_meta"]["schedule"] == {"name": "yolov5", "decay": 0.5, "tau": 5.0}
    saved = (lazy_run / "config.yaml").read_text()
    assert "coco_instances" in saved and "widgets_lazy_val=" in saved


def test_lazy_run_resumes_from_its_saved_yaml(lazy_run, project, tmp_path):
    """detectron2 saved the LazyConfig as config.yaml; d2ema resumes from it. Its training set
    was registered by the .py's code (not recorded), so it is given again: the same files as
    the registration already in this process, which is fine."""
    run = tmp_path / "run"
    shutil.copytree(lazy_run, run)
    rc = main(["train", "--config-file", str(run / "config.yaml"), "--resume",
               "--dataset", project.spec("widgets_lazy_train"),
               f"train.output_dir={run}", "train.max_iter=3"])
    assert rc == 0
    checkpoint = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["ema_meta"]["step"] == 3


def test_lazy_unknown_dataset_is_a_clear_error(project, capsys):
    path = project.write("my/lazy_unknown.py", lazy_child("", "widgets_nowhere",
                                                          "widgets_nowhere", LAZY_EMA))
    assert main(["train", "--config-file", str(path)]) == 2
    line = _error_line(capsys)
    assert "unknown dataset 'widgets_nowhere' in dataloader.train.dataset.names" in line
    assert "KeyError" not in line and "--dataset widgets_nowhere=" in line


def test_lazy_eval_only_needs_a_checkpoint(lazy_run, capsys):
    path = lazy_run / "config.yaml"
    assert main(["train", "--config-file", str(path), "--eval-only"]) == 2
    assert "train.init_checkpoint is empty" in _error_line(capsys)


def test_lazy_eval_only_never_labels_raw_weights_ema(lazy_run, tmp_path, capsys, caplog):
    checkpoint = torch.load(lazy_run / "model_final.pth", map_location="cpu", weights_only=True)
    plain = {"model": checkpoint["model"]}  # what plain detectron2 writes: no EMA
    torch.save(plain, tmp_path / "plain.pth")
    with caplog.at_level(logging.WARNING):
        rc = main(["train", "--config-file", str(lazy_run / "config.yaml"), "--eval-only",
                   f"train.init_checkpoint={tmp_path / 'plain.pth'}",
                   "train.model_ema.use_ema_weights_for_eval_only=True",
                   f"train.output_dir={tmp_path}"])
    assert rc == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "evaluation results:" in x)
    assert "bbox/AP=" in line and "ema/" not in line
    assert "has no EMA ('ema_state'): evaluating its raw weights" in out  # d2ema's logger


# ----------------------------------------------------------------------------- values, export
def test_integers_for_float_keys_in_files_and_overrides(project):
    ema = "  ENABLED: True\n  DECAY: 1\n  SCHEDULE: power\n  INV_GAMMA: 2\n  MIN_DECAY: 0\n"
    path = project.write("my/ints.yaml", child_yaml(TRAIN, VAL, ema))
    cfg = load_config(str(path), ["MODEL_EMA.POWER", "1"])
    node = cfg.MODEL_EMA
    assert (node.DECAY, node.INV_GAMMA, node.MIN_DECAY, node.POWER) == (1.0, 2.0, 0.0, 1.0)
    assert all(type(node[k]) is float for k in ("DECAY", "INV_GAMMA", "MIN_DECAY", "POWER"))
    cfg = load_config(str(path), ["MODEL_EMA.SCHEDULE", "yolov5", "MODEL_EMA.TAU", "5",
                                  "MODEL_EMA.INV_GAMMA", "1.0"])
    assert cfg.MODEL_EMA.TAU == 5.0 and type(cfg.MODEL_EMA.TAU) is float
    # only MODEL_EMA's float keys: yacs still checks everything else
    with pytest.raises(Exception, match="Type mismatch"):
        load_config(str(path), ["SOLVER.BASE_LR", "1"])
    with pytest.raises(Exception, match="Type mismatch"):
        load_config(str(path), ["MODEL_EMA.DECAY", "True"])


def test_export_writes_a_config_plain_detectron2_reads(yaml_run, tmp_path, capsys):
    out = tmp_path / "ema.pth"
    assert main(["export", str(yaml_run / "model_final.pth"), "-o", str(out)]) == 0
    assert f"wrote {tmp_path / 'ema.yaml'}" in capsys.readouterr().out
    cfg = get_cfg()  # plain detectron2: no add_model_ema_configs
    cfg.merge_from_file(str(tmp_path / "ema.yaml"))
    assert cfg.DATASETS.TRAIN == (TRAIN,)
    assert str(out.resolve()) == cfg.MODEL.WEIGHTS
    assert "MODEL_EMA" not in cfg and "COCO_INSTANCES" not in cfg.DATASETS
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    ema = torch.load(yaml_run / "model_final.pth", weights_only=True)["ema_state"]
    state = model.state_dict()
    assert all(torch.equal(state[n], ema[n]) for n in state if state[n].is_floating_point())
    load_config(str(yaml_run / "config.yaml"))  # the run's own config: still d2ema's


def test_export_config_option_and_absent_config(yaml_run, tmp_path, capsys):
    lone = tmp_path / "lone" / "model.pth"
    lone.parent.mkdir()
    shutil.copy(yaml_run / "model_final.pth", lone)
    assert main(["export", str(lone), "-o", str(tmp_path / "a.pth")]) == 0
    assert "pass --config RUN_CONFIG.yaml" in capsys.readouterr().out
    assert not (tmp_path / "a.yaml").exists()
    assert main(["export", str(lone), "-o", str(tmp_path / "b.pth"),
                 "--config", str(yaml_run / "config.yaml")]) == 0
    assert (tmp_path / "b.yaml").is_file()
    assert main(["export", str(lone), "-o", str(tmp_path / "c.pth"),
                 "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config" in _error_line(capsys) and not (tmp_path / "c.pth").exists()


def test_shapely_makes_fixed_size_crop_work_on_polygons():
    """new_baselines' LSJ configs crop instance polygons with FixedSizeCrop (fvcore: shapely)."""
    import numpy as np
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import transform_instance_annotations

    image = np.zeros((64, 64, 3), dtype=np.uint8)
    aug = T.AugInput(image)
    transforms = T.AugmentationList([T.FixedSizeCrop(crop_size=(32, 32))])(aug)
    polygon = [[2.0, 2.0, 60.0, 2.0, 60.0, 60.0, 2.0, 60.0]]
    ann = {"bbox": [2, 2, 58, 58], "bbox_mode": 0, "segmentation": polygon, "category_id": 0}
    out = transform_instance_annotations(ann, transforms, (32, 32))
    coords = np.concatenate([np.asarray(p).reshape(-1, 2) for p in out["segmentation"]])
    assert coords.min() >= 0 and coords.max() <= 32


POSTHOC_TRAIN, POSTHOC_VAL = "widgets_posthoc_train", "widgets_posthoc_val"


def _forget(*names: str) -> None:
    """As in a new process: the datasets are no longer registered."""
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def posthoc_run(project, tmp_path_factory):
    config = project.write("my/posthoc.yaml", child_yaml(
        POSTHOC_TRAIN, POSTHOC_VAL, "  ENABLED: True\n  DECAY: 0.5\n  POSTHOC:\n"
        "    ENABLED: True\n    PERIOD: 1\n"))
    out = tmp_path_factory.mktemp("posthoc_run")
    assert main(["train", "--config-file", str(config), "--dataset", project.spec(POSTHOC_TRAIN),
                 "--dataset", project.spec(POSTHOC_VAL, "val"), "OUTPUT_DIR", str(out)]) == 0
    return out


def test_posthoc_eval_registers_the_runs_datasets(posthoc_run, capsys):
    """``d2ema posthoc --eval`` in a new process: the run's ``--dataset`` entries come from its
    config.yaml, as they do for ``--resume``."""
    _forget(POSTHOC_TRAIN, POSTHOC_VAL)
    capsys.readouterr()
    assert main(["posthoc", str(posthoc_run), "--sigma-rel", "0.08", "--eval"]) == 0
    results = json.loads((posthoc_run / "posthoc" / "results.json").read_text())
    rows = {r["target"]: r for r in results["rows"]}
    assert set(rows) == {"sigma_rel 0.08", "raw weights"}
    assert all(0.0 <= r["AP"] <= 100.0 for r in rows.values())
    assert POSTHOC_VAL in DatasetCatalog.list()


def test_posthoc_eval_test_set_registered_in_code(posthoc_run, project, tmp_path, capsys):
    """A test set the user's own code registered is not in config.yaml: named, then given."""
    _forget(POSTHOC_TRAIN, POSTHOC_VAL)
    cfg = get_cfg()
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(posthoc_run / "config.yaml"))
    del cfg.DATASETS["COCO_INSTANCES"]
    unrecorded = tmp_path / "unrecorded.yaml"
    unrecorded.write_text(cfg.dump())
    capsys.readouterr()
    args = ["posthoc", str(posthoc_run), "--sigma-rel", "0.08", "--eval",
            "--config-file", str(unrecorded)]
    assert main(args) == 2
    line = _error_line(capsys)
    assert f"unknown dataset {POSTHOC_VAL!r} in DATASETS.TEST" in line and "--dataset" in line
    assert main([*args, "--dataset", project.spec(POSTHOC_VAL, "val")]) == 0


def test_posthoc_eval_of_a_model_registered_in_code(posthoc_run, project, tmp_path, capsys):
    cfg = get_cfg()
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(posthoc_run / "config.yaml"))
    cfg.MODEL.META_ARCHITECTURE = "MyDetector"
    custom = tmp_path / "custom.yaml"
    custom.write_text(cfg.dump())
    capsys.readouterr()
    assert main(["posthoc", str(posthoc_run), "--sigma-rel", "0.08", "--eval",
                 "--config-file", str(custom)]) == 2
    line = _error_line(capsys)
    assert "MyDetector" in line and "d2ema.posthoc.reconstruct" in line


def test_posthoc_in_the_users_own_script(posthoc_run, project):
    """README's recipe for a project with its own trainer and registered model: rebuild in
    Python, load into the model its trainer builds, evaluate with its own test()."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2ema import Target
    from d2ema.d2 import EMATrainer, add_model_ema_configs
    from d2ema.posthoc import load_tensors, reconstruct

    _forget(POSTHOC_TRAIN, POSTHOC_VAL)
    register_coco_dataset(POSTHOC_VAL, project.val_json, project.val_images)
    cfg = get_cfg()
    add_model_ema_configs(cfg)
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(posthoc_run / "config.yaml"))
    model = build_model(cfg)  # detectron2's (no EMA attached): the rebuilt EMA becomes its weights
    DetectionCheckpointer(model).load(str(posthoc_run / "model_final.pth"))
    final = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    (rec,) = reconstruct(posthoc_run / "ema_snapshots", [Target("sigma_rel", 0.08)])
    load_tensors(model, rec.tensors)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert rec.tensors and all(torch.equal(state[k], v) for k, v in rec.tensors.items())
    assert any(not torch.equal(final[k], v) for k, v in rec.tensors.items())
    results = EMATrainer.test(cfg, model)
    assert set(results) == {"bbox"} and "AP" in results["bbox"]  # NaN: 2 iterations, no boxes


def test_dataset_advice_never_tests_on_the_training_set():
    """With only a training set given, the advice asks for a held-out set, not the same one."""
    from omegaconf import OmegaConf

    from d2ema.d2.data.datasets import _names_advice

    yacs = _names_advice(get_cfg(), ["my_train"])
    assert yacs.startswith("DATASETS.TRAIN \"('my_train',)\" DATASETS.TEST \"('HELD_OUT',)\"")
    assert "a set not trained on" in yacs and "--dataset HELD_OUT=" in yacs
    lazy = _names_advice(OmegaConf.create({"train": {}}), ["my_train"])
    assert "dataloader.test.dataset.names=HELD_OUT" in lazy
    both = _names_advice(get_cfg(), ["my_train", "my_val"])
    assert both == "DATASETS.TRAIN \"('my_train',)\" DATASETS.TEST \"('my_val',)\""
