"""The update kernels: one `Binding` links a `TensorGroup` to the model's tensors.

Per group and step, the work is a few fused ops chosen once, when the EMA binds to a model:

* model tensors in one buffer laid out like the EMA's (``flat=True``): a single ``lerp_``;
* same device and dtype: one ``torch._foreach_lerp_`` over prebuilt lists. On the CPU the
  small tensors (laid out first in the group, see `SMALL_NUMEL`) are
  gathered with ``torch.cat`` into a scratch buffer and averaged with ``lerp_``, in chunks
  below ATen's grain size (32768 elements): per-tensor dispatch costs more than their bytes,
  ``cat`` takes its serial memcpy path below the grain size (above it, with two or more
  threads, it copies input by input and is slower than the foreach it replaces), and no op of
  the chunk waits for a second thread that a busy machine has descheduled;
* another dtype or device (fp32 master of a bf16 model, CPU EMA of a GPU model): one copy into
  a reusable staging buffer on the EMA's device (pinned for GPU -> CPU, in the model's dtype
  across devices), then one ``lerp_``. `d2ema.averaging.offload` runs the copy on a side
  stream and
  the ``lerp_`` in a background thread.

No step allocates or walks the model in Python. ``lerp_`` with weight ``1 - d`` computes
``d * ema + (1 - d) * w``; it is exact at ``d = 0`` and ``d = 1`` and leaves a constant weight
constant.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from d2ema.averaging.state import Slot, TensorGroup, gatherable, same_layout, views

__all__ = [
    'REGISTRATIONS', 'Binding', 'GlobalHooks', 'flat_view', 'registration_count', 'update_all',
]


# ATen's at::internal::GRAIN_SIZE: a cat below it runs serially as plain memcpys.
_CAT_CHUNK = 32768


class GlobalHooks:
    """Process-wide torch hooks that exist only while an object needs them.

    torch offers some hooks only for every module or optimizer of the process
    (``register_module_buffer_registration_hook``, ``register_optimizer_step_pre_hook``). They
    are installed when the first object that needs them is made and removed when the last one is
    garbage-collected, so that importing d2ema, or an EMA that is gone, leaves torch as it was.

    Example::

        WATCH = GlobalHooks(lambda: [register_optimizer_step_pre_hook(before_step)])
        WATCH.hold(self)          # in __init__: installed while self lives
    """

    def __init__(self, install: Callable[[], list[RemovableHandle]]):
        self._install = install
        self._handles: list[RemovableHandle] = []
        self._users = 0
        # Reentrant: a collection inside install() may run a release in this thread.
        self._lock = threading.RLock()

    def hold(self, owner: object) -> weakref.finalize:
        """Keep the hooks installed while ``owner`` lives; calling the result releases them
        earlier (once)."""
        with self._lock:
            if not self._users:
                self._handles = self._install()
            self._users += 1
        return weakref.finalize(owner, self._release)

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._users:
                for handle in self._handles:
                    handle.remove()
                self._handles = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)


# Counts parameter, buffer and submodule (re-)registrations in every module of the process
# (``module.running_mean = torch.zeros(3)``, ``module.weight = nn.Parameter(...)``,
# ``model.head = nn.Linear(...)``) while an EMA lives, so that its tensors and names are
# re-checked only after such an event, not on every step.
_registrations = 0


def _count_registration(module, name, value) -> None:
    global _registrations
    _registrations += 1


REGISTRATIONS = GlobalHooks(lambda: [
    nn.modules.module.register_module_buffer_registration_hook(_count_registration),
    nn.modules.module.register_module_parameter_registration_hook(_count_registration),
    nn.modules.module.register_module_module_registration_hook(_count_registration),
])


def registration_count() -> int:
    """How many registrations happened so far while `REGISTRATIONS` was held (compare two
    readings made while holding it to detect one)."""
    return _registrations


def flat_view(
    tensors: list[torch.Tensor], strides: list[tuple[int, ...]] | None = None
) -> torch.Tensor | None:
    """A 1-D view over ``tensors`` if they lie back to back in one storage, each dense with
    ``strides[i]`` (default: contiguous), else None."""
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return None
    first = nonempty[0]
    if strides is None:
        if not all(t.is_contiguous() for t in tensors):
            return None
    elif not all(same_layout(t, st) for t, st in zip(tensors, strides)):
        return None
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    expected = offset
    for t in nonempty:
        if (
            t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != expected
            or t.dtype != first.dtype
        ):
            return None
        expected += t.numel()
    with torch.no_grad():
        return first.new_empty(0).set_(  # type: ignore[call-overload]  # torch's stubs
            first.untyped_storage(), offset, (expected - offset,))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


class Binding:
    """One group's link to the live model tensors it averages, with its update kernels.

    ``stage=True`` gives it a staging buffer even on the model's device and dtype, so that the
    weights can be snapshotted and averaged later (`d2ema.averaging.offload`).
    """

    def __init__(self, group: TensorGroup, slots: list[Slot], *, stage: bool = False):
        self.group = group
        self.slots = slots
        self.model = [s.get() for s in slots]
        src = self.model[0]
        self.model_device = src.device
        self.cross_device = src.device != group.device
        self.staged = self.cross_device or src.dtype != group.dtype
        # FSDP2 all-gathers from its own flat shard storage, not from the shard tensors' .data:
        # swapping .data would go unseen there, so the EMA is copied in and out instead.
        self.swap_by_copy = self.staged or any(s.local for s in slots)
        self.model_flat = flat_view(self.model, group.strides)
        # The inf-norm of an empty tensor is an error, not 0: leave those out of the check.
        self._nonempty = [t for t in self.model if t.numel()]
        self._sentinels = self._take_sentinels()
        self._epoch = _registrations
        self.staging: torch.Tensor | None = None
        self._convert: torch.Tensor | None = None
        if self.staged or stage:
            # Across devices the copy keeps the model's dtype and the EMA's device converts:
            # converting on the GPU would need a temporary of the EMA's dtype there.
            pin = self.cross_device and group.device.type == "cpu" and torch.cuda.is_available()
            dtype = src.dtype if self.cross_device else group.dtype
            numel = group.flat.numel()
            self.staging = torch.empty(numel, dtype=dtype, device=group.device, pin_memory=pin)
            self.staging_views = views(self.staging, group.shapes, group.strides)
            if dtype != group.dtype:
                self._convert = torch.empty(numel, dtype=group.dtype, device=group.device)
        self._gather: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = []
        self._rest = (group.tensors, self.model)
        if not self.staged and self.model_flat is None:
            self._plan_gather()

    def _plan_gather(self) -> None:
        """Chunks of the leading small tensors: (weights, scratch, averages) for one ``cat``
        and one ``lerp_`` each, both below the grain size, so neither waits for a second
        thread; and the lists left to foreach."""
        g = self.group
        k = 0
        while k < len(self.model) and gatherable(self.model[k]) and g.tensors[k].is_contiguous():
            k += 1
        if k < 2:
            return
        numel = sum(t.numel() for t in self.model[:k])
        scratch = torch.empty(numel, dtype=g.dtype, device=g.device)
        start = end = 0
        chunk: list[torch.Tensor] = []
        for t in [*self.model[:k], None]:
            if chunk and (t is None or end - start + t.numel() >= _CAT_CHUNK):
                self._gather.append((chunk, scratch[start:end], g.flat[start:end]))
                chunk, start = [], end
            if t is not None:
                chunk.append(t.view(-1))
                end += t.numel()
        self._rest = (g.tensors[k:], self.model[k:])

    def _take_sentinels(self) -> list[tuple[torch.Tensor, int]]:
        picks = {0, len(self.slots) - 1}
        picks.update(
            next((i for i, s in enumerate(self.slots) if s.is_param == p), 0) for p in (True, False)
        )
        return [(self.model[i], self.model[i].data_ptr()) for i in sorted(picks)]

    def is_current(self) -> bool:
        """False once the model's tensors were moved or replaced.

        Moves (``model.to()``, ``.half()``, a memory format) change every tensor, so a few
        sentinels per group catch them; a registration anywhere (``module.buf = t``) makes the
        next call check every slot. A ``.data`` assigned to one tensor in the middle goes
        unnoticed: call `d2ema.EMA.rebind` after such surgery.
        """
        for t, ptr in self._sentinels:
            if t.data_ptr() != ptr:
                return False
        if self._epoch != _registrations:
            if not all(s.get() is t for s, t in zip(self.slots, self.model)):
                return False
            self._epoch = _registrations
        return True

    def average(self, alpha: float) -> None:
        """``ema = (1 - alpha) * ema + alpha * w`` for every tensor of the group (call it with
        grad mode off: the model's tensors require grad)."""
        g = self.group
        if self.staged:
            self.stage()
            self.finish(alpha)
        elif self.model_flat is not None:
            g.flat.lerp_(self.model_flat, alpha)
        else:
            for chunk, scratch, ema in self._gather:
                ema.lerp_(torch.cat(chunk, out=scratch), alpha)
            if self._rest[0]:
                torch._foreach_lerp_(*self._rest, alpha)

    @torch.no_grad()
    def copy(self) -> None:
        """``ema = w`` (integer buffers; steps before averaging starts)."""
        if self.staged:
            self.stage()
            self.finish(None)
            return
        if self.model_flat is not None:
            self.group.flat.copy_(self.model_flat)
        else:
            torch._foreach_copy_(self.group.tensors, self.model)

    @torch.no_grad()
    def stage(self) -> None:
        """Copy the weights into the staging buffer (and wait for a cross-device copy)."""
        assert self.staging is not None
        if self.model_flat is not None:
            self.staging.copy_(self.model_flat, non_blocking=self.cross_device)
        else:
            torch._foreach_copy_(self.staging_views, self.model, non_blocking=self.cross_device)
        if self.cross_device:
            _synchronize(self.model_device)

    def finish(self, alpha: float | None) -> None:
        """The EMA side of a staged update: ``lerp_`` from the staging buffer, or a copy."""
        assert self.staging is not None
        with torch.no_grad():
            src = self.staging
            if self._convert is not None:
                src = self._convert.copy_(src)
            if alpha is None:
                self.group.flat.copy_(src)
            else:
                self.group.flat.lerp_(src, alpha)

    @torch.no_grad()
    def all_finite(self) -> torch.Tensor:
        """A 0-d bool tensor, True when no model tensor holds NaN or Inf. A sum (a 2-norm
        without a flat view) is the cheapest reduction NaN/Inf propagate through (max-abs
        measured ~10x slower on the CPU), but a huge finite value can overflow it: a False is
        only a suspicion, which `all_finite_exact` settles."""
        if not self._nonempty:
            return torch.ones((), dtype=torch.bool, device=self.model_device)
        if self.model_flat is not None:
            return self.model_flat.sum(dtype=torch.float32).isfinite()
        return torch.stack(torch._foreach_norm(self._nonempty, 2)).isfinite().all()

    @torch.no_grad()
    def all_finite_exact(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self._nonempty)


def update_all(bindings: list[Binding], alpha: float | None) -> None:
    """One update of ``bindings`` in the calling thread: ``lerp_`` with weight ``alpha``, or a
    copy (``alpha`` None, and integer groups)."""
    grad = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # torch.no_grad() costs ~3 us: a 500-layer lerp_ is ~10
    try:
        for b in bindings:
            if alpha is not None and b.group.averaged:
                b.average(alpha)
            else:
                b.copy()
    finally:
        torch._C._set_grad_enabled(grad)
