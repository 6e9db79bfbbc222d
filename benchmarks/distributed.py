"""Per-rank EMA memory and update time with 1, 2 and 4 processes, sharded and not.

Each process (gloo on the CPU, one thread) builds the same model and keeps two EMAs of it: the
plain :class:`d2ema.EMA` (a full copy on every rank, what every detection codebase does today)
and :class:`d2ema.distributed.ShardedEMA` (each rank stores and updates its share, balanced by
bytes). Per repetition, after a barrier so that the ranks run at the same time, every rank
times one update of each (round robin), one all-reduce of the floating buffers
(:func:`d2ema.distributed.averaged_buffers`, what each step adds under DDP), and, less often,
the all-gather of the sharded EMA that evaluation and checkpoints need.

On a machine with fewer cores than processes the ranks share cores, so absolute times grow with
the process count for both EMAs; the ratio sharded / unsharded, measured side by side in the
same run, is the result. The report then works the numbers out for 8 GPUs on RetinaNet R50-FPN
and on a ViTDet-H-size model (the ViT-H encoder, counted on the meta device), with the
per-rank bytes from the real tensor lists and :func:`d2ema.distributed.assign_by_bytes`.

Run ``python benchmarks/distributed.py`` (a few minutes on 2 cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import d2ema
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))
    import d2ema
from update_speed import MODEL_TITLES, MODELS, _environment, _perturb  # noqa: E402

from d2ema.distributed import (  # noqa: E402
    ShardedEMA,
    assign_by_bytes,
    averaged_buffers,
)

DECAY = 0.9998
DEFAULT_OUT = HERE / "results" / "distributed.md"
MiB = 2**20
# 8-GPU projection: H100 SXM HBM3 peak bandwidth (spec sheet), and an all-gather bus
# bandwidth over NVLink that NCCL reaches on 8 H100s (assumption, stated in the report).
HBM_BYTES_PER_S = 3.35e12
ALLGATHER_BYTES_PER_S = 350e9


def _median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def _rank(rank: int, world: int, store: str, model_name: str, reps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    torch.manual_seed(0)
    model = MODELS[model_name]()
    plain = d2ema.EMA(model, DECAY)
    sharded = ShardedEMA(model, DECAY)
    _perturb(model)
    times: dict[str, list[float]] = {"plain": [], "sharded": [], "buffers": [], "gather": []}

    def timed(key: str, fn) -> None:
        dist.barrier()
        start = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - start)

    def buffers() -> None:
        with averaged_buffers(model):
            pass

    for step in range(3 + reps):
        order = [("plain", lambda: plain.update(model)), ("sharded", lambda: sharded.update(model)),
                 ("buffers", buffers)]
        for key, fn in order[step % 3:] + order[: step % 3]:
            timed(key, fn)
        if step % 4 == 0 and world > 1:
            timed("gather", sharded.gather)
        if step == 2:
            times = {k: [] for k in times}  # warm-up
    if world > 1:
        full = sharded.gather()
        mine = plain.tensors()
        assert all(torch.equal(full[n], mine[n]) for n in mine), "sharded != unsharded"
    torch.save({"plain_bytes": plain.num_bytes, "sharded_bytes": sharded.num_bytes,
                "times": times, "buffer_bytes": _buffer_bytes(model)}, f"{out}.{rank}")
    dist.destroy_process_group()


def _buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())


def measure(model_name: str, world: int, reps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), model_name, reps, out),
                           nprocs=world, start_method="spawn")
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def _measured_table(model_name: str, worlds: Sequence[int], reps: int) -> list[str]:
    lines = [
        "| processes | EMA bytes per rank, plain | sharded (largest rank) | × | update ms per "
        "rank, plain | sharded (slowest rank) | × | buffer all-reduce ms | all-gather ms |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for world in worlds:
        t0 = time.perf_counter()
        ranks = measure(model_name, world, reps)
        plain_b = ranks[0]["plain_bytes"]
        shard_b = max(r["sharded_bytes"] for r in ranks)
        plain_t = max(_median_ms(r["times"]["plain"]) for r in ranks)
        shard_t = max(_median_ms(r["times"]["sharded"]) for r in ranks)
        buf_t = max(_median_ms(r["times"]["buffers"]) for r in ranks) if world > 1 else 0.0
        gather = (f"{max(_median_ms(r['times']['gather']) for r in ranks):.1f}"
                  if world > 1 else "–")
        lines.append(
            f"| {world} | {plain_b / MiB:.1f} MiB | {shard_b / MiB:.1f} MiB | "
            f"{shard_b / plain_b:.2f} | {plain_t:.1f} | {shard_t:.1f} | {shard_t / plain_t:.2f} | "
            f"{buf_t:.2f} | {gather} |"
        )
        print(f"  {world} processes: {time.perf_counter() - t0:.0f} s", flush=True)
    buffer_kib = ranks[0]["buffer_bytes"] / 1024
    lines += ["", f"Floating buffers all-reduced per step (in float64): {buffer_kib:.0f} KiB "
              "of float32 buffers."]
    return lines


def _vit_h_sizes() -> list[int]:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.vit_h_14()
    return [p.numel() * 4 for p in model.parameters()] + [
        b.numel() * 4 for b in model.buffers() if b.is_floating_point()]


def _retinanet_sizes() -> list[int]:
    model = MODELS["retinanet_r50_fpn"]()
    tensors = list(model.parameters()) + [b for b in model.buffers()]
    return [t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors]


def projection(world: int = 8) -> list[str]:
    """Per-rank numbers for ``world`` GPUs, from the models' real tensor sizes."""
    lines = [
        f"| model | EMA (fp32) | per rank, plain | per rank, sharded ({world} GPUs) | saved per "
        "GPU | update per step, plain | sharded | all-gather (eval/save only) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    models = {"RetinaNet R50-FPN (detectron2)": _retinanet_sizes(),
              "ViTDet-H size (ViT-H encoder, torchvision vit_h_14)": _vit_h_sizes()}
    for title, sizes in models.items():
        total = sum(sizes)
        owners = assign_by_bytes(sizes, world)
        largest = max(sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world))
        # an update reads the weights and the EMA and writes the EMA: 12 bytes per fp32 value
        plain_ms = 3 * total / HBM_BYTES_PER_S * 1e3
        shard_ms = 3 * largest / HBM_BYTES_PER_S * 1e3
        gather_ms = (world - 1) / world * total / ALLGATHER_BYTES_PER_S * 1e3
        lines.append(
            f"| {title} | {total / MiB:,.0f} MiB ({total / 4 / 1e6:,.1f} M values) | "
            f"{total / MiB:,.0f} MiB | {largest / MiB:,.1f} MiB | {(total - largest) / MiB:,.0f} "
            f"MiB | {plain_ms:.3f} ms | {shard_ms:.3f} ms | {gather_ms:.2f} ms |"
        )
    return lines


def run(models: Sequence[str], worlds: Sequence[int], reps: int) -> str:
    lines = ["# Distributed EMA: per-rank memory and update time", "",
             *_environment(1, torch.device("cpu")), f"- decay: {DECAY}; gloo, 1 thread per "
             f"process, {reps} repetitions after 3 warm-up", "",
             "Per rank: **plain** = `EMA` (a full copy on every rank), **sharded** = "
             "`ShardedEMA`, timed side by side after a barrier; × = sharded / plain in the same "
             f"run. This machine has {os.cpu_count()} cores: with more processes than cores "
             "the ranks share them, so absolute times grow with the process count for both; "
             "the ratio is the result. Every run checks that the gathered sharded EMA equals "
             "the plain one bit for bit.", ""]
    for name in models:
        lines += [f"## {MODEL_TITLES.get(name, name)} (`{name}`), measured", ""]
        lines += [*_measured_table(name, worlds, reps), ""]
    lines += [
        "## Worked out for 8 GPUs", "",
        "Per-rank bytes from each model's real tensor list and `assign_by_bytes` (largest rank "
        "shown). Update time is the memory traffic of one update (read weights and EMA, write "
        f"EMA: 12 bytes per fp32 value) at the H100 SXM's {HBM_BYTES_PER_S / 1e12:.2f} TB/s "
        "peak HBM bandwidth, a lower bound; the all-gather moves (N-1)/N of the EMA to every "
        f"rank at an assumed {ALLGATHER_BYTES_PER_S / 1e9:.0f} GB/s NCCL bus bandwidth over "
        "NVLink, and happens only at evaluations and checkpoints.", "",
        *projection(8), "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["retinanet_r50_fpn"], choices=list(MODELS))
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 repetitions, write nothing")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="'-' writes nothing")
    args = parser.parse_args(argv)
    reps = 3 if args.quick else args.reps
    started = datetime.datetime.now()
    report = run(args.models, args.worlds, reps)
    print(report)
    if not args.quick and args.out != "-":
        Path(args.out).write_text(report)
        print(f"wrote {args.out} in {(datetime.datetime.now() - started).seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
