"""Shared pieces of the detectron2 tests: a tiny registered dataset, configs, the trainer (whose
default evaluator is COCO), and an independent reference EMA computed from the weights after
each step."""

from __future__ import annotations

import math

import torch
from detectron2.engine import HookBase

from d2ema.app.data import register_datasets
from d2ema.app.model_configs import tiny_detector_config
from d2ema.d2 import EMATrainer

TRAIN, VAL = "shapes_train", "shapes_val"
SIZES = {TRAIN: 8, VAL: 4}


def register_tiny(root) -> None:
    register_datasets(root=root, sizes=SIZES, names=[TRAIN, VAL])


def make_cfg(arch: str, out_dir, max_iter: int = 3, evaluate: bool = False, **ema):
    """A tiny config; ``evaluate`` adds the val set (detectron2 v0.6 evaluates after training)."""
    cfg = tiny_detector_config(arch, num_classes=5, image_size=96)
    cfg.DATASETS.TRAIN = (TRAIN,)
    cfg.DATASETS.TEST = (VAL,) if evaluate else ()
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.OUTPUT_DIR = str(out_dir)
    cfg.SEED = 1
    cfg.MODEL_EMA.ENABLED = True
    for key, value in ema.items():
        cfg.MODEL_EMA[key.upper()] = value
    return cfg


Trainer = EMATrainer  # its default evaluator is COCO, as this dataset needs


def tracked_state(model) -> dict[str, torch.Tensor]:
    return {
        **{n: p.detach() for n, p in model.named_parameters()},
        **{n: b for n, b in model.named_buffers()},
    }


class ReferenceEMA(HookBase):
    """The formula, one tensor at a time, in float64: ``e = d * e + (1 - d) * w`` after each
    optimizer step, with ``d`` computed here from the iteration (not by d2ema)."""

    def __init__(self, model, decay_of_step, start_from=None):
        self.model = model
        self.decay_of_step = decay_of_step
        self.ref = start_from
        self.history = []

    def before_train(self):
        if self.ref is None:
            self.ref = {k: v.double().clone() for k, v in tracked_state(self.model).items()}

    def after_step(self):
        step = self.trainer.iter + 1
        d = self.decay_of_step(step)
        for name, w in tracked_state(self.model).items():
            if w.is_floating_point():
                self.ref[name] = d * self.ref[name] + (1 - d) * w.double()
            else:
                self.ref[name] = w.double().clone()
        self.history.append((step, d))


def yolov5(decay: float, tau: float):
    return lambda n: decay * (1 - math.exp(-n / tau))


def assert_matches_reference(ema, ref, rtol=1e-5, atol=1e-6):
    mine = ema.tensors()
    assert set(mine) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(
            mine[name].double(), value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
