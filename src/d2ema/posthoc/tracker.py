"""``PostHocEMA``: choose the EMA length after training, in any PyTorch training loop.

It keeps several power-function EMAs of one model (`EMA` with
``schedule="sigma_rel"``; EDM2's 0.05 and 0.10 by default) and writes snapshots of them every
``snapshot_every`` steps (`SnapshotWriter`). After training, an EMA of
any other width, or a classic constant decay, is rebuilt from the snapshots by least squares
(`d2ema.posthoc`), so the EMA length need not be guessed before training.

Example::

    ph = PostHocEMA(model, "out/ema_snapshots", sigma_rels=(0.05, 0.10), snapshot_every=500)
    for step, batch in enumerate(loader, 1):
        loss = model(batch); loss.backward(); optimizer.step(); optimizer.zero_grad()
        ph.update(model)
    ph.snapshot()                                   # the final step, if not a multiple of 500
    torch.save({"model": model.state_dict(), "posthoc": ph.state_dict()}, "ckpt.pth")
    ph.close()
    ema_model = ph.model_copy(model, sigma_rel=0.07)   # or decay=0.9995
    best = ph.select(lambda m: validate(m), model=model)   # or: the length a score picks
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2ema.averaging.state import unwrap_model
from d2ema.ema import EMA
from d2ema.errors import EMAStateError
from d2ema.posthoc.profiles import PostHocError, Target
from d2ema.posthoc.rebuild import Reconstruction, reconstruct
from d2ema.posthoc.select import Selection, select, sweep_targets
from d2ema.posthoc.snapshots import SnapshotWriter

__all__ = ["PostHocEMA", "load_tensors"]


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy reconstructed tensors into ``model`` by name (the names of its parameters and
    buffers, as the EMA tracks them); returns ``model``. Checks every name first."""
    model = unwrap_model(model)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(tensors) - set(state))
    if missing:
        raise PostHocError(f"the reconstruction has tensors the model lacks: {missing[:5]}; "
                           "load it into the model the snapshots were taken from")
    wrong = [n for n, v in tensors.items() if tuple(v.shape) != tuple(state[n].shape)]
    if wrong:  # copy_ would broadcast a smaller tensor silently
        n = wrong[0]
        raise PostHocError(f"the reconstruction's {n} has shape {tuple(tensors[n].shape)}, the "
                           f"model's {tuple(state[n].shape)} ({len(wrong)} such tensors); load it "
                           "into the model the snapshots were taken from")
    kinds = [n for n, v in tensors.items() if v.is_floating_point() != state[n].is_floating_point()
             or v.is_complex() != state[n].is_complex()]
    if kinds:  # copy_ would cast 7 (int64) into a weight of 7.0 everywhere
        n = kinds[0]
        raise PostHocError(f"the reconstruction's {n} is {tensors[n].dtype}, the model's "
                           f"{state[n].dtype} ({len(kinds)} such tensors); the snapshots are "
                           "damaged: restore them, or rebuild at an earlier --step")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
    return model


class PostHocEMA:
    """Power EMAs of one model plus snapshots for post-hoc reconstruction.

    Args:
        model: the model (wrappers are looked through, as by `EMA`).
        folder: where snapshots and ``index.json`` go.
        sigma_rels: the tracked widths (two are enough to rebuild anything in between, and
            somewhat beyond with dense snapshots).
        snapshot_every: snapshot when the step is a multiple of this (0: only by hand).
        dtype: snapshot precision (``"float32"``; ``"float16"`` halves the disk use).
        enabled: False keeps the EMAs but writes nothing (e.g. on all but the main process).
        background: write the files in a background thread.
        **ema_kwargs: passed to every `EMA` (``every``, ``device``, ``exclude``,
            ...; not ``schedule`` or ``decay``).
    """

    def __init__(self, model: nn.Module, folder: str | os.PathLike[str],
                 sigma_rels: Sequence[float] = (0.05, 0.10), *, snapshot_every: int = 1000,
                 dtype: str | torch.dtype = "float32", enabled: bool = True,
                 background: bool = True, **ema_kwargs: Any):
        if not isinstance(snapshot_every, int) or snapshot_every < 0:
            raise PostHocError(f"snapshot_every must be an integer >= 0, got {snapshot_every!r}")
        if len(set(sigma_rels)) != len(sigma_rels) or not sigma_rels:
            raise PostHocError(f"sigma_rels {list(sigma_rels)} must be distinct, at least one")
        for s in sigma_rels:
            Target("sigma_rel", s)  # range check with a clear message
        self.emas = {
            f"sigma{s:g}": EMA(model, schedule="sigma_rel", schedule_params={"sigma_rel": s},
                               **ema_kwargs)
            for s in sigma_rels
        }
        self.writer = SnapshotWriter(folder, self.emas, dtype, enabled=enabled,
                                     background=background)
        self.snapshot_every = snapshot_every
        self._synced = False

    @property
    def folder(self) -> Path:
        return self.writer.folder

    @property
    def step(self) -> int:
        return next(iter(self.emas.values())).step

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Update every EMA (see `d2ema.EMA.update`), then snapshot on schedule."""
        if not self._synced:
            self.sync()
        for ema in self.emas.values():
            ema.update(model, step)
        if self.snapshot_every and self.step % self.snapshot_every == 0:
            self.writer.write(self.step)

    def snapshot(self) -> None:
        """Snapshot every EMA now (skipped for one already saved at its current time)."""
        if not self._synced:
            self.sync()
        self.writer.write(self.step)

    def sync(self) -> None:
        """Continue the folder's series at the current step (the first update or snapshot does
        this): drop the snapshots after it, left by a run that went further than the state
        loaded, and write the one of this step if it is due and was not finished."""
        self.writer.sync(self.step)
        self._synced = True
        if self.step and self.snapshot_every and self.step % self.snapshot_every == 0:
            self.writer.write(self.step)

    def reset(self, model: nn.Module) -> None:
        """Restart every EMA from the model's weights (see `d2ema.EMA.reset`)."""
        for ema in self.emas.values():
            ema.reset(model)

    def close(self) -> None:
        """Wait for the last snapshot to be on disk (raises if writing it failed)."""
        self.writer.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{name: EMA.state_dict()}``: save it with the model for an exact resume. Waits
        for the pending snapshot first, so a checkpoint never resumes past a missing one."""
        self.writer.flush()
        return {name: ema.state_dict() for name, ema in self.emas.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load every EMA (all checked first: on any problem nothing changes). The next
        update or snapshot continues the series at the loaded step."""
        missing = sorted(set(self.emas) - set(state_dict))
        if missing:
            raise EMAStateError(f"the post-hoc EMA state has no {missing} (it has "
                                f"{sorted(state_dict)}); resume with the same sigma_rels")
        for name, ema in self.emas.items():
            ema.check_state_dict(state_dict[name])
        for name, ema in self.emas.items():
            ema.load_state_dict(state_dict[name])
        self._synced = False

    # ------------------------------------------------------------------ after training
    def reconstruct(self, targets: Sequence[Target], step: int | None = None,
                    **kwargs: Any) -> Iterator[Reconstruction]:
        """`d2ema.posthoc.reconstruct` on this folder (pending writes first)."""
        self.writer.flush()
        return reconstruct(self.folder, targets, step, **kwargs)

    def model_copy(self, model: nn.Module, *, sigma_rel: float | None = None,
                   decay: float | None = None, step: int | None = None) -> nn.Module:
        """A deep copy of ``model`` holding the EMA of one ``sigma_rel`` or ``decay``."""
        if (sigma_rel is None) == (decay is None):
            raise PostHocError("give exactly one of sigma_rel= and decay=")
        target = Target("sigma_rel", sigma_rel) if sigma_rel is not None else Target("decay", decay)  # type: ignore[arg-type]
        rec = next(self.reconstruct([target], step))
        clone = copy.deepcopy(unwrap_model(model), memo={id(self): None})
        return load_tensors(clone, rec.tensors)

    def select(self, score_fn: Callable[[Any], float], sigma_rels: Sequence[float] | None = None,
               *, model: nn.Module | None = None, step: int | None = None,
               prefer: float | None = None, batch: int = 4, include_raw: bool = True,
               raw_score: float | None = None,
               raw_tensors: Mapping[str, torch.Tensor] | None = None) -> Selection:
        """Rebuild each length of ``sigma_rels`` (default: 0.01..0.25, leaving out what the
        snapshots cannot represent), score it, and return the best as a
        `Selection` (``sigma_rel``, ``score``, ``scores`` per length,
        ``tensors``). Higher scores are better; a tie goes to the length closest to ``prefer``.

        ``score_fn`` gets the rebuilt tensors (name -> tensor), or, with ``model``, one deep
        copy of ``model`` holding them (the same copy each time; ``model`` is not changed).
        With ``model`` (and ``include_raw``), the raw weights are scored first as a candidate:
        when they beat every length, ``raw_won`` is True and ``tensors`` are ``model``'s own.
        A caller that scored the raw weights itself (with them in place, without a copy)
        passes ``raw_score`` and ``raw_tensors`` instead of ``model``.
        Score on held-out data: the best of a sweep scored on the test set overstates it.

        Example::

            def accuracy(m):
                m.eval()
                with torch.no_grad():
                    return sum((m(x).argmax(1) == y).sum().item() for x, y in val_loader)

            best = ph.select(accuracy, model=model)
            print(best.chosen, best.score, best.raw_score)   # e.g. sigma_rel 0.05 0.91 0.88
            load_tensors(model, best.tensors)   # the raw weights stay when they won
        """
        self.writer.flush()
        targets, named = sweep_targets(sigma_rels)
        if model is not None:
            clone = copy.deepcopy(unwrap_model(model), memo={id(self): None})
            score = lambda rec: score_fn(load_tensors(clone, rec.tensors))  # noqa: E731
        else:
            score = lambda rec: score_fn(rec.tensors)  # noqa: E731
        if model is not None and include_raw and raw_score is None:
            raw_tensors = {n: t.detach().clone() for n, t in clone.state_dict().items()}
            raw_score = float(score_fn(clone))
        return select(self.folder, score, targets, step, prefer=prefer, batch=batch,
                      skip_unrepresentable=not named, raw_score=raw_score,
                      raw_tensors=raw_tensors)
