"""Background updates: an EMA kept off the accelerator without stalling it.

``EMA(model, device="cpu")`` keeps the average of a CUDA model out of GPU memory. Done
synchronously, each update copies the weights to the host, waits for the copy, then lerps on
the CPU while the training loop stands still. With ``overlap`` (the default for a CUDA model
and a CPU EMA) an update only queues that work:

1. it completes the update before it (a queue of one: one staging buffer, one job);
2. on the current stream it snapshots the buffers (BN statistics, which the next forward
   writes) into a device buffer of their size, the only device memory used;
3. a side stream waits for the current stream's work so far (the optimizer step) and copies
   the parameters and the buffer snapshot into pinned host memory, non-blocking;
4. a worker thread waits for that copy and lerps on the CPU while the GPU runs the next steps;
5. the current stream waits for the copy (a wait queued on the GPU, the host does not block)
   before the parameters can be written again: before the next ``torch.optim`` optimizer step,
   or, until such a step has been seen between two updates, before the model's next forward.

Every EMA method that reads or writes the averages (``swapped``, ``state_dict``, ``copy_to``,
``load_state_dict``...) completes the update in flight first, so evaluations and checkpoints
see the whole average; `d2ema.EMA.synchronize` does it by hand. The result is bitwise
the synchronous path's: the same copies and the same ``lerp_`` on the same device, run later.
Weights written between ``update()`` and the next optimizer step by anything else than the
forward (hand-made weight surgery) need ``ema.synchronize()`` first.

On a CPU model ``EMA(..., overlap=True)`` snapshots the weights synchronously and runs the
``lerp_`` in the background (what the CPU tests exercise).

Example::

    ema = EMA(model.cuda(), device="cpu")   # overlap on by default here
    ...
    ema.update(model)                       # returns at once; the host lerp runs meanwhile
    with ema.swapped(model):                # waits for the update in flight
        evaluate(model)
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from d2ema.averaging.update import Binding, GlobalHooks

__all__ = ['Offload', 'split_offload', 'wants_overlap']


_worker: concurrent.futures.ThreadPoolExecutor | None = None


_worker_lock = threading.Lock()


# Offloads copying from CUDA: the optimizer-step hook tells each of them.
_live: weakref.WeakSet = weakref.WeakSet()


def wants_overlap(bindings: Sequence[Binding]) -> bool:
    """The default: overlap where a CUDA model's average lives on the CPU."""
    return any(
        b.cross_device and b.model_device.type == "cuda" and b.group.device.type == "cpu"
        for b in bindings
    )


def split_offload(
    bindings: list[Binding], overlap: bool | None, model: nn.Module
) -> tuple[Offload | None, list[Binding]]:
    """The `Offload` of the bindings updated in the background (None if none), and
    the bindings updated directly. ``overlap=None``: see `wants_overlap`."""
    if overlap is None:
        overlap = wants_overlap(bindings)
    queued = [b for b in bindings if b.staging is not None] if overlap else []
    direct = [b for b in bindings if b not in queued]
    return (Offload(queued, model) if queued else None), direct


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="d2ema")
        return _worker


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    for offload in list(_live):
        offload.optimizer_step()


# Installed while an Offload copying from CUDA lives.
OPTIMIZER_STEPS = GlobalHooks(lambda: [register_optimizer_step_pre_hook(_before_optimizer_step)])


class _ForwardFence:
    """Forward pre-hook: fence before the forward until optimizer steps are seen. Copies and
    pickles of the model get a hook that does nothing."""

    def __init__(self, ref: weakref.ref | None):
        self.ref = ref

    def __call__(self, module: nn.Module, args: Any) -> None:
        offload = self.ref() if self.ref is not None else None
        if offload is not None:
            offload.before_forward()

    def __reduce__(self):
        return (_ForwardFence, (None,))


class _Plan:
    """One binding's device-to-host copy: buffers snapshotted on the current stream, then
    parameters and snapshot copied to the staging buffer on the side stream."""

    def __init__(self, b: Binding):
        assert b.staging is not None
        self.binding = b
        is_buf = [not s.is_param for s in b.slots]
        bufs = [t for t, f in zip(b.model, is_buf) if f]
        n = sum(t.numel() for t in bufs)
        self.snapshot = torch.empty(n, dtype=b.model[0].dtype, device=b.model_device)
        total = b.staging.numel()
        if b.model_flat is not None and is_buf == sorted(is_buf):  # parameters, then buffers
            p = total - n
            self.pre = ([self.snapshot], [b.model_flat[p:]])
            self.copies = ([b.staging[:p], b.staging[p:]], [b.model_flat[:p], self.snapshot])
        else:
            snap = []
            offset = 0
            for t in bufs:
                snap.append(self.snapshot[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
            dst = [v for v, f in zip(b.staging_views, is_buf) if not f]
            dst += [v for v, f in zip(b.staging_views, is_buf) if f]
            self.pre = (snap, bufs)
            self.copies = (dst, [t for t, f in zip(b.model, is_buf) if not f] + snap)
        # The storages read by the side stream stay alive until the copy is done, even if
        # the model's tensors are moved meanwhile.
        self.keepalive = [t.untyped_storage() for t in b.model]

    @torch.no_grad()
    def snapshot_buffers(self) -> None:
        if self.pre[0]:
            torch._foreach_copy_(*self.pre)

    @torch.no_grad()
    def copy_to_host(self) -> None:
        for dst, src in zip(*self.copies):
            if dst.numel():
                dst.copy_(src, non_blocking=True)


class _SyncCopy:
    """Same-device or non-CUDA weights: the snapshot is taken at once."""

    asynchronous = False

    def start(self, offload: Offload) -> None:
        for b in offload.bindings:
            b.stage()

    def fence(self, handle: Any) -> None:
        pass

    def wait(self, handle: Any) -> None:
        pass


class _CudaCopy:
    """Copies on a side stream; the current stream waits for them only when fenced."""

    asynchronous = True

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, offload: Offload) -> torch.cuda.Event:
        current = torch.cuda.current_stream(self.device)
        for plan in offload.plans:
            plan.snapshot_buffers()
        ready = current.record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for plan in offload.plans:
                plan.copy_to_host()
            return self.stream.record_event()

    def fence(self, done: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(done)

    def wait(self, done: torch.cuda.Event) -> None:
        done.synchronize()


def _copier_for(device: torch.device) -> _SyncCopy | _CudaCopy:
    return _CudaCopy(device) if device.type == "cuda" else _SyncCopy()


class Offload:
    """Runs the staged updates of ``bindings`` in the background (see the module docstring)."""

    def __init__(self, bindings: list[Binding], model: nn.Module):
        self.bindings = bindings
        self.copier = _copier_for(bindings[0].model_device)
        self.plans = [_Plan(b) for b in bindings] if self.copier.asynchronous else []
        self._job: concurrent.futures.Future | None = None
        self._unfenced: Any = None
        self._stepped = False  # a torch.optim step since the last update
        self._trust_optimizer = False  # the last interval had one: fence there, not at forward
        if self.copier.asynchronous:
            OPTIMIZER_STEPS.hold(self)
            _live.add(self)
            handle = model.register_forward_pre_hook(_ForwardFence(weakref.ref(self)))
            weakref.finalize(self, handle.remove)

    def submit(self, alpha: float | None, then: Callable[[], None] | None = None) -> None:
        """Start one update: ``lerp_`` weight ``alpha`` (integer groups and None: copy); the
        worker calls ``then`` after it."""
        alphas = [alpha if b.group.averaged else None for b in self.bindings]
        self.wait()
        self._trust_optimizer, self._stepped = self._stepped, False
        handle = self.copier.start(self)
        if self.copier.asynchronous:
            self._unfenced = handle
        self._job = _executor().submit(self._finish, handle, list(alphas), then)

    def _finish(self, handle: Any, alphas: list[float | None], then) -> None:
        self.copier.wait(handle)
        for b, alpha in zip(self.bindings, alphas):
            b.finish(alpha)
        if then is not None:
            then()

    def fence(self) -> None:
        """Make the current stream wait for the copy in flight, if any (no host wait)."""
        if self._unfenced is not None:
            handle, self._unfenced = self._unfenced, None
            self.copier.fence(handle)

    def optimizer_step(self) -> None:
        self._stepped = True
        self.fence()

    def before_forward(self) -> None:
        if not self._trust_optimizer:
            self.fence()

    def wait(self) -> None:
        """Complete the update in flight: the averages are whole when this returns."""
        self.fence()
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

    @property
    def busy(self) -> bool:
        return self._job is not None
