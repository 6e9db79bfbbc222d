"""Opt-in "flat" mode: the model's tracked tensors re-pointed into one buffer per group.

After :func:`flatten_model_tensors`, every parameter and buffer of a group is a view of one
contiguous buffer, laid out in the same order as the EMA's own buffer, so one EMA update is a
single ``lerp_`` per group however many tensors the model has (500 tiny layers cost what one
large tensor costs).

Parameters keep their identity (only ``.data`` moves), so an optimizer built *afterwards*, or
one that looks parameters up each step as ``torch.optim`` does, trains exactly as before. Build
the EMA before wrapping the model in DDP and before building any optimizer that caches storage
pointers (detectron2's trainer order: build_model -> EMA -> optimizer -> DDP). Tensors become
contiguous (a channels_last weight turns into a standard-layout one with the same values).
"""

from __future__ import annotations

import torch

from .state import Slot

__all__ = ["flatten_model_tensors"]


@torch.no_grad()
def flatten_model_tensors(slots: list[Slot]) -> torch.Tensor:
    """Move the tensors of ``slots`` (one device and dtype) into one new contiguous buffer."""
    tensors = [s.get() for s in slots]
    numels = [t.numel() for t in tensors]
    flat = torch.empty(sum(numels), dtype=tensors[0].dtype, device=tensors[0].device)
    for t, view in zip(tensors, flat.split(numels)):
        view.copy_(t.reshape(-1))
        t.data = view.view(t.shape)
    return flat
