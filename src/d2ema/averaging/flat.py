"""Flat mode: the model's tracked tensors re-pointed into one buffer per group.

After `flatten_model_tensors`, every parameter and buffer of a group is a view of one
contiguous buffer, laid out like the EMA's own buffer (same order, same strides), so one EMA
update is a single ``lerp_`` per group however many tensors the model has (500 tiny layers cost
what one large tensor costs).

Parameters keep their identity (only ``.data`` moves) and their memory format (a channels_last
weight stays channels_last), so an optimizer built *afterwards*, or one that looks parameters
up each step as ``torch.optim`` does, trains exactly as before. Build the EMA before wrapping
the model in DDP and before building anything that caches storage pointers (CUDA graphs);
detectron2's trainer order does: build_model -> EMA -> optimizer -> DDP, which is why
`EMATrainer` uses flat mode by default. After ``model.to()``, ``.half()`` or a
change of memory format the EMA flattens the moved tensors again at its next call.
"""

from __future__ import annotations

import torch

from d2ema.averaging.state import Slot, TensorGroup, views
from d2ema.averaging.update import flat_view

__all__ = ['flatten_model_tensors', 'lay_out']


def lay_out(groups: list[TensorGroup], slots_by_group: list[list[Slot]], flat: bool) -> None:
    """With ``flat``: give each averaged group the layout of the model's tensors (strides
    included) and move the model's tensors of the group into one buffer, unless they already
    are. Without, the averages stay contiguous and the model untouched."""
    if not flat:
        return
    for group, slots in zip(groups, slots_by_group):
        if not group.averaged:
            continue
        tensors = [s.get() for s in slots]
        group.follow_layout(tensors)
        if flat_view(tensors, group.strides) is None:
            flatten_model_tensors(slots, group.strides)


@torch.no_grad()
def flatten_model_tensors(slots: list[Slot], strides: list[tuple[int, ...]]) -> torch.Tensor:
    """Move the tensors of ``slots`` (one device and dtype) into one new buffer, tensor ``i``
    with ``strides[i]`` (dense), and return the buffer."""
    tensors = [s.get() for s in slots]
    flat = torch.empty(
        sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device
    )
    for t, view in zip(tensors, views(flat, [t.shape for t in tensors], strides)):
        view.copy_(t)
        t.data = view
    return flat
