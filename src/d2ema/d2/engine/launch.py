"""detectron2's ``launch``, plus a CPU mode: N gloo processes on a machine with no GPU.

With CUDA this is ``detectron2.engine.launch`` unchanged (one process per GPU, NCCL). Without
it, detectron2 v0.6's workers assert CUDA, and on both v0.6 and main ``create_ddp_model`` passes
``device_ids=[local_rank]``, which ``DistributedDataParallel`` refuses for a CPU model. The CPU
mode starts the same processes with the gloo backend, sets up detectron2's local process group
as the installed version does, lets ``create_ddp_model`` wrap CPU models (no ``device_ids``),
and gives each process its share of the cores. It is a testing mode (``d2ema train --num-gpus
2`` on a laptop or CI runs the real multi-process code paths: DDP, gathers, the sharded EMA),
not a way to train fast.

Example::

    launch(train_worker, num_gpus_per_machine=2, dist_url="auto", args=(args,))
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from d2ema.errors import D2EMAError, UsageError

__all__ = ['check_port_free', 'free_default', 'launch', 'prepare_cpu_process']


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta | None = None,
) -> None:
    """``detectron2.engine.launch``; where there is no CUDA device, N CPU processes (gloo)."""
    from detectron2.engine import launch as d2_launch
    from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port

    timeout = timeout or DEFAULT_TIMEOUT
    world_size = num_gpus_per_machine * num_machines
    if world_size > 1 and machine_rank == 0:
        check_port_free(dist_url, _find_free_port)
    try:
        if world_size == 1 or torch.cuda.is_available():
            d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url,
                      args=args, timeout=timeout)
            return
        if dist_url == "auto":
            if num_machines != 1:
                raise UsageError("dist_url=auto works on one machine only; pass tcp://HOST:PORT")
            dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
        torch.multiprocessing.start_processes(
            _cpu_worker,
            nprocs=num_gpus_per_machine,
            args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args,
                  timeout),
            daemon=False,
        )
    except torch.multiprocessing.ProcessExitedException as e:
        rank = machine_rank * num_gpus_per_machine + e.error_index
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with {e.exit_code}"
        raise D2EMAError(
            f"training process of rank {rank} {how}; the other processes were stopped. The "
            "checkpoints written so far are whole: d2ema train --resume continues from the last "
            "one") from None


def free_default(dist_url: str) -> str:
    """The default ``--dist-url``, or ``"auto"`` (a free port) when another process holds its
    port: every user of one machine shares the default, and a busy port would otherwise stop
    the run (a ``--dist-url`` the user gave is checked by `check_port_free` instead)."""
    try:
        check_port_free(dist_url, lambda: 0)
    except UsageError:
        return "auto"
    return dist_url


def check_port_free(dist_url: str | None, free_port: Callable[[], int]) -> None:
    """Refuse, in one line naming the port and how to choose another, a ``tcp://`` address of
    this machine whose port another process holds (a second training, say): the processes
    would otherwise fail one by one with EADDRINUSE tracebacks."""
    import socket
    from urllib.parse import urlparse

    if not dist_url or not dist_url.startswith("tcp://"):
        return
    url = urlparse(dist_url)
    if url.hostname not in ("127.0.0.1", "localhost", "0.0.0.0") or url.port is None:
        return  # another machine's address: machine 0 binds it
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((url.hostname, url.port))
        except OSError:
            raise UsageError(
                f"port {url.port} of --dist-url {dist_url} is in use (another training on this "
                f"machine?); pass a free one, e.g. --dist-url tcp://127.0.0.1:{free_port()}, or "
                "--dist-url auto") from None


def _cpu_worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args,
                timeout) -> None:
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * per_machine + local_rank, timeout=timeout)
    prepare_cpu_process(per_machine)
    main_func(*args)


def prepare_cpu_process(processes_per_machine: int) -> None:
    """What a CPU process needs after ``init_process_group`` to run detectron2's trainers."""
    from detectron2.engine import defaults
    from detectron2.utils import comm

    if comm._LOCAL_PROCESS_GROUP is not None:
        pass
    elif hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(processes_per_machine)
    else:  # v0.6: what its _distributed_worker does
        machine = dist.get_rank() // processes_per_machine
        for i in range(dist.get_world_size() // processes_per_machine):
            ranks = list(range(i * processes_per_machine, (i + 1) * processes_per_machine))
            group = dist.new_group(ranks)
            if i == machine:
                comm._LOCAL_PROCESS_GROUP = group
    if not getattr(defaults.create_ddp_model, "_d2ema_cpu", False):
        defaults.create_ddp_model = _cpu_ddp(defaults.create_ddp_model)
        import detectron2.engine as engine

        engine.create_ddp_model = defaults.create_ddp_model
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_per_machine))
    comm.synchronize()


def _cpu_ddp(create_ddp_model: Callable) -> Callable:
    """``create_ddp_model`` that leaves ``device_ids`` out for a model on the CPU."""

    @functools.wraps(create_ddp_model)
    def wrapper(model, **kwargs):
        if "device_ids" not in kwargs and all(p.device.type == "cpu" for p in model.parameters()):
            kwargs["device_ids"] = None
        return create_ddp_model(model, **kwargs)

    wrapper._d2ema_cpu = True  # type: ignore[attr-defined]
    return wrapper
