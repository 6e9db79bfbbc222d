"""Exception-safe exchange of EMA weights into a model and back.

Where the EMA and the model tensor share device and dtype, the swap re-points the model
tensor's ``.data`` at the EMA's storage and back: no copy, no extra memory, whatever the model
size. Elsewhere (an fp32 master of a bf16 model, a CPU EMA of a GPU model) the trained weights
are copied into the binding's staging buffer, which holds them exactly (the model's dtype, or a
wider float) on the EMA's device, and the EMA is copied in: no memory is allocated on the
model's device either.

Writes made to the model inside the block (recomputing BN statistics for the EMA weights, say)
land in the EMA: the storage is the EMA's on the first path, and on the second the tensors
whose version counter moved are copied back. The trained weights always come back unchanged,
also when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from d2ema.averaging.update import Binding

__all__ = ['swapped_bindings']


def _holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every ``narrow`` value converts to ``wide`` and back exactly."""
    if wide == narrow:
        return True
    floats = wide.is_floating_point and narrow.is_floating_point
    return floats and wide.itemsize > narrow.itemsize


class _Backup:
    """Where the copying swap keeps the trained weights: the staging buffer where it holds them
    exactly, else a buffer of the model's dtype (on the EMA's device across devices)."""

    def __init__(self, binding: Binding):
        dtype = binding.model[0].dtype
        if binding.staging is not None and _holds(binding.staging.dtype, dtype):
            self.views = binding.staging_views
            return
        numels = [t.numel() for t in binding.model]
        device = binding.group.device if binding.cross_device else binding.model_device
        pin = binding.staging is not None and binding.staging.is_pinned()
        flat = torch.empty(sum(numels), dtype=dtype, device=device, pin_memory=pin)
        self.views = [v.view(t.shape) for v, t in zip(flat.split(numels), binding.model)]


@contextlib.contextmanager
def swapped_bindings(bindings: list[Binding], backups: dict[int, _Backup]) -> Iterator[None]:
    """Put each binding's EMA tensors into the model; restore the trained ones on exit.

    ``backups`` caches the copy buffers between calls, keyed by binding position.
    """
    exchanged: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    copied: list[tuple[Binding, _Backup, list[int]]] = []
    try:
        with torch.no_grad():
            for i, b in enumerate(bindings):
                if b.swap_by_copy:
                    backup = backups.get(i)
                    if backup is None:
                        backup = backups[i] = _Backup(b)
                    torch._foreach_copy_(backup.views, b.model)
                    copied.append((b, backup, []))
                    torch._foreach_copy_(b.model, b.group.tensors)
                    copied[-1][2].extend(t._version for t in b.model)
                else:
                    saved = [t.data for t in b.model]
                    exchanged.append((b.model, saved))
                    for t, e in zip(b.model, b.group.tensors):
                        t.data = e
        yield
    finally:
        with torch.no_grad():
            for model_tensors, saved in exchanged:
                for t, s in zip(model_tensors, saved):
                    t.data = s
            for b, backup, versions in copied:
                written = [
                    (e, t) for e, t, v in zip(b.group.tensors, b.model, versions) if t._version != v
                ]
                if written:
                    torch._foreach_copy_([e for e, _ in written], [t for _, t in written])
                torch._foreach_copy_(b.model, backup.views)
