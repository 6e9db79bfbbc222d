"""Post-hoc EMA during training: snapshots of power EMAs on disk, with an index.

`SnapshotWriter` saves every tracked power EMA (`SigmaRel`) at
the steps it is asked to, one file per EMA and step (fp32 by default, fp16/bf16 on request),
plus ``index.json`` listing them. Files and index are written atomically, so a killed run
never leaves a truncated snapshot under its final name; by default a background thread writes
while training goes on. `SnapshotWriter.sync` makes a resumed run continue the series:
snapshots after the resumed step (written by the run that went further) are dropped and will
be written again, so the series has neither duplicates nor gaps.

`d2ema.posthoc.rebuild` rebuilds EMAs of any length from the folder after training.

Example::

    writer = SnapshotWriter("out/ema_snapshots", {"sigma0.05": ema_05, "sigma0.1": ema_10})
    writer.sync(step=0)                  # new run: an empty folder (another run's: refused)
    ...; writer.write(step)              # every K steps and at the last one
    writer.close()
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import stat
import time
import zlib
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from d2ema.ema import EMA
from d2ema.errors import one_line
from d2ema.io.atomic import atomic_save, atomic_write_text
from d2ema.io.confined import confined, read_regular
from d2ema.posthoc.profiles import MAX_SIGMA_REL, PostHocError, gamma_to_sigma_rel
from d2ema.schedules import SigmaRel

__all__ = ["INDEX", "SnapshotEntry", "SnapshotWriter", "read_index", "snapshot_dtype"]

logger = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "d2ema post-hoc EMA snapshots"
INDEX_VERSION = 2  # 2: entries carry crc32 (0.3.0); 1 (0.2.0) is read too, unchecked
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def snapshot_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` (default, exact), ``"float16"`` or ``"bfloat16"`` as a torch dtype."""
    if isinstance(name, torch.dtype) and name in _DTYPES.values():
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise PostHocError(f"snapshot dtype {name!r} is not one of {sorted(_DTYPES)}; float32 "
                           "is exact, float16 halves the disk use (about 2e-4 relative error)")
    return _DTYPES[key]


@dataclasses.dataclass(frozen=True)
class SnapshotEntry:
    """One snapshot file: which EMA, at which time, stored how."""

    file: str
    sigma_rel: float
    gamma: float
    t: int  # averaging time of the EMA's last update (its step minus start)
    step: int  # the training step it was taken at
    dtype: str
    bytes: int
    rounding: float  # ||stored - fp32|| / ||fp32|| of the floating tensors
    crc32: int | None = None  # zlib.crc32 of the file's bytes (None: an index of 0.2.0)

    def check(self, folder: Path, checksum: bool = False) -> None:
        """The file is there, a regular file of the size the index says, and (``checksum``)
        holds the bytes written: a same-size bit flip is named, not mixed in."""
        path = folder / self.file
        fix = f"restore it, or reconstruct at a step before {self.step} (--step)"
        try:
            info = path.stat()
        except OSError:
            raise PostHocError(f"snapshot {path} (step {self.step}) is missing; {fix}") from None
        if not stat.S_ISREG(info.st_mode):
            raise PostHocError(f"snapshot {path} is not a regular file; {fix}")
        if info.st_size != self.bytes:
            raise PostHocError(f"snapshot {path} is truncated or changed ({info.st_size} bytes, "
                               f"the index says {self.bytes}); {fix}")
        if checksum and self.crc32 is not None and file_crc32(path) != self.crc32:
            raise PostHocError(f"snapshot {path} does not hold the bytes written (checksum "
                               f"differs: a bit flip or an edit of the same size); {fix}")


def file_crc32(path: Path) -> int:
    """``zlib.crc32`` of a file, read in 4 MiB pieces (about 1 GB/s: benchmarks/checksum.py)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _drop_from_page_cache(path: Path) -> None:
    """Snapshots are read back only after training: free their (clean, synced) pages now.
    Writing each snapshot into a full page cache otherwise costs about 5x the CPU time, as the
    kernel reclaims memory for it (0.35 vs 0.07 s per 95 MB measured; benchmarks/posthoc.py)."""
    if not hasattr(os, "posix_fadvise"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _atomic_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=1), path)


def read_index(folder: str | os.PathLike[str]) -> list[SnapshotEntry]:
    """The snapshots listed in ``folder/index.json``, in time order; one clear error if the
    folder, the index or its format is not what `SnapshotWriter` writes: every field is
    checked (types, ranges, files inside ``folder``) before the index is used for anything."""
    folder = Path(folder)
    index = confined(folder, INDEX, f"{folder}")  # a link to a file elsewhere is refused
    if not index.is_file():
        stray = sorted(folder.glob("*.pth")) if folder.is_dir() else []
        if stray:
            raise PostHocError(f"{folder} holds {len(stray)} snapshot files but no {INDEX}; it "
                               "was not written by d2ema or the index was deleted")
        raise PostHocError(f"no post-hoc EMA snapshots in {folder} (no {INDEX}); train with "
                           "d2ema.PostHocEMA to write them", parameters=("PostHocEMA",))
    try:  # a regular file of bounded size: a FIFO or a huge file is refused, never read
        data = json.loads(read_regular(index, _MAX_INDEX_BYTES, "snapshot index", "restore it, "
                                       "or move the folder away", PostHocError))
    except (ValueError, RecursionError) as e:
        raise PostHocError(f"cannot read {index} ({type(e).__name__}: {one_line(e)[:120]}); it is "
                           "damaged or not a d2ema snapshot index") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PostHocError(f"{index} is not a d2ema snapshot index (format {found!r})")
    version = data.get("version", 1)
    if type(version) is not int or not 1 <= version <= INDEX_VERSION:
        raise PostHocError(f"{index} has version {version!r}; this d2ema reads versions 1 to "
                           f"{INDEX_VERSION}: upgrade d2ema, or restore the index")
    if not isinstance(data.get("snapshots"), list):
        raise PostHocError(f"{index} has no list of snapshots; it is damaged: restore it, or "
                           "move the folder away")
    entries = [_entry(folder, index, i, e) for i, e in enumerate(data["snapshots"])]
    _check_unique(index, entries)
    return sorted(entries, key=lambda e: (e.t, e.sigma_rel))


_MAX_INDEX_BYTES = 64 << 20  # about 250,000 entries
_MAX_STEP = 10**12  # far beyond any training; larger means a damaged or forged index
_INT_FIELDS = {"t": 1, "step": 1, "bytes": 0}


def _entry(folder: Path, index: Path, i: int, raw: Any) -> SnapshotEntry:
    """One index entry, every field checked; PostHocError naming the entry and field."""
    def bad(problem: str) -> PostHocError:
        return PostHocError(f"{index}: snapshot entry {i} {problem}; the index is damaged or "
                            "was edited: restore it, or move the folder away")

    fields = {f.name for f in dataclasses.fields(SnapshotEntry)}
    if isinstance(raw, dict) and "crc32" not in raw:  # written by 0.2.0: no checksum
        raw = {**raw, "crc32": None}
    if not isinstance(raw, dict) or set(raw) != fields:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise bad(f"has fields {got}, expected {sorted(fields)}")
    for name, low in _INT_FIELDS.items():
        value = raw[name]
        if type(value) is not int or not low <= value <= _MAX_STEP:
            raise bad(f"has {name} = {value!r}, not a whole number in {low}..{_MAX_STEP}")
    if raw["t"] > raw["step"]:
        raise bad(f"has t = {raw['t']} after its step {raw['step']}")
    for name in ("sigma_rel", "gamma", "rounding"):
        value = raw[name]
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise bad(f"has {name} = {value!r}, not a finite number >= 0")
    if not 0 < raw["sigma_rel"] < MAX_SIGMA_REL:
        raise bad(f"has sigma_rel = {raw['sigma_rel']!r}, outside (0, {MAX_SIGMA_REL})")
    if not math.isclose(gamma_to_sigma_rel(raw["gamma"]), raw["sigma_rel"], rel_tol=1e-6):
        raise bad(f"has gamma = {raw['gamma']!r}, which is not the exponent of sigma_rel "
                  f"{raw['sigma_rel']!r}")
    if raw["crc32"] is not None and (type(raw["crc32"]) is not int
                                     or not 0 <= raw["crc32"] < 2**32):
        raise bad(f"has crc32 = {raw['crc32']!r}, not a 32-bit checksum")
    if raw["dtype"] not in _DTYPES:
        raise bad(f"has dtype = {raw['dtype']!r}, not one of {sorted(_DTYPES)}")
    expected = f"sigma{raw['sigma_rel']:g}_step{raw['step']:08d}.pth"  # what write() names it
    if raw["file"] != expected:
        raise bad(f"has file = {raw['file']!r}, but its snapshot is named {expected!r}")
    confined(folder, raw["file"], f"{index} (snapshot entry {i})")
    return SnapshotEntry(**{k: float(v) if k in ("sigma_rel", "gamma", "rounding") else v  # type: ignore[arg-type]
                            for k, v in raw.items()})


def _check_unique(index: Path, entries: list[SnapshotEntry]) -> None:
    files, times = set(), set()
    for e in entries:
        if e.file in files or (e.sigma_rel, e.t) in times:
            raise PostHocError(f"{index} lists {e.file} (sigma_rel {e.sigma_rel:g}, t={e.t}) "
                               "twice; the index is damaged or mixes runs: restore it, or move "
                               "the folder away")
        files.add(e.file)
        times.add((e.sigma_rel, e.t))


def _power_gamma(name: str, ema: EMA) -> tuple[float, float]:
    sched = ema.schedule
    if not isinstance(sched, SigmaRel):
        raise PostHocError(f"EMA {name!r} has schedule {ema.meta()['schedule']}; snapshots for "
                           "post-hoc EMA need power EMAs (schedule='sigma_rel')")
    return sched.sigma_rel, sched.gamma


def _time(ema: EMA) -> int:
    """The averaging time of the EMA's last update (updates come every ``every`` steps)."""
    n = ema.step - ema.start
    return (n // ema.every) * ema.every if n > 0 else 0


class SnapshotWriter:
    """Write snapshots of power EMAs into ``folder`` with an index (see the module docstring).

    Args:
        folder: where to write (created when the first snapshot is written).
        emas: name -> `EMA` with a ``sigma_rel`` schedule.
        dtype: storage precision: ``"float32"`` (exact), ``"float16"`` or ``"bfloat16"``. A
            tensor that does not fit float16 is stored in float32.
        enabled: False makes every method a no-op (e.g. on all but the main process).
        background: write files in a background thread (the copy is taken at once).
    """

    def __init__(self, folder: str | os.PathLike[str], emas: Mapping[str, EMA],
                 dtype: str | torch.dtype = "float32", *, enabled: bool = True,
                 background: bool = True):
        if not emas:
            raise PostHocError("post-hoc EMA needs at least one power EMA to snapshot")
        self.folder = Path(folder)
        self.emas = dict(emas)
        self.power = {n: _power_gamma(n, e) for n, e in self.emas.items()}
        self.dtype = snapshot_dtype(dtype)
        self.enabled = enabled
        self.entries: list[SnapshotEntry] = []
        self._pool = ThreadPoolExecutor(1, "d2ema-snapshots") if background and enabled else None
        self._pending: Future | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.seconds_blocked = 0.0  # time write()/flush() kept the caller waiting

    # ------------------------------------------------------------------ sizes
    @property
    def bytes_per_snapshot(self) -> int:
        """Disk use of one snapshot of every EMA (tensor data, without container overhead)."""
        return sum(g.flat.numel() * self._stored_dtype(g).itemsize
                   for ema in self.emas.values() for g in ema.groups)

    def _stored_dtype(self, group) -> torch.dtype:
        """Averaged tensors go down to the snapshot dtype, never up; others stay as they are."""
        if group.averaged and group.dtype.itemsize >= self.dtype.itemsize:
            return self.dtype
        return group.dtype

    def describe(self, period: int, total_steps: int) -> str:
        count = total_steps // period + (total_steps % period != 0) if period else 1
        sigmas = ", ".join(f"{s:g}" for s, _ in self.power.values())
        per = self.bytes_per_snapshot
        return (f"post-hoc EMA: snapshots of power EMAs sigma_rel {sigmas} every {period} steps "
                f"and at step {total_steps} to {self.folder} ({str(self.dtype)[6:]}): "
                f"{per / 1e6:.1f} MB per snapshot, about {count * per / 1e9:.2f} GB for the run")

    def check_space(self, period: int, total_steps: int, start_step: int = 0) -> int:
        """The bytes the snapshots from ``start_step`` to ``total_steps`` will take; raises
        `PostHocError` when that exceeds the free space of the folder's disk."""
        import shutil

        count = (total_steps // period - start_step // period
                 + (total_steps % period != 0)) if period else 1
        need = max(count, 0) * self.bytes_per_snapshot
        where = self.folder.absolute()
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        if self.enabled and need > free:
            raise PostHocError(
                f"post-hoc EMA: {count} snapshots of {self.bytes_per_snapshot / 1e6:.1f} MB "
                f"would take {need / 1e9:.2f} GB in {self.folder}, but its disk has "
                f"{free / 1e9:.2f} GB free; give PostHocEMA a larger snapshot_every, "
                "dtype='float16', or a folder on a larger disk",
                parameters=("PostHocEMA.snapshot_every", "PostHocEMA.dtype", "PostHocEMA.folder"))
        return need

    # ------------------------------------------------------------------ series
    def sync(self, step: int) -> None:
        """Continue the series of ``folder`` at ``step``.

        Snapshots taken after ``step`` came from a run that went further than the checkpoint
        now resumed; they are deleted and will be written again. Raises
        `PostHocError` if the kept snapshots are of other EMAs than these, and at step 0
        (a new run) if the folder holds another run's series: that is never deleted.
        """
        if not self.enabled:
            return
        self.flush()
        try:
            entries = read_index(self.folder)
        except PostHocError:
            if (self.folder / INDEX).exists():
                raise
            entries = []
        keep = [e for e in entries if e.step <= step]
        tracked = {(round(s, 12), round(g, 9)) for s, g in self.power.values()}
        foreign = sorted({e.sigma_rel for e in keep
                          if (round(e.sigma_rel, 12), round(e.gamma, 9)) not in tracked})
        if foreign:
            raise PostHocError(
                f"{self.folder} holds snapshots of sigma_rel {foreign} up to step {step}, but this "
                "run tracks " + ", ".join(f"{s:g}" for s, _ in self.power.values()) + "; resume "
                "with the same PostHocEMA(sigma_rels=...), or move the folder away",
                parameters=("PostHocEMA.sigma_rels",))
        dropped = [e for e in entries if e.step > step]
        untracked = sorted({e.sigma_rel for e in dropped
                            if (round(e.sigma_rel, 12), round(e.gamma, 9)) not in tracked})
        if untracked:  # never delete a series that a setting change left behind
            raise PostHocError(
                f"{self.folder} holds snapshots of sigma_rel {untracked}, which this run does not "
                "track (it tracks " + ", ".join(f"{s:g}" for s, _ in self.power.values()) + "); "
                "they are kept: resume with the same PostHocEMA(sigma_rels=...), or move the "
                "folder away (or give PostHocEMA a new folder)",
                parameters=("PostHocEMA.sigma_rels", "PostHocEMA.folder"))
        if dropped and step == 0:  # another run's series: kept until the user says otherwise
            raise PostHocError(
                f"{self.folder} holds another run's series ({len(dropped)} snapshots up to step "
                f"{max(e.step for e in dropped)}), which a new run would delete; resume that run "
                "(PostHocEMA.load_state_dict), or give PostHocEMA another folder, or move that one "
                "away", parameters=("PostHocEMA.folder",))
        if dropped:
            logger.warning("post-hoc EMA: deleting %d snapshots in %s (from a run that went "
                           "further than step %d, resumed now)", len(dropped), self.folder, step)
            for e in dropped:
                (self.folder / e.file).unlink(missing_ok=True)
        self.entries = keep
        if dropped:
            self._save_index()

    def write(self, step: int) -> int:
        """Snapshot every EMA as it is now, at training step ``step``; returns how many files
        were started (an EMA already saved at its current time is skipped)."""
        if not self.enabled:
            return 0
        self.flush()
        have = {(e.sigma_rel, e.t) for e in self.entries}
        jobs = []
        for name, ema in self.emas.items():
            sigma_rel, gamma = self.power[name]
            t = _time(ema)
            if t <= 0 or (sigma_rel, t) in have:
                continue
            tensors, dtypes, rounding = self._copy(name, ema)
            entry = SnapshotEntry(
                file=f"sigma{sigma_rel:g}_step{step:08d}.pth", sigma_rel=sigma_rel, gamma=gamma,
                t=t, step=int(step), dtype=str(self.dtype)[6:], bytes=0, rounding=rounding,
            )
            jobs.append((entry, {"tensors": tensors, "dtypes": dtypes,
                                 "meta": dataclasses.asdict(entry) | {"name": name}}))
        if jobs:
            if self._pool is None:
                self._save(jobs)
            else:
                self._pending = self._pool.submit(self._save, jobs)
        return len(jobs)

    def flush(self) -> None:
        """Wait for the snapshot being written; raise `PostHocError` if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        started = time.perf_counter()
        try:
            pending.result()
        except OSError as e:
            raise PostHocError(f"cannot write a post-hoc EMA snapshot to {self.folder}: "
                               f"{e.strerror or e}; the snapshots and checkpoints before it are "
                               "intact: free disk space (or give PostHocEMA dtype='float16' or "
                               "a larger snapshot_every), then train again with --resume",
                               parameters=("PostHocEMA.dtype", "PostHocEMA.snapshot_every"),
                               ) from e
        finally:
            self.seconds_blocked += time.perf_counter() - started

    def close(self) -> None:
        self.flush()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ------------------------------------------------------------------ internals
    def _staging(self, key: tuple, numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """A CPU buffer reused from one snapshot to the next (the previous write is finished
        by then): allocating and faulting in a fresh model-sized buffer costs more than the
        copy itself."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def _copy(self, name: str, ema: EMA) -> tuple[dict, dict, float]:
        """A CPU copy of the EMA in the storage dtype, the original float dtypes, and the
        relative rounding error of the cast. A tensor out of the storage dtype's range (e.g. a
        BN running_var above 65504 in float16) is kept in its own dtype."""
        tensors, dtypes, err2, norm2 = {}, {}, 0.0, 0.0
        for i, g in enumerate(ema.groups):
            numels = [s.numel() for s in g.shapes]
            flat = g.flat.detach()
            dtype = self._stored_dtype(g)
            buf = self._staging((name, i), flat.numel(), dtype, flat.is_cuda)
            stored = list(buf.copy_(flat).split(numels))
            if dtype != g.dtype:
                exact = flat.cpu().split(numels)
                overflow = not bool(torch.isfinite(buf).all())
                for j, (lo, hi) in enumerate(zip(stored, exact)):
                    if overflow and not bool(torch.isfinite(lo).all()):
                        stored[j] = hi.clone()
                        continue
                    err2 += float((lo.double() - hi.double()).square().sum())
                    norm2 += float(hi.double().square().sum())
            for tname, shape, tensor in zip(g.names, g.shapes, stored):
                tensors[tname] = tensor.view(shape)
                if g.averaged:
                    dtypes[tname] = str(g.dtype)[6:]
        return tensors, dtypes, math.sqrt(err2 / norm2) if norm2 > 0 else 0.0

    def _save(self, jobs: list[tuple[SnapshotEntry, dict]]) -> None:
        for entry, payload in jobs:
            path = confined(self.folder, entry.file, "the snapshot writer")
            atomic_save(payload, path)
            crc = file_crc32(path)  # read back from the page cache, before it is dropped
            _drop_from_page_cache(path)
            done = dataclasses.replace(entry, bytes=path.stat().st_size, crc32=crc)
            self.entries = [e for e in self.entries
                            if (e.sigma_rel, e.t) != (done.sigma_rel, done.t)] + [done]
        self._save_index()

    def _save_index(self) -> None:
        entries = sorted(self.entries, key=lambda e: (e.t, e.sigma_rel))
        confined(self.folder, INDEX, "the snapshot writer")  # never replace a file elsewhere
        _atomic_json({"format": FORMAT, "version": INDEX_VERSION,
                      "snapshots": [dataclasses.asdict(e) for e in entries]},
                     self.folder / INDEX)
