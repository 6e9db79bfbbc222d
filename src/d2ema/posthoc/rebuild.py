"""Post-hoc EMA after training: rebuild the EMA of any length from the snapshots on disk.

`plan` reads the index written by `SnapshotWriter`, solves for the
mixing weights of each target (`d2ema.posthoc.profiles.solve`) and refuses, before any
tensor is read, a target the snapshots cannot represent or a series with a missing or truncated
file.
`reconstruct` then streams the snapshots one at a time into one accumulator per target, so
memory is (targets + 1) model copies whatever the number of snapshots. Float buffers (BN
statistics) are mixed like the parameters; integer buffers come from the latest snapshot used.

Example::

    for rec in reconstruct("output/ema_snapshots", [Target("sigma_rel", 0.07)]):
        print(rec.fit.describe())
        model.load_state_dict(rec.tensors, strict=False)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from d2ema.posthoc.profiles import Fit, PostHocError, Target, check_fit, representable_range, solve
from d2ema.posthoc.snapshots import INDEX, SnapshotEntry, read_index

__all__ = ["MAX_SOLVE", "Reconstruction", "plan", "reconstruct"]

MAX_SOLVE = 2048
"""The most snapshots one solve mixes: a 2048 x 2048 system, 0.1 GB and about 8 s on one core
(which a SIGTERM cannot interrupt inside ``torch.linalg``: the cost is bounded instead); a run
that snapshots every 1000 of 1M iterations with two widths has 2000."""


@dataclasses.dataclass
class Reconstruction:
    """An EMA rebuilt from snapshots: ``tensors`` (name -> tensor, as the EMA stored them),
    the `Fit` that made it, and the training step it stands for."""

    fit: Fit
    step: int
    tensors: dict[str, torch.Tensor]


def _load(folder: Path, entry: SnapshotEntry) -> dict[str, Any]:
    entry.check(folder, checksum=True)
    path = folder / entry.file
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(data.get("tensors"), dict):
            raise KeyError("tensors")
    except Exception as e:
        raise PostHocError(f"snapshot {path} cannot be read ({type(e).__name__}); it is damaged: "
                           f"restore it, or reconstruct at a step before {entry.step}") from e
    meta = data.get("meta", {})
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("t") != entry.t or meta.get("sigma_rel") != entry.sigma_rel:
        raise PostHocError(f"snapshot {path} holds sigma_rel {meta.get('sigma_rel')} at t="
                           f"{meta.get('t')}, the index says {entry.sigma_rel} at t={entry.t}; "
                           "the folder mixes runs")
    _check_content(path, entry, data)
    return data


_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _check_content(path: Path, entry: SnapshotEntry, data: dict[str, Any]) -> None:
    """Tensors only, finite, and original dtypes d2ema writes: a damaged or forged snapshot
    must not become a silently wrong EMA (or NaN weights in an export)."""
    def bad(problem: str) -> PostHocError:
        return PostHocError(f"snapshot {path} {problem}; it is damaged: restore it, or "
                            f"reconstruct at a step before {entry.step} (--step)")

    dtypes = data.get("dtypes", {})
    if not isinstance(dtypes, dict) or any(v not in _FLOAT_DTYPES for v in dtypes.values()):
        raise bad("lists dtypes that are not float32/float16/bfloat16/float64")
    for name, tensor in data["tensors"].items():
        if not isinstance(tensor, torch.Tensor):
            raise bad(f"holds {name!r} as a {type(tensor).__name__}, not a tensor")
        if tensor.is_complex() or tensor.device.type == "meta" or (
            name in dtypes and not tensor.is_floating_point()
        ):  # an averaged (floating) tensor stored as integers, bool, complex or no data
            where = " on the meta device" * (tensor.device.type == "meta")
            raise bad(f"holds {name!r} as {tensor.dtype}{where}, but it is an averaged "
                      f"{dtypes.get(name, 'floating')} tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise bad(f"holds NaN or Inf in {name!r}")


def _same_layout(path: Path, tensors: dict[str, torch.Tensor],
                 layout: dict[str, tuple[int, ...]]) -> None:
    """Every snapshot holds the same tensors with the same shapes as the first one read."""
    mine = {n: tuple(t.shape) for n, t in tensors.items()}
    if mine == layout:
        return
    missing, extra = sorted(set(layout) - set(mine)), sorted(set(mine) - set(layout))
    shapes = [n for n in layout if n in mine and mine[n] != layout[n]]
    what = (f"lacks {missing[:3]}" if missing else f"has extra {extra[:3]}" if extra else
            f"has {shapes[0]} of shape {mine[shapes[0]]}, the others {layout[shapes[0]]}")
    raise PostHocError(f"snapshot {path} {what}: the series mixes models; restore it, or move "
                       "the folder away")


def plan(
    folder: str | os.PathLike[str], targets: Sequence[Target], step: int | None = None,
    *, max_residual: float | None = None, skip_unrepresentable: bool = False,
) -> tuple[list[SnapshotEntry], list[Fit], int]:
    """The snapshots, the checked fits of ``targets`` and the step they stand for (default:
    the last snapshot's), without reading any tensor; see `reconstruct`.
    ``skip_unrepresentable`` leaves out the targets that `check_fit`
    refuses, instead of raising."""
    folder = Path(folder)
    entries = read_index(folder)
    if not entries:
        raise PostHocError(f"{folder}/{INDEX} lists no snapshots yet")
    step = max(e.step for e in entries) if step is None else int(step)
    at = [e.t for e in entries if e.step == step]
    if not at:
        steps = sorted({e.step for e in entries})
        raise PostHocError(f"no snapshot at step {step}; snapshots exist at steps "
                           f"{steps[0]}..{steps[-1]} (e.g. {', '.join(map(str, steps[-4:]))})")
    upto = [e for e in entries if e.t <= at[0]]
    if len(upto) > MAX_SOLVE:
        raise PostHocError(
            f"{folder}/{INDEX} lists {len(upto)} snapshots up to step {step}; a solve over more "
            f"than {MAX_SOLVE} would take {len(upto) ** 2 * 8 * 3 / 1e9:.1f} GB and about "
            f"{8 * (len(upto) / 2048) ** 3 / 60:.0f} min on one core, uninterruptible; "
            "the index is damaged or forged, or the series far denser than needed: rebuild at "
            "an earlier --step, or move the extra snapshots (and their entries) away")
    for e in upto:
        e.check(folder)  # files and sizes before any solve, and before hours of streaming
    times, gammas = [e.t for e in entries], [e.gamma for e in entries]
    fits = solve(times, gammas, targets, at=at[0])
    limits: dict[str, Any] = {} if max_residual is None else {"max_residual": max_residual}
    kept = []
    for fit in fits:
        try:
            check_fit(fit, **limits)
            kept.append(fit)
        except PostHocError:
            if skip_unrepresentable:
                continue
            used = [i for i, e in enumerate(entries) if e.t <= at[0]]
            span = representable_range([times[i] for i in used], [gammas[i] for i in used],
                                       **limits)
            check_fit(fit, representable=span, **limits)
    return entries, kept, step


def reconstruct(
    folder: str | os.PathLike[str],
    targets: Sequence[Target],
    step: int | None = None,
    *,
    batch: int = 4,
    max_residual: float | None = None,
    skip_unrepresentable: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Reconstruction]:
    """Rebuild the EMA of each target at training ``step`` (default: the last snapshot's).

    Targets the snapshots cannot represent raise `PostHocError` before anything is
    read. ``batch`` targets share one pass over the files (memory: ``batch + 1`` model copies);
    ``progress(done, total)`` is called after each file read.
    """
    folder = Path(folder)
    entries, fits, step = plan(folder, targets, step, max_residual=max_residual,
                               skip_unrepresentable=skip_unrepresentable)
    groups = [fits[i : i + batch] for i in range(0, len(fits), batch)]
    used = [i for i, e in enumerate(entries) if any(f.weights[i] for f in fits)]
    total, done = len(used) * len(groups), 0
    layout: dict[str, tuple[int, ...]] | None = None
    for group in groups:
        accs: list[dict[str, torch.Tensor]] = [{} for _ in group]
        latest: dict[str, torch.Tensor] = {}
        dtypes: dict[str, str] = {}
        for i in used:
            data = _load(folder, entries[i])
            if layout is None:
                layout = {n: tuple(t.shape) for n, t in data["tensors"].items()}
            _same_layout(folder / entries[i].file, data["tensors"], layout)
            dtypes.update(data.get("dtypes", {}))
            for name, tensor in data["tensors"].items():
                if not (tensor.is_floating_point() or tensor.is_complex()):
                    latest[name] = tensor.clone()
                    continue
                for fit, acc in zip(group, accs):
                    wide = torch.float64 if fit.l1 > 3 else torch.float32
                    if name not in acc:
                        acc[name] = torch.zeros(tensor.shape, dtype=wide)
                    acc[name].add_(tensor.to(wide), alpha=fit.weights[i])
            del data
            done += 1
            if progress is not None:
                progress(done, total)
        for fit, acc in zip(group, accs):
            out = {n: v.to(getattr(torch, dtypes.get(n, "float32"))) for n, v in acc.items()}
            yield Reconstruction(fit, step, {**out, **latest})
