"""The detectron2 code blocks and ``d2ema`` commands of docs/, run as written in a user's project
on disk (tests/_user_project.py: a tiny RetinaNet, a COCO-format dataset, detectron2's config
layouts). Where a number in a command only makes sense for a real run (``--step 60000``), the
test says what it replaces it with."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("detectron2")

from _doc_blocks import doc_block, doc_commands
from _user_project import child_yaml, lazy_child, make_project
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2ema.cli import main

pytestmark = pytest.mark.usefixtures("restore_loggers")


@contextmanager
def inside(folder):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(old)


def forget(*names: str) -> None:
    """As in a new process: the datasets are no longer registered."""
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def run(argv: list[str], capsys) -> None:
    assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("docs_project"))


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_own_dataset_command(project, capsys):
    """docs/detectron2.md: the datasets given with --dataset and named by overrides."""
    project.write("my/retinanet_R50.yaml", child_yaml("unused_train", "unused_val"))  # tiny R18
    forget("my_train", "my_val")  # a new process: names an earlier test registered are gone
    with inside(project.root):
        (argv,) = doc_commands("own-dataset-command")
        run(argv, capsys)
        saved = (project.root / "output" / "config.yaml").read_text()
    assert "my_train=" in saved and "my_val=" in saved
    assert checkpoint(project.root / "output/model_final.pth")["ema_meta"]["step"] == 2
    forget("my_train", "my_val")


def test_lazyconfig_block_and_command(project, capsys):
    """docs/detectron2.md: train.model_ema from lazy_model_ema_defaults() in a LazyConfig, and
    the command that trains it with an override."""
    register = ("from d2ema.d2 import register_coco_dataset\n"
                f"register_coco_dataset('lazy_docs_train', '{project.train_json}', "
                f"'{project.train_images}')\n"
                f"register_coco_dataset('lazy_docs_val', '{project.val_json}', "
                f"'{project.val_images}')")
    text = lazy_child(register, "lazy_docs_train", "lazy_docs_val", "None")
    text = text.replace("train.model_ema = None\n", doc_block("lazyconfig-train"))
    project.write("my/lazy_retinanet.py", text)
    folder = project.root / "lazy_run"  # configs/ as in the user's project, output/ its own
    folder.mkdir()
    (folder / "configs").symlink_to(project.configs)
    with inside(folder):
        (argv,) = doc_commands("lazyconfig-command")
        run(argv, capsys)
    meta = checkpoint(project.root / "lazy_run/output/model_final.pth")["ema_meta"]
    assert meta["step"] == 2
    assert meta["schedule"]["name"] == "sigma_rel" and meta["schedule"]["sigma_rel"] == 0.07
    forget("lazy_docs_train", "lazy_docs_val")


def test_custom_trainer_block():
    """docs/detectron2.md: the mixin first; the user's own evaluator is kept."""
    from detectron2.engine import DefaultTrainer

    from d2ema.d2 import EMATrainerMixin

    class MyTrainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name):
            return "mine"

    ns = {"EMATrainerMixin": EMATrainerMixin, "MyTrainer": MyTrainer}
    exec(compile(doc_block("custom-trainer"), "custom-trainer", "exec"), ns)
    trainer = ns["Trainer"]
    assert trainer.__mro__[1:3] == (EMATrainerMixin, MyTrainer)
    assert trainer.build_evaluator(None, "x") == "mine"


# The last command's numbers are for a 60,000-iteration run; this one has 10 iterations.
REAL_RUN = {"60000": "10", "0.9995": "0.6"}
POSTHOC_YAML_EMA = "  ENABLED: True\n  DECAY: 0.5\n  POSTHOC:\n    PERIOD: 1\n"


@pytest.fixture(scope="module")
def several_run(project, tmp_path_factory):
    """docs/ema-length.md: several EMAs and post-hoc snapshots, trained by the block's first
    command in a folder whose cfg.yaml lists its datasets (DATASETS.COCO_INSTANCES)."""
    folder = tmp_path_factory.mktemp("several")
    specs = [project.spec("several_train"), project.spec("several_val", "val")]
    cfg = child_yaml("several_train", "several_val", POSTHOC_YAML_EMA).replace(
        'DATASETS:\n', f"DATASETS:\n  COCO_INSTANCES: {json.dumps(specs)}\n", 1)
    cfg = cfg.replace("MAX_ITER: 2", "MAX_ITER: 10")
    (folder / "cfg.yaml").write_text(cfg.replace("../Base-RetinaNet.yaml",
                                                 str(project.configs / "Base-RetinaNet.yaml")))
    commands = doc_commands("several-emas-and-posthoc")
    assert [c[0] for c in commands] == ["train", "posthoc", "posthoc", "posthoc"]
    return folder, commands


def test_several_emas_and_posthoc(several_run, capsys):
    folder, commands = several_run
    with inside(folder):
        run(commands[0], capsys)
        saved = checkpoint("output/model_final.pth")
        assert sorted(saved["ema_extras"]) and saved["ema_meta"]["step"] == 10
        for argv in commands[1:]:
            forget("several_train", "several_val")  # each command is a new process
            argv = [REAL_RUN.get(a, a) for a in argv]
            run(argv, capsys)
        assert (folder / "best.pth").is_file()
        results = json.loads((folder / "output/posthoc/results.json").read_text())
    targets = {r["target"] for r in results["rows"]}
    assert {"sigma_rel 0.03", "sigma_rel 0.07", "decay 0.6", "raw weights"} <= targets, targets


def test_posthoc_own_script(several_run, project):
    """docs/ema-length.md: the rebuilt EMAs loaded into a model of the user's own and scored by
    its trainer's test(); the loaded weights are the rebuilt ones."""
    from detectron2.config import get_cfg

    from d2ema.d2 import EMATrainer, add_model_ema_configs, register_coco_dataset

    folder, _ = several_run
    register_coco_dataset("several_val", project.val_json, project.val_images)
    cfg = get_cfg()
    add_model_ema_configs(cfg)
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(folder / "output/config.yaml"))
    printed = []
    ns = {"cfg": cfg, "Trainer": EMATrainer, "print": lambda *a: printed.append(a)}
    with inside(folder):
        exec(compile(doc_block("posthoc-own-script"), "posthoc-own-script", "exec"), ns)
    assert len(printed) == 2
    assert all("misfit" in fit and set(results) == {"bbox"} for fit, results in printed)
    state = dict([*ns["model"].named_parameters(), *ns["model"].named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in ns["rec"].tensors.items())
