"""The training that test_kill_resume.py kills: d2ema's EMATrainer (detectron2's DefaultTrainer
with its PeriodicCheckpointer) on a tiny conv net, saving a checkpoint every iteration.

It runs in a process forked from a forkserver that imported torch and detectron2 once, so a
start costs milliseconds. ``run`` resumes, writes what it resumed to (model, EMA, step) to
``dump``, then trains; ``plan`` makes it SIGKILL itself at a chosen point of a chosen save:
in the middle of writing the file, just before its rename, or just after it (before
``last_checkpoint`` is rewritten).
"""

from __future__ import annotations

import io
import os
import signal

import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from d2ema.d2 import EMATrainer, add_model_ema_configs, get_model_ema

_REAL_SAVE = torch.save
_REAL_REPLACE = os.replace


class ReliabilityTinyNet(nn.Module):
    """Conv + BN (running stats and an integer counter, all in the EMA) + linear head."""

    def __init__(self, cfg=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, batched_inputs):
        x = torch.stack([d["image"] for d in batched_inputs])
        logits = self.head(self.bn(self.conv(x)).relu().mean((2, 3)))
        if not self.training:
            return logits
        labels = torch.tensor([d["label"] for d in batched_inputs])
        return {"loss_cls": F.cross_entropy(logits, labels)}


if "ReliabilityTinyNet" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(ReliabilityTinyNet)


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield [{"image": torch.randn(3, 8, 8, generator=g),
                "label": int(torch.randint(4, (1,), generator=g))} for _ in range(4)]


class KillTrainer(EMATrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return _batches(cfg.SEED)

    def build_writers(self):
        return []

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        return {}


def config(out_dir: str, max_iter: int):
    cfg = get_cfg()
    add_model_ema_configs(cfg)
    cfg.MODEL.META_ARCHITECTURE = "ReliabilityTinyNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = out_dir
    cfg.SEED = 3
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.DECAY = 0.8
    cfg.MODEL_EMA.POSTHOC.ENABLED = True  # a snapshot series too, written in the background
    cfg.MODEL_EMA.POSTHOC.PERIOD = 1
    return cfg


class _Dump(HookBase):
    """Right after the resume (after EMAUpdateHook.before_train): what training continues from."""

    def __init__(self, path: str):
        self.path = path

    def before_train(self):
        trainer = self.trainer
        ema = get_model_ema(trainer.model)
        state = {
            "start_iter": trainer.start_iter,
            "resumed_from": getattr(trainer.checkpointer, "resumed_from", None),
            "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in ema.tensors().items()},
            "ema_step": ema.step,
        }
        _REAL_SAVE(state, self.path + ".part")
        _REAL_REPLACE(self.path + ".part", self.path)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(checkpointer, plan) -> None:
    kind, target, fraction = plan
    current = {"name": None}
    save = checkpointer.save

    def tracked_save(name, **kwargs):
        current["name"] = name
        try:
            save(name, **kwargs)
        finally:
            current["name"] = None

    def killing_save(obj, f, *args, **kwargs):
        if kind == "mid_write" and current["name"] == target:
            buffer = io.BytesIO()
            _REAL_SAVE(obj, buffer)
            data = buffer.getvalue()
            f.write(data[: int(len(data) * fraction)])
            f.flush()
            _die()
        return _REAL_SAVE(obj, f, *args, **kwargs)

    def killing_replace(src, dst):
        hit = current["name"] == target and os.path.basename(dst) == f"{target}.pth"
        if hit and kind == "before_rename":
            _die()
        _REAL_REPLACE(src, dst)
        if hit and kind == "after_rename":
            _die()

    checkpointer.save = tracked_save
    torch.save = killing_save
    os.replace = killing_replace


def run(out_dir: str, max_iter: int, plan, dump: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)  # as detectron2's default_setup does
    trainer = KillTrainer(config(out_dir, max_iter))
    trainer.resume_or_load(resume=True)
    trainer.register_hooks([_Dump(dump)])
    if plan[0] in ("mid_write", "before_rename", "after_rename"):
        _install_kill(trainer.checkpointer, plan)
    trainer.train()
