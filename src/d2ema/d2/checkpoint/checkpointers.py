"""The EMA in detectron2 checkpoints: key ``ema_state`` (plain name->tensor) and ``ema_meta``;
and checkpoints that are complete or absent, never truncated.

``ema_state`` is exactly what D2Go and the seed article write, so their checkpoints load here
and ours load there; ``ema_meta`` (format version, step counter, schedule) rides beside it.

Loading is as lenient as detectron2's model loading where that is safe: an EMA made with a
config that differs in harmless ways (``FREEZE_AT``: ``num_batches_tracked`` buffers differ)
loads with a warning; a missing parameter or a shape mismatch is refused
(`d2ema.d2.checkpoint.load_checks`).

`EMACheckpointer` is a ``DetectionCheckpointer`` that checks the EMA part of a checkpoint
*before* the model is loaded: a checkpoint whose EMA does not fit raises with every mismatch
named, and leaves both model and EMA untouched.

Both build on `AtomicCheckpointer`, the ``DetectionCheckpointer`` of every d2ema trainer:
it writes each checkpoint to a temporary file next to it, ``fsync`` s and renames it, and only
then rewrites ``last_checkpoint`` (also atomically), so a kill at any instant leaves every
checkpoint complete. A resume whose tagged checkpoint is missing, truncated or unreadable
(written by something else, or a disk that lost it) falls back to the newest complete one, with
a warning (`d2ema.d2.checkpoint.resume.find_resume_checkpoint`); a file that cannot be read
raises one
line, `CheckpointError`.

Example::

    checkpointer = EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model))
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)

A run without EMA must not drop one: `NoEMACheckpointer` refuses to resume from a
checkpoint that has an EMA, since its next checkpoints (``model_final.pth`` too) would be
written without it, unless ``MODEL_EMA.DISCARD_ON_RESUME`` says so
(`check_resume_keeps_ema` checks the same before any worker starts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from d2ema.averaging.health import NONFINITE_FIX, nonfinite_message
from d2ema.d2.checkpoint.load_checks import check_exact_resume, plan_ema_load
from d2ema.d2.checkpoint.pickles import load_pkl_weights
from d2ema.d2.checkpoint.resume import (
    TAG_FILE,
    checkpoint_candidates,
    find_resume_checkpoint,
    read_checkpoint,
)
from d2ema.d2.config import settings as config_settings
from d2ema.d2.config.keys import named_in_config
from d2ema.d2.config.settings import EMASettings
from d2ema.d2.config.view import ConfigView
from d2ema.d2.family import EMAGroupState, get_ema_family, get_settings
from d2ema.distributed import ShardedEMA
from d2ema.ema import EMA
from d2ema.errors import CheckpointError, ConfigError, D2EMAError
from d2ema.io.atomic import atomic_save, atomic_write_text
from d2ema.io.confined import confined
from d2ema.io.format import META_KEY, STATE_KEY, has_ema

__all__ = [
    "AtomicCheckpointer",
    "EMACheckpointer",
    "NoEMACheckpointer",
    "check_resume_keeps_ema",
    "ema_checkpointables",
    "last_checkpoint_has_ema",
    "refuse_dropping_ema",
]


logger = logging.getLogger(__name__)


class EMALike(Protocol):
    """What the checkpointables need: `EMA`, or D2Go's ``EMAState`` (compat)."""

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
                "EMAUpdateHook gathered it (at its checkpoint_period and the last iteration); call "
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


def _save_error(path: Any, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write {path}: {e.strerror or e}; it was left as it was and the checkpoints "
        "before it are intact: free disk space (or write fewer: SOLVER.CHECKPOINT_PERIOD), then "
        "train again with --resume")


class AtomicCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` whose checkpoints are complete or absent, whose resume falls
    back to the newest complete checkpoint, and whose read errors are one line."""

    _verified: tuple[str, Any] | None = None  # a checkpoint read while choosing it
    resumed_from: str | None = None  # what get_checkpoint_file() chose last

    def _local(self) -> bool:
        return bool(self.save_dir) and "://" not in str(self.save_dir)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk or not self._local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        confined(self.save_dir, basename, "the checkpointer")  # never replace a file elsewhere
        self.logger.info(f"Saving checkpoint to {save_file}")
        try:
            atomic_save(data, save_file)
        except OSError as e:
            raise _save_error(save_file, e) from e
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        path = confined(self.save_dir, TAG_FILE, "the checkpointer")
        try:
            atomic_write_text(last_filename_basename, path)
        except OSError as e:
            raise _save_error(path, e) from e

    def has_checkpoint(self) -> bool:
        """A ``last_checkpoint`` or a checkpoint file (``*_NNNNNNN.pth``, ``*_final.pth``)."""
        tagged = super().has_checkpoint()
        return tagged or (self._local() and bool(checkpoint_candidates(self.save_dir)))

    def get_checkpoint_file(self) -> str:
        """The tagged checkpoint if complete, else the newest complete one (with a warning)."""
        if not self._local():
            return super().get_checkpoint_file()
        found = find_resume_checkpoint(self.save_dir)
        if found.warning:
            self.logger.warning(found.warning)
        self._verified = (str(found.path), found.checkpoint)
        self.resumed_from = str(found.path)
        return self.resumed_from

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """detectron2's load; a load that fails (a checkpoint refused) leaves the checkpointer as
        it was, so the next load works: detectron2 main resets ``_parsed_url_during_load`` only
        after a load that succeeded, and asserts it is None at the start of the next."""
        try:
            return super().load(path, *args, **kwargs)
        except BaseException:
            if getattr(self, "_parsed_url_during_load", None) is not None:
                self._parsed_url_during_load = None
            self._verified = None
            raise

    # resuming: the checkpoint must fit exactly (d2ema.d2.checkpoint.load_checks)
    _exact: bool = False

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        self._exact = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._exact = False

    def _load_model(self, checkpoint: dict[str, Any]):
        if self._exact:  # before any part of the checkpoint is loaded
            check_exact_resume(self.model, self.checkpointables, checkpoint,
                               self.resumed_from or "the checkpoint")
        return super()._load_model(checkpoint)

    def _load_file(self, filename: str) -> dict[str, Any]:
        verified, self._verified = self._verified, None
        if verified is not None and verified[0] == filename and isinstance(verified[1], dict):
            loaded = verified[1]
            return loaded if "model" in loaded else {"model": loaded}
        if filename.endswith(".pkl"):  # arrays only, never code (unless --trust-pickle)
            return load_pkl_weights(filename)
        if filename.endswith(".pyth"):  # pycls, as detectron2 reads it, but weights_only
            data = read_checkpoint(filename)
            if not isinstance(data, dict) or not isinstance(data.get("model_state"), dict):
                raise CheckpointError(f"cannot load {filename}: a pycls .pyth file holds "
                                      "'model_state'")
            return {"model": {k: v for k, v in data["model_state"].items()
                              if not k.endswith("num_batches_tracked")},
                    "__author__": "pycls", "matching_heuristics": True}
        loaded = read_checkpoint(filename)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"checkpoint {filename} holds a {type(loaded).__name__}, "
                                  "not a dict of weights")
        return loaded if "model" in loaded else {"model": loaded}


class EMACheckpointer(AtomicCheckpointer):
    """A ``DetectionCheckpointer`` that saves and loads the EMA, checking it before the model."""

    def __init__(self, model: nn.Module, save_dir: str = "", *, ema: EMA,
                 **checkpointables: Any):
        self._ema = ema
        family = get_ema_family(model)  # extra and post-hoc EMAs: keys ema_extras, ema_posthoc
        checkpointables = {**(family.states if family else {}), **checkpointables}
        super().__init__(
            model, save_dir, **ema_checkpointables(lambda: self._ema), **checkpointables
        )

    def save(self, name: str, **kwargs: Any) -> None:
        step = self._ema.nonfinite_step
        if step is not None and self.save_dir and self.save_to_disk:
            after = self._ema.nonfinite_after
            settings = get_settings(self.model)
            logger.warning(nonfinite_message(step, f"saving {name}.pth", after)
                           + named_in_config(NONFINITE_FIX, settings.key if settings else None))
        super().save(name, **kwargs)

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
            # Lenient where detectron2 is and it is safe (see d2ema.d2.checkpoint.load_checks),
            # strict else.
            source = getattr(self, "_path", None) or "the checkpoint"
            plan = plan_ema_load(self._ema, self.model, checkpoint[STATE_KEY], source)
            state = {STATE_KEY: plan.to_check()}
            if META_KEY in checkpoint:
                state[META_KEY] = checkpoint[META_KEY]
            self._ema.check_state_dict(state)
        for key, holder in self.checkpointables.items():
            if isinstance(holder, EMAGroupState) and key in checkpoint:
                holder.check(checkpoint[key])
        incompatible = super()._load_model(checkpoint)
        if plan is not None:
            checkpoint[STATE_KEY] = plan.complete()  # missing buffers: the values just loaded
            plan.report()
        return incompatible


def last_checkpoint_has_ema(output_dir: str) -> str | None:
    """The last checkpoint of ``output_dir`` if it holds an EMA (read lazily, memory-mapped),
    else None; None too when it cannot tell (the checkpointer checks again when it loads)."""
    import torch

    from d2ema.d2.checkpoint.resume import tagged_checkpoint

    tagged, _ = tagged_checkpoint(output_dir)  # OutsideFolderError: names a file elsewhere
    if tagged is None:
        return None
    path = str(tagged)
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a zip checkpoint, or objects beyond plain data
        return None
    return path if isinstance(checkpoint, dict) and has_ema(checkpoint) else None


def check_resume_keeps_ema(cfg, settings: EMASettings | None = None) -> None:
    """Refuse resuming a run whose last checkpoint has an EMA with the EMA off (yacs or
    LazyConfig), unless ``DISCARD_ON_RESUME``: before anything is built or written.
    ``settings``: those already read from ``cfg``."""
    settings = settings or config_settings.ema_settings(cfg)
    if settings.enabled or settings.discard_on_resume:
        return
    path = last_checkpoint_has_ema(settings.output_dir)
    if path is not None:
        refuse_dropping_ema(path, settings.key)


class NoEMACheckpointer(AtomicCheckpointer):
    """The checkpointer of a run without EMA: resuming from a checkpoint that has an EMA is
    refused before anything is loaded, unless ``discard_ema`` (``DISCARD_ON_RESUME``)."""

    def __init__(self, model, save_dir: str = "", *, discard_ema: bool = False,
                 key: Callable[[str], str] | None = None, **checkpointables: Any):
        super().__init__(model, save_dir, **checkpointables)
        self.discard_ema = discard_ema
        self._key = key or _YACS_KEY
        self._resuming = False

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def _load_model(self, checkpoint: dict[str, Any]):
        if self._resuming and has_ema(checkpoint):
            path = self.resumed_from or self.get_checkpoint_file()
            if not self.discard_ema:
                refuse_dropping_ema(path, self._key)
            logger.warning("Dropping the EMA of %s (%s): the next checkpoints have none.",
                           path, self._key("DISCARD_ON_RESUME"))
        return super()._load_model(checkpoint)


_YACS_KEY = ConfigView(None, lazy=False).key


def refuse_dropping_ema(path: str, key: Callable[[str], str] = _YACS_KEY) -> None:
    """Raise the `ConfigError` for resuming from ``path`` (which has an EMA) without EMA;
    ``key`` names the settings (`key`)."""
    enabled = key("ENABLED")
    raise ConfigError(
        f"the checkpoint to resume from ({path}) has an EMA, but {enabled} is False: the run's "
        f"next checkpoints, model_final.pth included, would be written without it. Resume with "
        f"{enabled} True to keep averaging, or set {key('DISCARD_ON_RESUME')} True to drop the EMA "
        "on purpose"
    )
