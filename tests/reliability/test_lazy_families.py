"""detectron2's own LazyConfig model files hold its data classes (``ShapeSpec``), which
``LazyConfig.save`` writes into ``OUTPUT_DIR/config.yaml`` as Python object tags (issue 24,
item 3). A run of such a config resumes and runs ``d2ema posthoc --eval`` from that file alone,
without the ``.py``: the objects are rebuilt from an allow-list of data classes. The model files
below are ``configs/common/models/mask_rcnn_fpn.py``, ``retinanet.py`` and ``cascade_rcnn.py`` of
detectron2 (not in the v0.6 sdist) made tiny: ResNet-18, 64 px, 16 channels, box heads only
(the dataset has no masks); their ``ShapeSpec`` objects are as there (RetinaNet's one object
five times, which YAML writes as an alias). One run per family, shared by this module's tests;
keypoints are left out (the dataset has none)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("cv2")

from _user_project import make_project

from d2ema.cli import main

pytestmark = pytest.mark.usefixtures("restore_loggers")

RCNN_FPN = """\
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone import BasicStem, FPN, ResNet
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import StandardROIHeads, FastRCNNOutputLayers, FastRCNNConvFCHead

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="FrozenBN"),
            out_features=["res2", "res3", "res4", "res5"],
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=16,
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=16, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[8], [16], [32], [64], [128]], aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64], offset=0.0),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1],
                                  allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=32, positive_fraction=0.5, pre_nms_topk=(200, 100),
        post_nms_topk=(50, 50), nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=2, batch_size_per_image=32, positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1],
                                    allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(output_size=7, scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
                                sampling_ratio=0, pooler_type="ROIAlignV2"),
        box_head=L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=16, height=7, width=7),
                                       conv_dims=[], fc_dims=[32]),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=32), test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}"),
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)
"""

RETINANET = """\
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone import BasicStem, FPN, ResNet
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

model = L(RetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=16,
        top_block=L(LastLevelP6P7)(in_channels=512, out_channels="${..out_channels}"),
    ),
    head=L(RetinaNetHead)(
        input_shape=[ShapeSpec(channels=16)] * 5,  # one object five times: a YAML alias
        num_classes="${..num_classes}", conv_dims=[16], prior_prob=0.01, num_anchors=9,
    ),
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [8, 16, 32, 64, 128]],
        aspect_ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128], offset=0.0),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(thresholds=[0.4, 0.5], labels=[0, -1, 1],
                              allow_low_quality_matches=True),
    num_classes=2,
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)
"""

CASCADE = """\
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, FastRCNNConvFCHead, CascadeROIHeads

from .mask_rcnn_fpn import model

[model.roi_heads.pop(k) for k in ["box_head", "box_predictor", "proposal_matcher"]]

model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=16, height=7, width=7),
                                     conv_dims=[], fc_dims=[32]) for k in range(3)],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=32), test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True, num_classes="${...num_classes}")
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False)
                       for th in [0.5, 0.6, 0.7]],
)
"""

FAMILIES = {"mask_rcnn_fpn": RCNN_FPN, "retinanet": RETINANET, "cascade_rcnn": CASCADE}

CHILD = """\
from ..common.models.{family} import model
from ..common.data import dataloader
from ..common.train import lr_multiplier, optimizer, train
from d2ema.d2 import lazy_model_ema_defaults

train.model_ema = lazy_model_ema_defaults()
train.model_ema.enabled = True
train.model_ema.posthoc.enabled = True
train.model_ema.posthoc.period = 1
"""


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lazy_run(request, tmp_path_factory):
    """A tiny LazyConfig of one family trained 2 iterations; its .py then removed."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    project = make_project(root)
    project.write("common/models/__init__.py", "")
    for name, text in FAMILIES.items():  # cascade_rcnn.py imports mask_rcnn_fpn.py, as there
        project.write(f"common/models/{name}.py", text)
    config = project.write(f"my/{family}.py", CHILD.replace("{family}", family))
    out = root / "output"
    argv = ["train", "--config-file", str(config),
            "--dataset", project.spec(f"{family}_train"),
            "--dataset", project.spec(f"{family}_val", "val"),
            f"dataloader.train.dataset.names={family}_train",
            f"dataloader.test.dataset.names={family}_val",
            f"train.output_dir={out}", "optimizer.lr=0.0001"]  # 0.01 diverges in 3 steps
    assert main(argv) == 0
    shutil.rmtree(project.configs)  # the .py is gone: only output/config.yaml is left
    yield out
    shutil.rmtree(root, ignore_errors=True)  # checkpoints and snapshots: nothing left behind


def test_the_saved_config_holds_shapespec_objects(lazy_run):
    text = (lazy_run / "config.yaml").read_text()
    assert "detectron2.layers.shape_spec.ShapeSpec" in text


def test_resume_from_the_saved_config_alone(lazy_run, capsys):
    assert main(["train", "--config-file", str(lazy_run / "config.yaml"), "--resume",
                 "train.max_iter=3"]) == 0, capsys.readouterr().err[-2000:]


def test_posthoc_eval_from_the_saved_config_alone(lazy_run, capsys):
    assert main(["posthoc", str(lazy_run), "--eval", "--sigma-rel", "0.07"]) == 0, (
        capsys.readouterr().err[-2000:])
    assert (lazy_run / "posthoc" / "results.json").is_file()


def test_a_data_class_outside_the_list_is_refused(lazy_run, tmp_path, tally, capsys):
    """Only the listed data classes are rebuilt: another object tag is refused, not called."""
    folder = tmp_path / "copy"
    shutil.copytree(lazy_run, folder, ignore=shutil.ignore_patterns("*.pth", "ema_snapshots"))
    shutil.copy(lazy_run / "model_final.pth", folder / "model_final.pth")
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("detectron2.layers.shape_spec.ShapeSpec",
                                                 "detectron2.structures.boxes.Boxes", 1))
    tally["bad_inputs"] += 1
    assert main(["train", "--config-file", str(config), "--resume"]) == 2
    assert "data classes" in capsys.readouterr().err
    tally["refused_cleanly"] += 1
