"""What users feel: detectron2 RetinaNet training iterations with and without EMA, paired.

Variants, each with its own copy of the same model (same initial weights), its own SGD
optimizer and the same synthetic batches, each iteration detectron2's ``SimpleTrainer.run_step``
followed by the hooks' ``after_step`` (where `EMAUpdateHook` updates):

* ``off``: no EMA, the baseline;
* ``default``: the EMA as `EMATrainer` builds it (``build_model_ema`` with the
  config's defaults: flat mode, an update every step);
* ``every4``: ``MODEL_EMA.UPDATE_EVERY = 4``;
* ``other_device``: on a CUDA model ``MODEL_EMA.DEVICE = "cpu"``, the background path of
  `d2ema.averaging.offload`; on a CPU-only machine there is no other device, and the row runs
  the
  same background path with ``overlap=True`` (snapshot on the CPU, ``lerp_`` in a thread);
* ``other_device_sync`` (CUDA only): the same CPU-held EMA updated synchronously
  (``overlap=False``): copy, wait, lerp, what the background path saves.

Timing: in each round every variant runs ``iters`` iterations as one timed block, in a rotating
order; on CUDA a block ends with ``torch.cuda.synchronize()``. A background EMA update left
running at the end of a block is completed outside the timed block (in steady state the next
update waits for it, which the following blocks measure). The result is the median over rounds
of each variant's per-iteration time over ``off``'s in the same round, with p10-p90, and the
update alone timed apart, to tell the cost from the noise.

Example::

    print(run(device="cpu", rounds=8, iters=3))
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from d2ema.app.speed.timing import RESULTS, environment, quantile, synchronizer
from d2ema.errors import UsageError

__all__ = ["CPU_VARIANTS", "VARIANTS", "main", "run"]

VARIANTS = ("off", "default", "every4", "other_device", "other_device_sync")
CPU_VARIANTS = VARIANTS[:4]
DEFAULT_OUT = RESULTS / "train_step.md"


def _config(arch: str, device: str):
    """``r18``: the tests' ResNet-18 FPN RetinaNet (CPU-sized); ``r50``: detectron2's
    RetinaNet R50-FPN (4 conv heads, 256 FPN channels, FrozenBN backbone) from code."""
    from detectron2.config import get_cfg

    from d2ema.app.model_configs import tiny_detector_config
    from d2ema.d2.config.settings import add_model_ema_configs

    if arch == "r18":
        cfg = tiny_detector_config("retinanet", num_classes=5, image_size=128, device=device)
    elif arch == "r50":
        cfg = get_cfg()
        add_model_ema_configs(cfg)
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.DEPTH = 50
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.DEVICE = device
    else:
        raise ValueError(f"unknown arch {arch!r}: r18 or r50")
    cfg.SOLVER.BASE_LR = 0.001
    cfg.MODEL_EMA.ENABLED = True
    return cfg


def _batches(size: int, batch: int, num_classes: int, n: int = 4) -> list[list[dict]]:
    """``n`` fixed batches of random images with 1-4 random boxes each (no dataset needed)."""
    from detectron2.structures import Boxes, Instances

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        items = []
        for _ in range(batch):
            image = torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8)
            k = int(torch.randint(1, 5, (1,), generator=gen))
            xy = torch.rand(k, 2, generator=gen) * size * 0.6
            wh = 8 + torch.rand(k, 2, generator=gen) * size * 0.35
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            inst.gt_classes = torch.randint(0, num_classes, (k,), generator=gen)
            items.append({"image": image, "instances": inst, "height": size, "width": size})
        out.append(items)
    return out


@dataclasses.dataclass
class Variant:
    name: str
    note: str
    trainer: Any  # a detectron2 trainer
    ema: Any  # an EMA or None

    def step(self, it: int) -> None:
        t = self.trainer
        t.iter = it
        t.before_step()
        t.run_step()
        t.after_step()


def _build(name: str, cfg, init: dict, batches, device: torch.device) -> Variant:
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    from d2ema import EMA
    from d2ema.d2 import EMAUpdateHook, build_model_ema
    from d2ema.d2.config.settings import ema_settings

    cfg = cfg.clone()
    cfg.defrost()
    model = build_model(cfg)
    model.load_state_dict(init)
    ema, note = None, "no EMA"
    if name == "default":
        ema, note = build_model_ema(cfg, model), "as EMATrainer builds it (flat, every step)"
    elif name == "every4":
        cfg.MODEL_EMA.UPDATE_EVERY = 4
        ema, note = build_model_ema(cfg, model), "UPDATE_EVERY 4 (flat)"
    elif name == "other_device" and device.type == "cuda":
        cfg.MODEL_EMA.DEVICE = "cpu"
        ema, note = build_model_ema(cfg, model), "DEVICE cpu: side-stream copy, host lerp"
    elif name == "other_device_sync":
        if device.type != "cuda":
            raise UsageError("other_device_sync needs a CUDA model: run on a GPU or leave it "
                             "out of --variants")
        cfg.MODEL_EMA.DEVICE = "cpu"
        kwargs = {**ema_settings(cfg).ema_kwargs(), "flat": True, "overlap": False}
        ema, note = EMA(model, **kwargs), "DEVICE cpu, overlap=False: copy, wait, lerp"
    elif name == "other_device":
        kwargs = {**ema_settings(cfg).ema_kwargs(), "flat": True, "overlap": True}
        ema = EMA(model, **kwargs)
        note = "no other device here: overlap=True (CPU snapshot, lerp in a thread)"
    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, itertools.cycle(batches), optimizer)
    if ema is not None:
        trainer.register_hooks([EMAUpdateHook(ema, model)])
    return Variant(name, note, trainer, ema)


def _time_update(v: Variant, sync: Callable[[], None], reps: int = 10) -> float:
    """Median ms of one EMA update alone (completed, background or not)."""
    model = v.trainer.model
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        e = v.ema
        e.update(model, step=e.start + ((e.step - e.start) // e.every + 1) * e.every)
        v.ema.synchronize()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantile(times, 0.5)


def run(
    device: str | torch.device = "cpu",
    *,
    arch: str | None = None,
    size: int | None = None,
    batch: int = 2,
    iters: int = 3,
    rounds: int = 8,
    warmup: int = 1,
    threads: int = 2,
    variants: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Time the variants (default: all that the device has) and return the markdown report."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    device = torch.device(device)
    variants = variants or (VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    torch.set_num_threads(threads)
    arch = arch or ("r50" if device.type == "cuda" else "r18")
    size = size or (640 if arch == "r50" else 128)
    cfg = _config(arch, str(device))
    torch.manual_seed(0)
    init = copy.deepcopy(build_model(cfg).state_dict())
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    batches = _batches(size, batch, num_classes)
    sync = synchronizer(device)
    built = [_build(name, cfg, init, batches, device) for name in variants]
    log(f"[train_step] {arch} at {size} px, batch {batch}: {', '.join(variants)}")
    times: dict[str, list[float]] = {v.name: [] for v in built}
    with EventStorage(0) as storage:
        for v in built:
            v.trainer.storage = storage
            v.trainer.before_train()
        it = 0
        gc.collect()
        for r in range(warmup + rounds):
            for k in range(len(built)):
                v = built[(r + k) % len(built)]
                sync()
                t0 = time.perf_counter()
                for i in range(iters):
                    v.step(it + i)
                sync()
                elapsed = (time.perf_counter() - t0) / iters
                if v.ema is not None:
                    v.ema.synchronize()  # outside the block: see the module docstring
                if r >= warmup:
                    times[v.name].append(elapsed * 1e3)
            it += iters
            log(f"[train_step] round {r + 1}/{warmup + rounds}")
        alone = {v.name: _time_update(v, sync) for v in built if v.ema is not None}
    return _report(built, times, alone, arch, size, batch, iters, rounds, warmup, threads, device)


def _report(built, times, alone, arch, size, batch, iters, rounds, warmup, threads, device):
    model = built[0].trainer.model
    params = sum(p.numel() for p in model.parameters()) / 1e6
    base = times.get("off")
    out = [
        "# Training step with EMA", "", *environment(threads, device),
        f"- model: detectron2 RetinaNet {arch.upper()}-FPN, {params:.1f} M parameters, "
        f"{size}×{size} px, batch {batch}, SGD; synthetic batches (no data loading)",
        f"- {rounds} rounds after {warmup} warm-up; in each round every variant runs {iters} "
        "iterations as one timed block, in a rotating order", "",
        "**× off** is the median over rounds of a variant's time per iteration over EMA-off's "
        "in the same round (p10–p90 beside it); **update alone** is one EMA update timed "
        "apart, completed (background included), and **alone / step** what it would add to "
        "an iteration if nothing overlapped it.", "",
        "| variant | ms / iteration | × off | p10–p90 × off | update alone ms | "
        "alone / step | note |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for v in built:
        t = times[v.name]
        ratio = [a / b for a, b in zip(t, base)] if base else [math.nan]
        med = quantile(t, 0.5)
        upd = alone.get(v.name)
        every = v.ema.every if v.ema is not None else 1
        upd_s = f"{upd:.2f}" if upd is not None else "–"
        share = f"{100 * upd / every / med:.1f}%" if upd is not None else "–"
        out.append(
            f"| {v.name} | {med:.1f} | **{quantile(ratio, 0.5):.3f}** | "
            f"{quantile(ratio, 0.1):.3f}–{quantile(ratio, 0.9):.3f} | {upd_s} | {share} | "
            f"{v.note} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the report and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--arch", choices=("r18", "r50"), default=None,
                        help="r18 at 128 px (CPU default) or R50-FPN at 640 px (CUDA default)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="images per iteration (2)")
    parser.add_argument("--iters", type=int, default=3, help="iterations per timed block (3)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all (CUDA), all but other_device_sync (CPU)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file; '-': none")
    args = parser.parse_args(argv)
    if args.variants and args.variants[0] != "off":
        parser.error("--variants must start with 'off' (the baseline of the ratios)")
    report = run(args.device, arch=args.arch, size=args.size, batch=args.batch,
                 iters=args.iters, rounds=args.rounds, warmup=args.warmup,
                 threads=args.threads, variants=args.variants,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(report)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        print(f"[train_step] wrote {args.out}", file=sys.stderr)
    return 0
