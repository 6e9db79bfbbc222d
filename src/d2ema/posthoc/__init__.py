"""Post-hoc EMA: choose the EMA length after training instead of guessing it before.

Karras et al. (EDM2) keep two power-function EMAs during training and save snapshots of them
every few steps; after training, a least-squares mix of the snapshots rebuilds an EMA of any
length in between. The package holds five pieces, one floor above the core EMA:

* :mod:`~d2ema.posthoc.profiles`: the math (profiles, the least-squares fit, what is representable);
* :mod:`~d2ema.posthoc.snapshots`: the snapshot series on disk (writer, index, validation);
* :mod:`~d2ema.posthoc.rebuild`: rebuild the EMA of a target length from a series;
* :mod:`~d2ema.posthoc.select`: rebuild a sweep of lengths, score each, keep the best;
* :mod:`~d2ema.posthoc.tracker`: :class:`PostHocEMA`, the training-loop object tying them together.

Example::

    from d2ema import PostHocEMA

    ph = PostHocEMA(model, "out/ema_snapshots", sigma_rels=(0.05, 0.10), snapshot_every=500)
    for batch in loader:
        ...; optimizer.step()
        ph.update(model)
    ph.snapshot()
    ph.close()
    ema_model = ph.model_copy(model, sigma_rel=0.07)   # any length, chosen now
    best = ph.select(validation_score, model=model)   # or the length a held-out score picks
"""

from d2ema.posthoc.profiles import (
    MAX_SIGMA_REL,
    Fit,
    PostHocError,
    Target,
    check_fit,
    gamma_to_sigma_rel,
    profile_dot,
    representable_range,
    solve,
)
from d2ema.posthoc.rebuild import Reconstruction, plan, reconstruct
from d2ema.posthoc.select import DEFAULT_SIGMA_RELS, Selection, select, sweep_targets
from d2ema.posthoc.snapshots import INDEX, SnapshotEntry, SnapshotWriter, read_index, snapshot_dtype
from d2ema.posthoc.tracker import PostHocEMA, load_tensors

__all__ = [
    "DEFAULT_SIGMA_RELS",
    "INDEX",
    "MAX_SIGMA_REL",
    "Fit",
    "PostHocEMA",
    "PostHocError",
    "Reconstruction",
    "Selection",
    "SnapshotEntry",
    "SnapshotWriter",
    "Target",
    "check_fit",
    "gamma_to_sigma_rel",
    "load_tensors",
    "plan",
    "profile_dot",
    "read_index",
    "reconstruct",
    "representable_range",
    "select",
    "snapshot_dtype",
    "solve",
    "sweep_targets",
]
