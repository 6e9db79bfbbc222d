"""The seed article's and D2Go's model-EMA API, delegating to d2ema.

Code written for D2Go's ``d2go.modeling.ema`` or the article's ``model_ema`` module (and detrex's
``detrex.modeling.ema``) moves over by changing its import line::

    from d2ema import compat as model_ema

    model_ema.add_model_ema_configs(cfg)            # cfg.MODEL_EMA.*
    model_ema.may_build_model_ema(cfg, model)       # model.ema_state = EMAState()
    extra = model_ema.may_get_ema_checkpointer(cfg, model)
    checkpointer = DetectionCheckpointer(model, out_dir, **extra)
    hooks.insert(1, model_ema.EMAHook(cfg, model))
    with model_ema.apply_model_ema_and_restore(model):
        results = test(cfg, model)

Every function takes a yacs config (``cfg.MODEL_EMA``) or a LazyConfig (``cfg.train.model_ema``).
Differences from the originals, all on the safe side: the update is fused (``USE_LERP`` is
accepted either way); the hook updates after the optimizer step whatever ``AFTER_BACKWARD`` says;
the swap restores the trained weights also when evaluation raises, and yields the state it
applied instead of a copy of the trained weights (which it no longer makes); integer buffers are
copied, not averaged; checkpoints carry ``ema_meta`` (step counter, schedule) beside
``ema_state``, as every d2ema checkpoint does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from d2ema.averaging.state import unwrap_model
from d2ema.d2.checkpoint.checkpointers import ema_checkpointables
from d2ema.d2.config.settings import add_model_ema_configs, d2go_schedule, ema_settings
from d2ema.d2.engine.hooks import EMAUpdateHook
from d2ema.d2.family import ATTRIBUTE, get_model_ema
from d2ema.ema import EMA
from d2ema.errors import ConfigError, EMANotBuiltError, EMANotLoadedError, ReservedAttributeError
from d2ema.io.format import split_state
from d2ema.schedules import Constant

__all__ = [
    "EMAHook",
    "EMAState",
    "EMAUpdater",
    "add_model_ema_configs",
    "apply_model_ema",
    "apply_model_ema_and_restore",
    "get_model_ema_state",
    "may_build_model_ema",
    "may_get_ema_checkpointer",
]


class EMAState:
    """D2Go's ``EMAState``: the EMA of a model's parameters and buffers, by name.

    Starts empty; `save_from` fills it from a model. A state loaded before it met its
    model (from a checkpoint, or a plain name->tensor dict) is checked against the model, and
    applied, the first time a model is given: `bind`, `apply_to`,
    `get_ema_model`, or ``EMAHook.before_train``.
    """

    def __init__(self, include_frozen: bool = True, include_buffer: bool = True):
        self.include_frozen = include_frozen
        self.include_buffer = include_buffer
        self.prefix_to_remove = ["_checkpoint_wrapped_module."]  # torch's, as D2Go strips it
        self.ema: EMA | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self._pending_meta: dict[str, Any] | None = None
        self._incoming_meta: dict[str, Any] | None = None  # from the checkpoint's ema_meta
        self._ema_kwargs: dict[str, Any] = {}

    @classmethod
    def FromModel(
        cls,
        model: nn.Module,
        device: str = "",
        include_frozen: bool = True,
        include_buffer: bool = True,
    ) -> EMAState:
        ret = cls(include_frozen, include_buffer)
        ret.save_from(model, device)
        return ret

    def save_from(self, model: nn.Module, device: str = "") -> None:
        """Save the model's current weights into this state."""
        kwargs = {
            "include_frozen": self.include_frozen,
            "include_buffers": self.include_buffer,
            **self._ema_kwargs,
        }
        if device:
            kwargs["device"] = device
        self.ema = EMA(model, **kwargs)
        self._pending = self._pending_meta = None

    def bind(self, model: nn.Module) -> EMA:
        """The EMA for ``model``: made from its weights, or from a state loaded earlier."""
        if self.ema is None:
            pending, meta = self._pending, self._pending_meta
            ema = EMA(
                model,
                **{
                    "include_frozen": self.include_frozen,
                    "include_buffers": self.include_buffer,
                    **self._ema_kwargs,
                },
            )
            if pending is not None:
                state = {"ema_state": pending, **({"ema_meta": meta} if meta else {})}
                ema.load_state_dict(state)  # raises, leaving this state as it was
            self.ema, self._pending, self._pending_meta = ema, None, None
        return self.ema

    def apply_to(self, model: nn.Module) -> None:
        """Copy the EMA weights into ``model``."""
        self._require(model).copy_to(model)

    def get_ema_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the EMA weights."""
        return self._require(model).model_copy(model)

    @contextlib.contextmanager
    def apply_and_restore(self, model: nn.Module) -> Iterator[EMAState]:
        """The EMA weights in ``model`` inside the block, which gets the trained weights as an
        ``EMAState`` (as D2Go's); they are back in ``model`` after, also when the block raises.

        Example: ``with state.apply_and_restore(model): evaluate(model)``.
        """
        ema = self._require(model)
        old = EMAState.FromModel(unwrap_model(model), str(self.device or ""),
                                 self.include_frozen, self.include_buffer)
        with ema.swapped(unwrap_model(model)):
            yield old

    def get_model_state_iterator(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of what the state tracks in ``model``: the parameters (trainable
        only without ``include_frozen``), then the buffers with ``include_buffer``."""
        model = unwrap_model(model)
        named = [(n, p) for n, p in model.named_parameters()
                 if p.requires_grad or self.include_frozen]
        if self.include_buffer:
            named += list(model.named_buffers())
        for name, tensor in named:
            for prefix in self.prefix_to_remove:
                name = name.replace(prefix, "")
            yield name, tensor

    @property
    def device(self) -> torch.device | None:
        if self.ema is not None:
            return self.ema.groups[0].device
        if self._pending:
            return next(iter(self._pending.values())).device
        return None

    def to(self, device) -> EMAState:
        if self.ema is not None:
            self.ema.to(device)
        elif self._pending is not None:
            self._pending = {k: v.to(device) for k, v in self._pending.items()}
        if device:
            self._ema_kwargs["device"] = str(device)
        return self

    def has_inited(self) -> bool:
        return self.ema is not None or bool(self._pending)

    def clear(self) -> EMAState:
        self.ema = None
        self._pending = self._pending_meta = None
        return self

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The plain name->tensor dict D2Go and the seed save under ``ema_state``."""
        return self.tensors()

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.ema is not None:
            return self.ema.tensors()
        return dict(self._pending or {})

    def meta(self) -> dict[str, Any]:
        """``ema_meta`` (step counter, schedule) of the EMA, or the one loaded and waiting."""
        if self.ema is not None:
            return self.ema.meta()
        return dict(self._pending_meta or {})

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """A plain name->tensor dict, or d2ema's ``{"ema_state": ..., "ema_meta": ...}``."""
        meta, self._incoming_meta = self._incoming_meta, None
        if meta is not None and "ema_state" not in state_dict:  # a checkpointer's two entries
            state_dict = {"ema_state": state_dict, "ema_meta": meta}
        if self.ema is not None:
            return self.ema.load_state_dict(state_dict, strict=strict)
        tensors, meta = split_state(state_dict)
        self._pending, self._pending_meta = tensors, meta
        return nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def _require(self, model: nn.Module) -> EMA:
        if self.ema is None and not self._pending:
            raise EMANotLoadedError(
                "EMAState is empty: call save_from(model) or load_state_dict(...) first (or let "
                "EMAHook fill it)"
            )
        return self.bind(unwrap_model(model))

    def __repr__(self) -> str:
        return f"EMAState(state=[{','.join(self.state_dict().keys())}])"


class EMAUpdater:
    """D2Go's ``EMAUpdater``: ``init_state(model)`` then ``update(model)`` once per step."""

    def __init__(
        self,
        state: EMAState,
        decay: float = 0.999,
        device: str = "",
        use_lerp: bool = False,
        decay_warm_up_factor: float = -1,
    ):
        self.state = state
        self.decay = decay
        self.device = device
        self.use_lerp = use_lerp  # the update is always a fused lerp
        self.decay_warm_up_factor = decay_warm_up_factor
        self._schedule = d2go_schedule(
            decay, decay_warm_up_factor, "decay_warm_up_factor"
        ) or Constant(decay=decay)

    def init_state(self, model: nn.Module) -> None:
        self.state.clear()
        self.state.save_from(model, self.device)

    def update(self, model: nn.Module) -> None:
        ema = self.state.bind(model)
        ema.schedule = self._schedule
        ema.update(model)


def may_build_model_ema(cfg, model: nn.Module) -> None:
    """Attach an empty `EMAState` as ``model.ema_state`` when EMA is enabled."""
    settings = ema_settings(cfg)
    if not settings.enabled:
        return
    model = unwrap_model(model)
    if hasattr(model, ATTRIBUTE):
        raise ReservedAttributeError(f"Name `{ATTRIBUTE}` is reserved for model ema: call "
                                     "may_build_model_ema once per model")
    state = EMAState(settings.include_frozen, settings.include_buffer)
    state._ema_kwargs = settings.ema_kwargs()
    del state._ema_kwargs["include_frozen"], state._ema_kwargs["include_buffers"]
    setattr(model, ATTRIBUTE, state)


def get_model_ema_state(model: nn.Module) -> EMAState | EMA:
    """The ``ema_state`` attached to ``model``."""
    model = unwrap_model(model)
    if not hasattr(model, ATTRIBUTE):
        raise EMANotBuiltError("the model has no EMA: call may_build_model_ema(cfg, model) first")
    return getattr(model, ATTRIBUTE)


def may_get_ema_checkpointer(cfg, model: nn.Module) -> dict[str, Any]:
    """Checkpointables for ``DetectionCheckpointer(model, dir, **these)``: ``ema_state``
    (plain name->tensor, as D2Go's) and ``ema_meta`` (step counter and schedule)."""
    if not ema_settings(cfg).enabled:
        return {}
    state = get_model_ema_state(model)
    if not isinstance(state, EMAState):
        return ema_checkpointables(lambda: state)
    # D2Go code calls checkpointables["ema_state"].apply_to(model): the EMAState itself
    return {"ema_meta": _EMAStateMeta(state), "ema_state": state}


class _EMAStateMeta:
    """``ema_meta`` of an `EMAState`, loaded first and applied with its tensors."""

    def __init__(self, state: EMAState):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state.meta()

    def load_state_dict(self, meta: Mapping[str, Any]) -> None:
        self._state._incoming_meta = dict(meta)


def _resolve(model: nn.Module, state: EMAState | EMA | None) -> EMA:
    state = get_model_ema_state(model) if state is None else state
    if isinstance(state, EMA):
        return state
    return state.bind(unwrap_model(model))


def apply_model_ema(model: nn.Module, state: EMAState | EMA | None = None, save_current=False):
    """Copy the EMA weights into ``model`` for good; with ``save_current`` return the old ones."""
    old = EMAState.FromModel(unwrap_model(model)) if save_current else None
    _resolve(model, state).copy_to(model)
    return old


@contextlib.contextmanager
def apply_model_ema_and_restore(
    model: nn.Module, state: EMAState | EMA | None = None
) -> Iterator[EMAState | EMA]:
    """EMA weights in the model inside the block; the trained weights back after, always."""
    holder = get_model_ema_state(model) if state is None else state
    with _resolve(model, holder).swapped(unwrap_model(model)):
        yield holder


class EMAHook(EMAUpdateHook):
    """D2Go's ``EMAHook(cfg, model)``: builds the state in ``before_train``, updates after steps."""

    def __init__(self, cfg, model: nn.Module):
        settings = ema_settings(cfg)
        if not settings.enabled:
            raise ConfigError("EMAHook needs MODEL_EMA.ENABLED (train.model_ema.enabled) = True")
        model = unwrap_model(model)
        if not hasattr(model, ATTRIBUTE):
            raise EMANotBuiltError("Call `may_build_model_ema` first to initialize the model ema")
        self._holder = getattr(model, ATTRIBUTE)
        self._device = settings.device
        super().__init__(get_model_ema(model), model)

    def after_backward(self) -> None:
        """D2Go's hook may update here (``AFTER_BACKWARD``); d2ema updates after the optimizer
        step either way, so that the average never sees a half-applied step."""

    def before_train(self) -> None:
        holder = self._holder
        if isinstance(holder, EMA):
            return
        if holder.has_inited():
            if self._device:
                holder.to(self._device)
            self.ema = holder.bind(self.model)
        else:
            holder.save_from(self.model, self._device)
            self.ema = holder.ema
