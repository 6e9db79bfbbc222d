"""Choose the EMA length by a score: rebuild a sweep of lengths, score each, keep the best.

`select` streams the sweep from a snapshot folder (`reconstruct`,
a few targets per pass over the files), calls ``score_fn`` on each rebuilt EMA and returns a
`Selection`: the best length, its score, every length's score and the best one's tensors.
A tie goes to the length closest (in log sigma_rel) to ``prefer``, e.g. the run's primary EMA,
else to the first in sweep order. Given ``raw_score`` (the raw weights' score on the same data),
the raw weights are a candidate too: when they beat every length, ``Selection.raw_won`` says so
and ``Selection.tensors`` are the raw weights (a tie goes to the EMA). ``d2ema posthoc --eval``,
the end-of-training selection of ``d2ema train`` and
`d2ema.PostHocEMA.select` all go through it.

Score on data the model was not tuned on: the best of a sweep scored on the test set is an
optimistic estimate of that set's score (the maximum of noisy numbers).

Example::

    sel = select("out/ema_snapshots", lambda rec: validate(rec.tensors))
    print(sel.sigma_rel, sel.score, sel.scores[0.03])   # e.g. 0.03, 31.7, 31.7
    model.load_state_dict(sel.tensors, strict=False)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch

from d2ema.posthoc.profiles import Fit, PostHocError, Target
from d2ema.posthoc.rebuild import Reconstruction, plan, reconstruct

__all__ = ["DEFAULT_SIGMA_RELS", "RAW", "Scores", "Selection", "select", "sweep_targets"]

DEFAULT_SIGMA_RELS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25)

RAW = "raw weights"  # the label of the raw weights as a candidate


class Scores(dict[Target, float]):
    """Every length's score keyed by its `Target`, in sweep order; also looked up by a
    power EMA's sigma_rel (``scores[0.05]``) or a label (``scores["sigma_rel 0.05"]``)."""

    def _key(self, key: object) -> object:
        if isinstance(key, Target) or dict.__contains__(self, key):
            return key
        for target in self:
            if key == target.label or (target.kind == "sigma_rel" and key == target.value):
                return target
        return key

    def __getitem__(self, key: object) -> float:
        return dict.__getitem__(self, cast(Target, self._key(key)))

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, self._key(key))

    def get(self, key: object, default: float | None = None) -> float | None:  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default


@dataclasses.dataclass
class Selection:
    """The best EMA of a sweep: its ``target`` and width ``sigma_rel`` (a decay's at the step),
    its ``score``, ``scores`` (`Scores`: Target -> score, in sweep order), the ``fits``
    of the sweep, the training ``step`` the EMAs stand for, and the chosen weights' ``tensors``:
    the best EMA's, or the raw weights' when ``raw_score`` (their score, if they were scored)
    beat every length (``raw_won``)."""

    target: Target
    sigma_rel: float
    score: float
    scores: Scores
    fits: list[Fit]
    step: int
    tensors: dict[str, torch.Tensor]
    raw_score: float | None = None

    @property
    def raw_won(self) -> bool:
        """Whether the raw weights scored higher than every EMA length (NaN never wins)."""
        return self.raw_score is not None and not math.isnan(self.raw_score) \
            and self.raw_score > self.score

    @property
    def chosen(self) -> str:
        """What to ship: ``"raw weights"`` (`RAW`) or the best length's label."""
        return RAW if self.raw_won else self.target.label

    @property
    def by_sigma_rel(self) -> dict[float, float]:
        """``{sigma_rel: score}`` for the power-EMA targets of the sweep."""
        return {f.target.value: self.scores[f.target] for f in self.fits
                if f.target.kind == "sigma_rel" and f.target in self.scores}


def sweep_targets(sigma_rels: Sequence[float] | None = None) -> tuple[list[Target], bool]:
    """The targets for ``sigma_rels`` (None or empty: `DEFAULT_SIGMA_RELS`), and whether
    they were named (then one the snapshots cannot represent is refused, not left out)."""
    if not sigma_rels:
        return [Target("sigma_rel", s) for s in DEFAULT_SIGMA_RELS], False
    return list(dict.fromkeys(Target("sigma_rel", float(s)) for s in sigma_rels)), True


def _better(score: float, sigma: float, best: tuple[float, float] | None,
            prefer: float | None) -> bool:
    if best is None:
        return True
    if score != best[0]:
        return score > best[0]
    if prefer is None:
        return False
    distance = lambda s: abs(math.log(s / prefer))  # noqa: E731
    return distance(sigma) < distance(best[1])


def select(
    folder: str | os.PathLike[str],
    score_fn: Callable[[Reconstruction], float],
    targets: Sequence[Target] | None = None,
    step: int | None = None,
    *,
    prefer: float | None = None,
    batch: int = 4,
    skip_unrepresentable: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    raw_score: float | None = None,
    raw_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """Rebuild each of ``targets`` (default: `DEFAULT_SIGMA_RELS`, leaving out the widths
    the snapshots cannot represent) at ``step``, score it with ``score_fn`` (higher is better;
    NaN counts as the worst) and return the best (see the module docstring).

    ``skip_unrepresentable`` (default: only for the default sweep) leaves out the targets the
    snapshots cannot represent instead of raising `PostHocError` before any is rebuilt.
    ``progress(done, total)`` is called after each target is scored. ``raw_score`` and
    ``raw_tensors`` (given together) make the raw weights a candidate: when their score beats
    every length's, the selection's ``tensors`` are ``raw_tensors`` and ``raw_won`` is True.
    """
    if (raw_score is None) != (raw_tensors is None):
        raise PostHocError("give raw_score= and raw_tensors= together (the raw weights and their "
                           "score), or neither")
    named = targets is not None
    targets = list(targets) if targets is not None else sweep_targets()[0]
    skip = (not named) if skip_unrepresentable is None else skip_unrepresentable
    _, fits, step = plan(folder, targets, step, skip_unrepresentable=skip)
    if not fits:
        raise PostHocError(f"none of {[t.label for t in targets]} can be reconstructed from the "
                           f"snapshots in {folder}; name widths inside the stored ones")
    scores = Scores()
    best: tuple[float, float] | None = None
    chosen: Reconstruction | None = None
    for rec in reconstruct(folder, [f.target for f in fits], step, batch=batch,
                           skip_unrepresentable=skip):
        score = float(score_fn(rec))
        scores[rec.fit.target] = score
        ranked = -math.inf if math.isnan(score) else score
        if _better(ranked, rec.fit.sigma_rel, best, prefer):
            best, chosen = (ranked, rec.fit.sigma_rel), rec
        if progress is not None:
            progress(len(scores), len(fits))
    assert chosen is not None
    sel = Selection(chosen.fit.target, chosen.fit.sigma_rel, scores[chosen.fit.target],
                    scores, fits, step, chosen.tensors,
                    None if raw_score is None else float(raw_score))
    if sel.raw_won:
        sel.tensors = dict(raw_tensors or {})
    return sel
