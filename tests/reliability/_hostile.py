"""Shared pieces of the hostile-input tests: a tiny run config ``d2ema train`` accepts (the
reliability suite's conv net on the embedded shapes dataset), pickles that would create a
marker file when unpickled, a finished post-hoc run folder, and the tally of what was seen."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import _kill_child
import numpy as np
import torch


class Touch:
    """Unpickling this calls ``Path(marker).touch()``: the stand-in for any code a pickle runs."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def evil_pickle(path: Path, marker: Path) -> Path:
    """A ``.pkl`` shaped like detectron2 weights, one of whose values runs code."""
    path.write_bytes(pickle.dumps({"model": {"conv.weight": Touch(marker)},
                                   "__author__": "Detectron", "matching_heuristics": True}))
    return path


def evil_torch_file(path: Path, marker: Path) -> Path:
    """A ``.pth`` (torch zip) whose pickle would run code unless loaded ``weights_only``."""
    torch.save({"model": {"conv.weight": Touch(marker)}, "tensors": Touch(marker)}, path)
    return path


def tiny_state() -> dict[str, np.ndarray]:
    torch.manual_seed(1)
    net = _kill_child.ReliabilityTinyNet()
    return {k: v.detach().numpy().copy() + 1.0 for k, v in net.state_dict().items()
            if v.is_floating_point()}


def tiny_yaml(folder: Path, out: Path, max_iter: int = 2, **overrides) -> Path:
    """A yacs config of the reliability conv net, training on the embedded shapes set (the
    model cannot train on it, but every hostile input here is refused before the first step)."""
    cfg = _kill_child.config(str(out), max_iter)
    cfg.DATASETS.TRAIN = ("shapes_train",)
    cfg.DATASETS.TEST = ()
    cfg.MODEL_EMA.POSTHOC.ENABLED = False
    for key, value in overrides.items():
        node, *path, last = key.split(".")
        target = cfg[node]
        for p in path:
            target = target[p]
        target[last] = value
    path = folder / "tiny.yaml"
    path.write_text(cfg.dump())
    return path


def files_outside(root: Path, before: dict[Path, float]) -> list[Path]:
    """Files under ``root`` created, changed or deleted since ``before`` (a snapshot of mtimes)."""
    now = snapshot(root)
    return sorted({p for p in set(before) | set(now) if before.get(p) != now.get(p)})


def snapshot(root: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def posthoc_series(folder: Path, steps: int = 4) -> None:
    from d2ema import PostHocEMA

    torch.manual_seed(0)
    model = _kill_child.ReliabilityTinyNet()
    ph = PostHocEMA(model, folder, (0.05, 0.1), snapshot_every=1, background=False)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        ph.update(model, step)
    ph.close()


def finished_run(tmp_path: Path) -> Path:
    """A finished run: config.yaml (tests on shapes_val), model_final.pth, last_checkpoint and
    a post-hoc series of 4 steps; and OUTSIDE/ beside it, with a victim file."""
    out = tmp_path / "run"
    out.mkdir()
    cfg_path = tiny_yaml(tmp_path, out, **{"DATASETS.TEST": ("shapes_val",)})
    shutil.copy(cfg_path, out / "config.yaml")
    model = _kill_child.ReliabilityTinyNet()
    torch.save({"model": model.state_dict(), "iteration": 3}, out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    posthoc_series(out / "ema_snapshots")
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    torch.save({"model": model.state_dict(), "iteration": 99}, outside / "victim.pth")
    (outside / "sigma0.05_step00000009.pth").write_bytes(b"victim")
    return out


def rank_one_dies() -> None:
    """A training process body for ``launch``: rank 1 is SIGKILLed, rank 0 waits for the rest."""
    import os
    import signal
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
