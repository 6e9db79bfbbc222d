"""A new user's detectron2 project on disk, as the tests of issue 9 need it.

* a COCO-format dataset: JPEG images and an instances json per split, with COCO's
  non-contiguous category ids (3 and 7), under ``data/``;
* detectron2's config layout: ``configs/Base-RetinaNet.yaml`` (the model zoo's file, anchors
  written with ``!!python/object/apply:eval`` as there) and a child ``configs/my/*.yaml`` that
  inherits it with ``_BASE_``;
* the LazyConfig layout of detectron2's ``configs/common`` + ``new_baselines``: ``common/``
  files imported relatively by ``configs/my/lazy_retinanet.py``.

The model is a ResNet-18 FPN RetinaNet at 64 px, so that a run takes seconds on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CATEGORIES = [{"id": 3, "name": "box"}, {"id": 7, "name": "tile"}]


def write_coco_split(root: Path, split: str, num_images: int, seed: int,
                     categories: list[dict] | None = None) -> tuple[Path, Path]:
    """``root/annotations/instances_<split>.json`` and ``root/images/<split>/*.jpg``, two boxes
    per image of ``categories`` (default :data:`CATEGORIES`; colours by position)."""
    categories = categories or CATEGORIES
    ids = [c["id"] for c in categories]
    colours = [(255, 200, 0), (0, 100, 255), (60, 255, 60), (255, 0, 255)]
    rng = np.random.default_rng(seed)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        height, width = 64, 80
        image = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
        for _ in range(2):
            category = int(rng.choice(ids))
            x, y = int(rng.integers(0, width - 24)), int(rng.integers(0, height - 24))
            w, h = int(rng.integers(10, 24)), int(rng.integers(10, 24))
            colour = colours[ids.index(category) % len(colours)]
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, -1)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": category, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
        name = f"{split}_{i:03d}.jpg"
        assert cv2.imwrite(str(image_dir / name), image)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
    json_file = root / "annotations" / f"instances_{split}.json"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return json_file, image_dir


BASE_RETINANET = """\
MODEL:
  META_ARCHITECTURE: "RetinaNet"
  BACKBONE:
    NAME: "build_retinanet_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: {anchor_sizes}
  FPN:
    IN_FEATURES: ["res3", "res4", "res5"]
  RETINANET:
    IOU_THRESHOLDS: [0.4, 0.5]
    IOU_LABELS: [0, -1, 1]
    SMOOTH_L1_LOSS_BETA: 0.0
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.01  # Note that RetinaNet uses a different default learning rate
  STEPS: (60000, 80000)
  MAX_ITER: 90000
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
VERSION: 2
""".format(anchor_sizes='!!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3) ] '
           'for x in [32, 64, 128, 256, 512 ]]"]')


def child_yaml(train: str, test: str, ema: str = "  ENABLED: True\n  DECAY: 0.5\n") -> str:
    """``configs/my/retinanet_R18.yaml``: inherits Base-RetinaNet, small and on the CPU.
    NORM BN with the default FREEZE_AT 2: stem and res2 become FrozenBatchNorm."""
    return f"""\
_BASE_: "../Base-RetinaNet.yaml"
MODEL:
  WEIGHTS: ""
  DEVICE: cpu
  RESNETS:
    DEPTH: 18
    RES2_OUT_CHANNELS: 64
    NORM: BN
  FPN:
    OUT_CHANNELS: 32
  RETINANET:
    NUM_CLASSES: 2
    NUM_CONVS: 1
DATASETS:
  TRAIN: ("{train}",)
  TEST: ("{test}",)
INPUT:
  MIN_SIZE_TRAIN: (64,)
  MAX_SIZE_TRAIN: 80
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 80
DATALOADER:
  NUM_WORKERS: 0
SOLVER:
  IMS_PER_BATCH: 2
  MAX_ITER: 2
  STEPS: ()
  WARMUP_ITERS: 0
  CHECKPOINT_PERIOD: 100000
SEED: 0
MODEL_EMA:
{ema}"""


LAZY_COMMON_MODEL = """\
from detectron2.config import LazyCall as L
from detectron2.modeling import build_model

from d2ema.app.model_configs import tiny_detector_config

model = L(build_model)(cfg=L(tiny_detector_config)(arch="retinanet", num_classes=2,
                                                   image_size=64))
"""

LAZY_COMMON_DATA = """\
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import (DatasetMapper, build_detection_test_loader,
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator

resize = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=80)]
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(is_train=True, augmentations=resize, image_format="BGR"),
    total_batch_size=2, num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(is_train=False, augmentations=resize, image_format="BGR"),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}",
                                        use_fast_impl=False)
"""

LAZY_COMMON_TRAIN = """\
import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import LinearParamScheduler

optimizer = L(torch.optim.SGD)(params=L(get_default_optimizer_params)(), lr=0.01, momentum=0.9)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(LinearParamScheduler)(start_value=1.0, end_value=1.0), warmup_length=0.0,
    warmup_factor=1.0,
)
train = dict(
    output_dir="output", init_checkpoint="", max_iter=2, device="cpu",
    amp=dict(enabled=False), ddp=dict(broadcast_buffers=False, find_unused_parameters=False),
    checkpointer=dict(period=100000, max_to_keep=2), eval_period=0, log_period=20,
)
"""


def lazy_child(register: str, train: str, test: str, ema: str) -> str:
    """``configs/my/lazy_retinanet.py``: detectron2's relative-import layout, plus ``register``
    (code that registers a dataset, as a user's config does)."""
    return "\n".join([
        "from ..common.model import model",
        "from ..common.data import dataloader",
        "from ..common.train import lr_multiplier, optimizer, train",
        "",
        register,
        f"dataloader.train.dataset.names = {train!r}",
        f"dataloader.test.dataset.names = {test!r}",
        f"train.model_ema = {ema}",
        "",
    ])


@dataclass
class Project:
    root: Path
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    def spec(self, name: str, split: str = "train") -> str:
        """``NAME=ANNOTATIONS.json:IMAGE_DIR`` for ``d2ema train --dataset``."""
        json_file, images = ((self.train_json, self.train_images) if split == "train"
                             else (self.val_json, self.val_images))
        return f"{name}={json_file}:{images}"

    def write(self, relative: str, text: str) -> Path:
        path = self.configs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def make_project(root: Path) -> Project:
    train_json, train_images = write_coco_split(root / "data", "train", 6, seed=0)
    val_json, val_images = write_coco_split(root / "data", "val", 2, seed=1)
    project = Project(root, train_json, train_images, val_json, val_images)
    project.write("Base-RetinaNet.yaml", BASE_RETINANET)
    project.write("common/__init__.py", "")
    project.write("common/model.py", LAZY_COMMON_MODEL)
    project.write("common/data.py", LAZY_COMMON_DATA)
    project.write("common/train.py", LAZY_COMMON_TRAIN)
    return project


# detectron2 v0.6's tools/train_net.py (Apache-2.0), its COCO parts, as a user copies it
D2_TRAIN_NET = '''\
#!/usr/bin/env python
# Copyright (c) Facebook, Inc. and its affiliates.
"""
A main training script.
"""

import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluators,
    verify_results,
)
from detectron2.modeling import GeneralizedRCNNWithTTA


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_list = []
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type in ["coco", "coco_panoptic_seg"]:
            evaluator_list.append(COCOEvaluator(dataset_name, output_dir=output_folder))
        if len(evaluator_list) == 0:
            raise NotImplementedError(
                "no Evaluator for the dataset {} with the type {}".format(
                    dataset_name, evaluator_type
                )
            )
        elif len(evaluator_list) == 1:
            return evaluator_list[0]
        return DatasetEvaluators(evaluator_list)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        logger = logging.getLogger("detectron2.trainer")
        logger.info("Running inference with test-time augmentation ...")
        model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        res = OrderedDict({k + "_TTA": v for k, v in res.items()})
        return res


def setup(args):
    """
    Create configs and perform basic setups.
    """
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
'''


def apply_diff(text: str, diff: str) -> str:
    """``text`` with the hunks of a unified-diff-like block applied (``@@`` separates hunks;
    lines start with ' ', '-' or '+'); each hunk's old lines must occur exactly once."""
    for hunk in diff.split("@@")[1:]:
        lines = hunk.split("\n")[1:]
        old = [x[1:] for x in lines if x[:1] in (" ", "-")]
        new = [x[1:] for x in lines if x[:1] in (" ", "+")]
        old_text, new_text = "\n".join(old), "\n".join(new)
        assert text.count(old_text) == 1, f"hunk does not apply once:\n{old_text}"
        text = text.replace(old_text, new_text)
    return text
