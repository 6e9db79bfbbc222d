"""The update kernels: one :class:`Binding` links a :class:`TensorGroup` to the model's tensors.

Per group and step, the work is a few fused ops chosen once, when the EMA binds to a model:

* model tensors in one flat buffer (``flat=True``): a single ``lerp_`` over the whole group;
* same device and dtype: one ``torch._foreach_lerp_`` over prebuilt lists (gathering small
  tensors with ``torch.cat`` first measured slower with 2 threads: benchmarks/);
* another dtype or device (fp32 master of a bf16 model, CPU EMA of a GPU model): one
  ``_foreach_copy_`` into a reusable staging buffer of the EMA's dtype on the EMA's device
  (pinned, non-blocking for GPU -> CPU), then one ``lerp_``.

No step allocates or walks the model in Python. ``lerp_`` with weight ``1 - d`` computes
``d * ema + (1 - d) * w``; it is exact at ``d = 0`` and ``d = 1`` and leaves a constant weight
constant.
"""

from __future__ import annotations

import torch
from torch import nn

from .state import Slot, TensorGroup

__all__ = ["Binding", "flat_view", "registration_count"]

# Counts parameter, buffer and submodule (re-)registrations in every module of the process
# (``module.running_mean = torch.zeros(3)``, ``module.weight = nn.Parameter(...)``,
# ``model.head = nn.Linear(...)``), so that tensors and names are re-checked only after such an
# event, not on every step.
_registrations = 0


def _count_registration(module, name, value) -> None:
    global _registrations
    _registrations += 1


nn.modules.module.register_module_buffer_registration_hook(_count_registration)
nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)


def registration_count() -> int:
    """How many registrations happened so far (compare two readings to detect one)."""
    return _registrations


def flat_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view over ``tensors`` if they lie back to back in one storage, else None."""
    first = tensors[0]
    if not all(t.is_contiguous() for t in tensors):
        return None
    storage = first.untyped_storage()
    offset = first.storage_offset()
    expected = offset
    for t in tensors:
        if (
            t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != expected
            or t.dtype != first.dtype
        ):
            return None
        expected += t.numel()
    with torch.no_grad():
        return first.new_empty(0).set_(storage, offset, (expected - offset,))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


class Binding:
    """One group's link to the live model tensors it averages, with its update kernels."""

    def __init__(self, group: TensorGroup, slots: list[Slot]):
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
        self.model_flat = flat_view(self.model)
        # The inf-norm of an empty tensor is an error, not 0: leave those out of the check.
        self._nonempty = [t for t in self.model if t.numel()]
        self._sentinels = self._take_sentinels()
        self._epoch = _registrations
        self.staging: torch.Tensor | None = None
        if self.staged:
            pin = self.cross_device and group.device.type == "cpu" and torch.cuda.is_available()
            self.staging = torch.empty(
                group.flat.numel(), dtype=group.dtype, device=group.device, pin_memory=pin
            )
            numels = [s.numel() for s in group.shapes]
            self.staging_views = [
                v.view(s) for v, s in zip(self.staging.split(numels), group.shapes)
            ]

    def _take_sentinels(self) -> list[tuple[Slot, torch.Tensor, int]]:
        picks = {0, len(self.slots) - 1}
        picks.update(
            next((i for i, s in enumerate(self.slots) if s.is_param == p), 0) for p in (True, False)
        )
        return [(self.slots[i], self.model[i], self.model[i].data_ptr()) for i in sorted(picks)]

    def is_current(self) -> bool:
        """False once the model's tensors were moved or replaced.

        Moves (``model.to()``, ``.half()``) change every tensor, so a few sentinels per group
        catch them; a registration anywhere (``module.buf = t``) makes the next call check
        every slot. A ``.data`` assigned to one tensor in the middle goes unnoticed: call
        :meth:`d2ema.EMA.rebind` after such surgery.
        """
        if not all(s.get() is t and t.data_ptr() == ptr for s, t, ptr in self._sentinels):
            return False
        if self._epoch != _registrations:
            if not all(s.get() is t for s, t in zip(self.slots, self.model)):
                return False
            self._epoch = _registrations
        return True

    @torch.no_grad()
    def average(self, alpha: float) -> None:
        """``ema = (1 - alpha) * ema + alpha * w`` for every tensor of the group."""
        g = self.group
        if self.staged:
            self._stage()
            g.flat.lerp_(self.staging, alpha)
        elif self.model_flat is not None:
            g.flat.lerp_(self.model_flat, alpha)
        else:
            torch._foreach_lerp_(g.tensors, self.model, alpha)

    @torch.no_grad()
    def copy(self) -> None:
        """``ema = w`` (integer buffers; steps before averaging starts)."""
        if self.model_flat is not None:
            self.group.flat.copy_(self.model_flat, non_blocking=self.cross_device)
        else:
            torch._foreach_copy_(self.group.tensors, self.model, non_blocking=self.cross_device)
        if self.cross_device:
            _synchronize(self.model_device)

    def _stage(self) -> None:
        assert self.staging is not None
        if self.model_flat is not None:
            self.staging.copy_(self.model_flat, non_blocking=self.cross_device)
        else:
            torch._foreach_copy_(self.staging_views, self.model, non_blocking=self.cross_device)
        if self.cross_device:
            _synchronize(self.model_device)

    @torch.no_grad()
    def all_finite(self) -> torch.Tensor:
        """A 0-d bool tensor: no NaN or Inf in the model tensors (max-abs cannot overflow)."""
        if not self._nonempty:
            return torch.ones((), dtype=torch.bool, device=self.model_device)
        if self.model_flat is not None:
            return torch.linalg.vector_norm(self.model_flat, float("inf")).isfinite()
        return torch.stack(torch._foreach_norm(self._nonempty, float("inf"))).isfinite().all()
