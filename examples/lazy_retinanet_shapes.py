"""A LazyConfig with EMA, in the layout of detectron2's ``tools/lazyconfig_train_net.py`` and of
detrex (``train.model_ema``): a ResNet-18 FPN RetinaNet on the embedded ``shapes`` dataset.

Run it (CPU, a few minutes)::

    d2ema train --config-file examples/lazy_retinanet_shapes.py train.max_iter=300

``train.model_ema`` takes detrex's keys (``enabled``, ``decay``, ``device``,
``use_ema_weights_for_eval_only``) plus every key of ``d2ema.d2.lazy_model_ema_defaults()``.
"""

from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import LinearParamScheduler
from torch.optim import SGD

from d2ema.app.model_configs import build_tiny_detector

model = L(build_tiny_detector)(arch="retinanet", num_classes=5, image_size=128)

_resize = [L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)]
dataloader = {
    "train": L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
        mapper=L(DatasetMapper)(
            is_train=True,
            augmentations=[*_resize, L(T.RandomFlip)(horizontal=True)],
            image_format="BGR",
        ),
        total_batch_size=8,
        num_workers=0,
    ),
    "test": L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
        mapper=L(DatasetMapper)(is_train=False, augmentations=_resize, image_format="BGR"),
        num_workers=0,
    ),
    "evaluator": L(COCOEvaluator)(dataset_name="shapes_val", use_fast_impl=False),
}

optimizer = L(SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(LinearParamScheduler)(start_value=1.0, end_value=1.0),  # constant LR
    warmup_length=0.1,
    warmup_factor=0.001,
)

train = {
    "output_dir": "output/lazy_retinanet_shapes",
    "init_checkpoint": "",
    "max_iter": 300,
    "amp": {"enabled": False},
    "ddp": {"broadcast_buffers": False, "find_unused_parameters": False, "fp16_compression": False},
    "checkpointer": {"period": 100, "max_to_keep": 2},
    "eval_period": 100,
    "log_period": 20,
    "device": "cpu",
    "model_ema": {
        "enabled": True,
        "decay": 0.998,
        "device": "",
        "use_ema_weights_for_eval_only": False,
        "schedule": "yolov5",
        "tau": 30.0,
    },
}
