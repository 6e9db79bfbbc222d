"""Small detectron2 configs built in code (the v0.6 sdist ships no model-zoo YAMLs).

ResNet-18 FPN detectors for small images on the CPU: what the tests, the demo and the quality
benchmark train. Everything is an ordinary yacs config with ``MODEL_EMA.*`` added, so any key
can be overridden afterwards.

Example::

    cfg = tiny_detector_config("retinanet", num_classes=3, image_size=128)
    cfg.DATASETS.TRAIN = ("shapes_train",)
"""

from __future__ import annotations

from detectron2.config import CfgNode, get_cfg

from d2ema.d2.config.settings import add_model_ema_configs

__all__ = ["ARCHITECTURES", "build_tiny_detector", "tiny_detector_config"]

ARCHITECTURES = ("retinanet", "faster_rcnn")


def tiny_detector_config(
    arch: str = "retinanet",
    *,
    num_classes: int = 3,
    image_size: int = 128,
    depth: int = 18,
    norm: str = "BN",
    device: str = "cpu",
) -> CfgNode:
    """A ResNet-``depth`` FPN RetinaNet or Faster R-CNN for ``image_size`` px images.

    Trained from scratch (no pretrained weights can be downloaded), so the backbone is not
    frozen and uses ``norm`` (BN by default: its running statistics are what EMA of buffers
    averages).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    cfg = get_cfg()
    add_model_ema_configs(cfg)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.PIXEL_MEAN = [127.5, 127.5, 127.5]
    cfg.MODEL.PIXEL_STD = [64.0, 64.0, 64.0]
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    sizes = [s * image_size // 128 for s in (16, 32, 64, 128, 256)]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in sizes]
    if arch == "retinanet":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
        cfg.MODEL.RETINANET.NUM_CONVS = 2
    else:
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 256
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 128
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 256
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.INPUT.MIN_SIZE_TRAIN = (image_size,)
    cfg.INPUT.MAX_SIZE_TRAIN = image_size
    cfg.INPUT.MIN_SIZE_TEST = image_size
    cfg.INPUT.MAX_SIZE_TEST = image_size
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.VERSION = 2
    return cfg


def build_tiny_detector(arch: str = "retinanet", **kwargs):
    """The model of `tiny_detector_config`, for LazyConfigs (``L(build_tiny_detector)()``)."""
    from detectron2.modeling import build_model

    return build_model(tiny_detector_config(arch, **kwargs))
