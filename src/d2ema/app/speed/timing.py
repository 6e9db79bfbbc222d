"""How the speed benchmarks measure on a shared, noisy machine.

Methods are timed round robin within each repetition (with a rotating start), so that a slow
drift of the machine hits all of them alike, and results are medians of per-repetition ratios
to a baseline timed in the same repetition. A sample is the fastest of a few back-to-back
calls, which filters a single preemption. On Linux the CPU time other processes used during a
repetition is read from ``/proc/stat``; repetitions with a busy neighbour are dropped and run
again (see `time_round_robin`).

Example::

    timing = time_round_robin([Method("a", f), Method("b", g)], reps=50,
                              device=torch.device("cpu"))
    ratio_b_to_a = quantile([b / a for a, b in zip(*timing.times)], 0.5)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import d2ema

__all__ = [
    "CpuMeter",
    "Method",
    "Timing",
    "copy_bandwidth",
    "environment",
    "quantile",
    "spec_bandwidth",
    "synchronizer",
    "time_round_robin",
]

# benchmarks/results/ of the source checkout d2ema runs from; an installed d2ema writes into
# the user's cache folder (never into whatever folder the command runs in)
_ROOT = Path(__file__).resolve().parents[4]
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "d2ema" / "bench"
RESULTS = _ROOT / "benchmarks" / "results" if (_ROOT / "benchmarks").is_dir() else _CACHE
# Automatic repetitions: as many as fit this many seconds per model, within these bounds.
SECONDS = 40.0
MIN_REPS, MAX_REPS = 30, 200
WARMUP = 3
# Each sample is the fastest of this many back-to-back calls.
INNER = 3
# A repetition during which other processes used more than this share of the machine's CPU is
# dropped and run again, within RETRY_FACTOR times the planned time; with fewer than MIN_QUIET
# quiet repetitions, all are kept (and the report says so).
BUSY_SHARE = 0.10
RETRY_FACTOR = 3
MIN_QUIET = 15


@dataclasses.dataclass
class Method:
    """One way to do the timed work: ``step()`` performs it once."""

    name: str
    step: Callable[[], object]
    note: str = ""


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without needing numpy."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spare_share() -> float:
    """The share of the machine's cores that our threads leave to others."""
    cores = os.cpu_count() or 1
    return max(cores - torch.get_num_threads(), 0) / cores


class CpuMeter:
    """CPU time used by other processes, from Linux ``/proc/stat`` (in clock ticks).

    With ``--threads 2`` on a 2-core machine, a neighbour that takes a core makes every
    parallel op wait for a descheduled thread: such a repetition measures the neighbour, not
    the methods. ``others(a, b)`` is the machine's busy time between two samples minus ours.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample(self) -> tuple[float, float, float] | None:
        """(all ticks, busy ticks, our ticks), or None where ``/proc/stat`` is missing."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        t = os.times()
        return float(sum(fields)), float(sum(fields) - fields[3] - fields[4]), (
            (t.user + t.system) * self.hz
        )

    @staticmethod
    def others(a: tuple | None, b: tuple | None) -> tuple[float, float]:
        """(ticks other processes used, all ticks) between samples ``a`` and ``b``."""
        if a is None or b is None:
            return 0.0, 0.0
        total, busy, ours = (y - x for x, y in zip(a, b))
        return max(busy - ours, 0.0), total


@dataclasses.dataclass
class Timing:
    """Samples of the repetitions kept, and how busy the machine was meanwhile."""

    times: list[list[float]]  # milliseconds, times[method][rep]
    rounds: int  # repetitions run; those with a busy neighbour are dropped when possible
    others_share: float  # share of all CPU time that other processes used while timing

    def note(self, warmup: int) -> str:
        kept = len(self.times[0])
        text = (
            f"{kept} repetitions after {warmup} warm-up; other processes used "
            f"{100 * self.others_share:.0f}% of the machine's CPU while timing"
        )
        if kept < self.rounds:
            text += f" ({self.rounds - kept} repetitions with a busy neighbour dropped)"
        elif self.others_share > BUSY_SHARE + spare_share():
            text += " (**too busy for clean numbers: rerun on a quiet machine**)"
        return text + "."


def time_round_robin(
    methods: Sequence[Method],
    reps: int | None,
    device: torch.device,
    warmup: int = WARMUP,
    inner: int = INNER,
    seconds: float = SECONDS,
) -> Timing:
    """Time every method ``reps`` times, interleaved, keeping repetitions on a quiet machine.

    Repetition ``r`` starts at method ``r % len(methods)``, so every method runs equally often
    after every position. A sample is the fastest of ``inner`` back-to-back calls. A repetition
    during which other processes used more than ``BUSY_SHARE`` of the machine, beyond the
    cores our threads leave free, is run again within ``RETRY_FACTOR`` times the planned
    time; if fewer than ``MIN_QUIET`` quiet ones come, all are kept. ``reps=None`` picks as
    many as fit ``seconds``.
    """
    sync = synchronizer(device)
    meter = CpuMeter()
    n = len(methods)
    spare = spare_share()  # others may use the cores our threads leave free

    def sample(step: Callable[[], object]) -> float:
        best = math.inf
        for _ in range(inner):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    def one_round(r: int) -> list[float]:
        row = [0.0] * n
        for k in range(n):
            i = (r + k) % n
            row[i] = sample(methods[i].step)
        return row

    gc.collect()
    gc.disable()  # a collection inside a timed call would land on one method only
    try:
        fastest = math.inf
        for r in range(warmup):
            t0 = time.perf_counter()
            one_round(r)
            fastest = min(fastest, time.perf_counter() - t0)
        if reps is None:
            reps = int(min(MAX_REPS, max(MIN_REPS, seconds / max(fastest, 1e-9))))
        # The fastest warm-up round, not the mean: a busy neighbour must not stretch the plan.
        deadline = time.perf_counter() + RETRY_FACTOR * reps * fastest
        quiet: list[list[float]] = []
        every: list[list[float]] = []
        others_ticks = all_ticks = 0.0
        while len(quiet) < reps and (
            time.perf_counter() < deadline or len(every) < min(reps, MIN_QUIET)
        ):
            before = meter.sample()
            row = one_round(len(every))
            others, total = meter.others(before, meter.sample())
            others_ticks, all_ticks = others_ticks + others, all_ticks + total
            every.append(row)
            # Tick accounting is coarse: allow two ticks of slack on short rounds.
            if others <= max(2.0, (spare + BUSY_SHARE) * total):
                quiet.append(row)
    finally:
        gc.enable()
    kept = quiet if len(quiet) >= min(reps, MIN_QUIET) else every
    return Timing(
        times=[list(col) for col in zip(*kept)],
        rounds=len(every),
        others_share=others_ticks / all_ticks if all_ticks else 0.0,
    )


# --------------------------------------------------------------------------------- bandwidth
def spec_bandwidth(device: torch.device) -> float | None:
    """A CUDA card's peak memory bandwidth in bytes/s from its properties (DDR: 2 transfers
    per clock), or None where unknown."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured bytes/s of one large ``copy_`` on ``device``, counting bytes read and written."""
    n = nbytes // 4 if device.type == "cuda" else 1 << 24
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    sync = synchronizer(device)
    best = math.inf
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


# --------------------------------------------------------------------------------- report
def environment(threads: int, device: torch.device, dists: Sequence[str] = ()) -> list[str]:
    """Markdown bullet lines: date, versions and commit, the device and CPU."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import detectron2

        d2 = detectron2.__version__
    except ImportError:
        d2 = "not installed"
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(d2ema.__file__).resolve().parent, check=True,
        ).stdout.strip()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    lines = [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- d2ema {d2ema.__version__} (commit {commit}), torch {torch.__version__}, "
        f"detectron2 {d2}, Python {platform.python_version()}",
    ]
    if dists:
        lines.append("- peers: " + ", ".join(f"{d} {version(d)}" for d in dists))
    lines.append(
        f"- device: {device}{gpu}; CPU: {cpu}, {os.cpu_count()} logical cores; "
        f"torch threads: {threads}"
    )
    return lines
