"""The EMA in detectron2 checkpoints: key ``ema_state`` (plain name->tensor) and ``ema_meta``.

``ema_state`` is exactly what D2Go and the seed article write, so their checkpoints load here
and ours load there; ``ema_meta`` (format version, step counter, schedule) rides beside it.

Loading is as lenient as detectron2's model loading where that is safe: an EMA made with a
config that differs in harmless ways (``FREEZE_AT``: ``num_batches_tracked`` buffers differ)
loads with a warning; a missing parameter or a shape mismatch is refused
(:mod:`d2ema.d2.lenient`).

:class:`EMACheckpointer` is a ``DetectionCheckpointer`` that checks the EMA part of a checkpoint
*before* the model is loaded: a checkpoint whose EMA does not fit raises with every mismatch
named, and leaves both model and EMA untouched.

Example::

    checkpointer = EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model))
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from detectron2.checkpoint import DetectionCheckpointer

from ..ema import EMA
from ..errors import D2EMAError
from ..format import META_KEY, STATE_KEY
from ..sharded import ShardedEMA
from .lenient import plan_ema_load

__all__ = ["EMACheckpointer", "ema_checkpointables"]

logger = logging.getLogger(__name__)


class EMALike(Protocol):
    """What the checkpointables need: :class:`~d2ema.EMA`, or D2Go's ``EMAState`` (compat)."""

    def tensors(self) -> dict[str, Any]: ...

    def meta(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class _Loaded:
    """Shared between the two checkpointables: metadata waiting for its tensors."""

    def __init__(self) -> None:
        self.meta: dict | None = None
        self.loaded = False


class _EMAMeta:
    def __init__(self, get_ema: Callable[[], EMALike], shared: _Loaded):
        self._get_ema, self._shared = get_ema, shared

    def state_dict(self) -> dict[str, Any]:
        return self._get_ema().meta()

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        # Applied together with the tensors, by _EMATensors, so that a load is all or nothing.
        self._shared.meta = meta


class _EMATensors:
    def __init__(self, get_ema: Callable[[], EMALike], shared: _Loaded):
        self._get_ema, self._shared = get_ema, shared

    def state_dict(self) -> dict[str, Any]:
        ema = self._get_ema()
        if not isinstance(ema, ShardedEMA):
            return ema.tensors()
        tensors = ema.gathered()  # checkpointers run on the main process only: no collective
        if tensors is None:
            raise D2EMAError(
                f"the sharded EMA (step {ema.step}) is not gathered on this process, so it "
                "cannot be saved here: checkpoints of a sharded EMA are written where "
                "EMAHook gathered it (at its checkpoint_period and the last iteration); call "
                "ema.gather(dst=0) on every rank before saving at another iteration"
            )
        return tensors

    def load_state_dict(self, tensors: dict[str, Any]) -> None:
        state = {STATE_KEY: tensors}
        if self._shared.meta is not None:
            state[META_KEY] = self._shared.meta
        self._get_ema().load_state_dict(state)
        self._shared.meta = None
        self._shared.loaded = True


def ema_checkpointables(get_ema: Callable[[], EMALike]) -> dict[str, Any]:
    """``{"ema_meta": ..., "ema_state": ...}`` to pass to a ``DetectionCheckpointer``.

    The metadata comes first: fvcore loads checkpointables in insertion order, and the tensors
    apply both at once. ``get_ema`` is called at save/load time.
    """
    shared = _Loaded()
    return {META_KEY: _EMAMeta(get_ema, shared), STATE_KEY: _EMATensors(get_ema, shared)}


def ema_was_loaded(checkpointables: dict[str, Any]) -> bool:
    holder = checkpointables.get(STATE_KEY)
    return bool(isinstance(holder, _EMATensors) and holder._shared.loaded)


class EMACheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` that saves and loads the EMA, checking it before the model."""

    def __init__(self, model, save_dir: str = "", *, ema: EMA, **checkpointables: Any):
        self._ema = ema
        super().__init__(
            model, save_dir, **ema_checkpointables(lambda: self._ema), **checkpointables
        )

    @property
    def ema_loaded(self) -> bool:
        """Whether the last load found an EMA in the checkpoint."""
        return ema_was_loaded(self.checkpointables)

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        self._path = path
        return super().load(path, checkpointables)

    def _load_model(self, checkpoint: dict[str, Any]):
        plan = None
        if STATE_KEY in checkpoint:
            # Lenient where detectron2 is and it is safe (see d2ema.d2.lenient), strict else.
            source = getattr(self, "_path", None) or "the checkpoint"
            plan = plan_ema_load(self._ema, self.model, checkpoint[STATE_KEY], source)
            state = {STATE_KEY: plan.to_check()}
            if META_KEY in checkpoint:
                state[META_KEY] = checkpoint[META_KEY]
            self._ema.check_state_dict(state)
        incompatible = super()._load_model(checkpoint)
        if plan is not None:
            checkpoint[STATE_KEY] = plan.complete()  # missing buffers: the values just loaded
            plan.report()
        return incompatible
