"""D2Go's ``d2go/utils/ema_state.py``: the ``EMAState(decay, device)`` of D2Go's Lightning task,
delegating to `d2ema.EMA`. Needs no detectron2.

Code written for D2Go moves over by changing its import line::

    from d2ema.compat.ema_state import EMAState     # was: from d2go.utils.ema_state import ...

    ema_state = EMAState.from_model(model, decay=0.999, device="cpu")
    for batch in loader:
        ...; optimizer.step(); ema_state.update(model)
    torch.save({"model_ema": ema_state.state_dict()}, "ckpt.pth")   # plain name -> tensor
    ema_state.apply_to(eval_model)

``state_dict()`` is D2Go's plain name->tensor dict of every parameter and buffer, in the model's
dtypes, so checkpoints pass between D2Go and d2ema both ways. Differences from D2Go, on the safe
side: integer buffers (``num_batches_tracked``) are copied, not averaged and truncated; a state
loaded before it met its model is checked against the model (names, shapes, dtypes) the first
time one is given, and refused whole on a mismatch; errors are `D2EMAError`\\ s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from d2ema.averaging.state import unwrap_model
from d2ema.ema import EMA
from d2ema.errors import EMANotLoadedError, EMAStateError
from d2ema.schedules import Constant

__all__ = ["EMAState"]


class EMAState:
    """D2Go's ``EMAState``: the EMA of every parameter and buffer of a model, by name.

    Args:
        decay: the constant decay, in [0, 1] (0: the latest weights; 1: never updated).
        device: where the average lives (None: with each weight).

    Example: ``s = EMAState.from_model(model, 0.999); s.update(model); s.apply_to(model)``.
    """

    def __init__(self, decay: float = 0.999, device: str | torch.device | None = None):
        if not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise EMAStateError(f"decay should be in [0, 1], {decay!r} was given; e.g. 0.999")
        self.decay: float = float(decay)
        self.device = device
        self._ema: EMA | None = None
        self._pending: dict[str, torch.Tensor] = {}  # loaded before a model was given

    @classmethod
    def from_model(cls, model: nn.Module, decay: float = 0.999,
                   device: str | torch.device | None = None) -> EMAState:
        """A state holding ``model``'s current weights."""
        ret = cls(decay, device)
        ret.load_from(model)
        return ret

    def load_from(self, model: nn.Module) -> None:
        """Restart the average from ``model``'s current weights."""
        self._ema = EMA(model, self.decay, include_frozen=True, include_buffers=True,
                        device=self.device or None, master_dtype=None)
        self._pending = {}

    def has_inited(self) -> bool:
        return self._ema is not None or bool(self._pending)

    def _bind(self, model: nn.Module) -> EMA:
        """The EMA, made for ``model`` from a state loaded earlier if there is one."""
        if self._ema is not None:
            return self._ema
        if not self._pending:
            raise EMANotLoadedError("EMAState is empty: call load_from(model) or "
                                    "load_state_dict(...) first")
        ema = EMA(unwrap_model(model), self.decay, include_frozen=True, include_buffers=True,
                  device=self.device or next(iter(self._pending.values())).device,
                  master_dtype=None)
        ema.load_state_dict(self._pending)  # checked first: a mismatch changes nothing
        self._ema, self._pending = ema, {}
        return ema

    def apply_to(self, model: nn.Module) -> None:
        """Copy the EMA weights into ``model``."""
        self._bind(model).copy_to(model)

    def update(self, model: nn.Module) -> None:
        """One step: ``ema = decay * ema + (1 - decay) * weights``."""
        ema = self._bind(model)
        if ema.decay != self.decay:  # D2Go code may change ``decay`` between steps
            ema.schedule, ema.decay = Constant(decay=self.decay), self.decay
        ema.update(model)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Name -> average (live; D2Go's attribute)."""
        return self._ema.tensors() if self._ema is not None else self._pending

    def state_dict(self) -> dict[str, Any]:
        """D2Go's format: the plain name -> tensor dict."""
        return dict(self.state)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a plain name -> tensor dict (D2Go's, or this class's)."""
        tensors = {k: (v.to(self.device) if self.device else v) for k, v in state_dict.items()}
        if self._ema is not None:
            self._ema.load_state_dict(tensors)
        else:
            self._pending = tensors

    def to(self, device: str | torch.device) -> EMAState:
        """Move the average to ``device`` (and keep it there)."""
        self.device = device
        if self._ema is not None:
            self._ema.to(device)
        else:
            self._pending = {k: v.to(device) for k, v in self._pending.items()}
        return self

    def __repr__(self) -> str:
        return f"EMAState(decay={self.decay}, state=[{','.join(self.state)}])"
