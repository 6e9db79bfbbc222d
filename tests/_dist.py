"""Run a function on N CPU processes joined by gloo, with a deadline so that a hang fails.

Processes come from a fork server that imported torch and detectron2 once, so a job of N ranks
starts in about a second instead of N fresh imports. Each rank's return value comes back
through a file (``torch.save``); an exception in any rank fails the test with its traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "detectron2.engine",
           "detectron2.modeling", "d2ema.d2"]


def _worker(rank: int, fn, world: int, store: str, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
    finally:
        torch.save(locals().get("result"), f"{out}.{rank}")
    dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path: Path, *args, timeout: float = 120.0) -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each rank in its own process."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    store = tmp_path / f"store_{world}_{time.monotonic_ns()}"
    out = tmp_path / f"result_{world}_{time.monotonic_ns()}"
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = mp.start_processes(_worker, args=(fn, world, str(store), str(out), args),
                                 nprocs=world, join=False, start_method="forkserver")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s (a hang)")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
