"""Time one EMA update per method on real detection/classification models, side by side.

An EMA update reads the model and the average and writes the average: a memory-bound pass
whose lower bound is one ``lerp_`` over a single contiguous buffer of the same size (the
"floor" row). Every other row is reported as a ratio to that floor, measured in the same
run, so the numbers say how much time a method spends beyond moving the bytes (Python loops,
per-tensor dispatch, temporaries) and stay comparable across machines, where absolute
milliseconds do not.

Methods, each averaging parameters and floating buffers of the same model:

* ``floor``: one ``lerp_`` over one contiguous fp32 buffer of the model's float size;
* ``d2ema``: :class:`d2ema.EMA` in its default mode and with ``flat=True``;
* ``seed loop``: the seed article's (and old D2Go's) ``ema.copy_(ema * d + w * (1 - d))``
  per tensor, walking ``named_parameters()`` and ``named_buffers()`` every step;
* ``foreach``: ``_foreach_mul_`` + ``_foreach_add_`` and ``_foreach_lerp_`` (what D2Go does
  now) over prebuilt tensor lists, i.e. their best case with no per-step Python walk;
* peers: timm ``ModelEmaV3``, ema-pytorch ``EMA``, torch-ema ``ExponentialMovingAverage``
  and ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``.

Timing: after a warm-up, each repetition times one update of every method, round robin with a
rotating start, so that machine noise (frequency changes, a neighbour's work) hits all
methods alike. A sample is the fastest of a few back-to-back updates, and repetitions during
which other processes took the CPU our threads need are dropped and run again (see
:func:`time_round_robin`). Ratios are medians of per-repetition ratios, times are medians with
p25-p75. The script also times ``EMA.swapped`` and checks that it allocates no storage, and
checks that d2ema's average equals the foreach baseline's after the run (so no row is a
no-op).

Run ``python benchmarks/update_speed.py`` (a few minutes on 2 cores; ``--quick`` for a smoke
run). ``run()`` returns the markdown report and ``main()`` is the command line, so that a CLI
(``d2ema bench``) can call either.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

try:
    import d2ema
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import d2ema

__all__ = ["MODELS", "main", "run"]

DECAY = 0.9998
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "update_speed.md"
# Automatic repetitions: as many as fit this many seconds per model, within these bounds.
SECONDS_PER_MODEL = 40.0
MIN_REPS, MAX_REPS = 30, 200
WARMUP = 3
# Each sample is the fastest of this many back-to-back updates (see time_round_robin).
INNER = 3
# A repetition during which other processes used more than this share of the machine's CPU is
# dropped and run again, within RETRY_FACTOR times the planned time; with fewer than MIN_QUIET
# quiet repetitions, all are kept (and the report says so).
BUSY_SHARE = 0.10
RETRY_FACTOR = 3
MIN_QUIET = 15
# Peer libraries by distribution name (what `pip install` takes).
PEERS = ("timm", "ema-pytorch", "torch-ema")


# --------------------------------------------------------------------------------- models
def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50()


def _retinanet_r50_fpn() -> nn.Module:
    """detectron2's RetinaNet R50-FPN, built from code (random weights, no download)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.DEVICE = "cpu"  # moved to --device afterwards
    return build_model(cfg)


def _tiny500() -> nn.Module:
    """500 Linear(16, 16) layers: 1000 tiny tensors, where per-tensor overhead dominates."""
    return nn.Sequential(*(nn.Linear(16, 16) for _ in range(500)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": _resnet50,
    "retinanet_r50_fpn": _retinanet_r50_fpn,
    "tiny500": _tiny500,
}
# Models on which d2ema's default mode must stay within 1.10× the floor (few, large tensors).
DEFAULT_AT_FLOOR = {"resnet50", "retinanet_r50_fpn"}
MODEL_TITLES = {
    "resnet50": "torchvision ResNet-50",
    "retinanet_r50_fpn": "detectron2 RetinaNet R50-FPN",
    "tiny500": "500 × nn.Linear(16, 16)",
}


def _named_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers, shared tensors once (what every method here tracks)."""
    seen: set[int] = set()
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


def _float_state(model: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in _named_state(model) if t.is_floating_point()]


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Move the weights off the averages once, so that no method lerps equal data."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for t in _float_state(model):
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
        t.add_(noise, alpha=1e-3)


def _describe(model: nn.Module) -> str:
    params = list(model.parameters())
    buffers = [b for _, b in model.named_buffers()]
    float_buffers = [b for b in buffers if b.is_floating_point()]
    nbytes = sum(t.numel() * t.element_size() for t in _float_state(model))
    return (
        f"{len(params) + len(buffers)} tensors ({len(params)} parameters, "
        f"{len(float_buffers)} float buffers, {len(buffers) - len(float_buffers)} integer "
        f"buffers), {sum(p.numel() for p in params) / 1e6:.2f} M parameters, "
        f"{nbytes / 2**20:.1f} MiB of float state"
    )


# --------------------------------------------------------------------------------- methods
@dataclasses.dataclass
class Method:
    """One way to keep an EMA: ``step()`` performs one update of its average."""

    name: str
    step: Callable[[], object]
    note: str = ""


def _floor(model: nn.Module, decay: float) -> Method:
    numel = sum(t.numel() for t in _float_state(model))
    device = next(model.parameters()).device
    ema = torch.randn(numel, device=device)
    w = ema + 1e-3 * torch.randn(numel, device=device)
    return Method("floor: one lerp_ over a flat buffer", lambda: ema.lerp_(w, 1.0 - decay),
                  "memory-bandwidth floor")


def _d2ema(model: nn.Module, decay: float) -> tuple[Method, d2ema.EMA]:
    ema = d2ema.EMA(model, decay=decay)
    note = "foreach lerp_ over lists built once"
    return Method("d2ema EMA (default)", lambda: ema.update(model), note), ema


def _d2ema_flat(model: nn.Module, decay: float) -> tuple[Method, d2ema.EMA, nn.Module]:
    own = copy.deepcopy(model)  # flat=True re-points the model's tensors: keep it private
    ema = d2ema.EMA(own, decay=decay, flat=True)
    method = Method("d2ema EMA(flat=True)", lambda: ema.update(own), "one lerp_; own model copy")
    return method, ema, own


def _seed_loop(model: nn.Module, decay: float) -> Method:
    state = {name: t.detach().clone() for name, t in _named_state(model)}

    @torch.no_grad()
    def step() -> None:
        for name, val in itertools.chain(model.named_parameters(), model.named_buffers()):
            ema_val = state[name]
            ema_val.copy_(ema_val * decay + val * (1.0 - decay))

    return Method("seed loop: copy_(e * d + w * (1 - d))", step, "walks named_* each step")


def _foreach_lists(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    weights = [t.detach() for t in _float_state(model)]
    return [w.clone() for w in weights], weights


def _foreach_mul_add(model: nn.Module, decay: float) -> Method:
    averages, weights = _foreach_lists(model)

    @torch.no_grad()
    def step() -> None:
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, weights, alpha=1.0 - decay)

    return Method("foreach mul_ + add_", step, "prebuilt lists, float tensors")


def _foreach_lerp(model: nn.Module, decay: float) -> tuple[Method, list[torch.Tensor]]:
    averages, weights = _foreach_lists(model)

    @torch.no_grad()
    def step() -> None:
        torch._foreach_lerp_(averages, weights, 1.0 - decay)

    method = Method("foreach lerp_ (D2Go today)", step, "prebuilt lists, float tensors")
    return method, averages


def _timm(model: nn.Module, decay: float) -> Method:
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay)  # foreach=True is its default
    note = f"foreach={ema.foreach}; walks state_dict() each step (skips non-persistent buffers)"
    return Method("timm ModelEmaV3", lambda: ema.update(model), note)


def _ema_pytorch(model: nn.Module, decay: float, use_foreach: bool) -> Method:
    from ema_pytorch import EMA

    ema = EMA(
        model, beta=decay, update_after_step=0, update_every=1,
        include_online_model=False, use_foreach=use_foreach,
    )
    ema.update()  # its first update copies the weights; later ones average
    name = "ema-pytorch EMA" + (" (use_foreach=True)" if use_foreach else "")
    note = "per-tensor lerp_ (its default)" if not use_foreach else "opt-in foreach lerp"
    return Method(name, ema.update, note + "; warm-up decay schedule")


def _torch_ema(model: nn.Module, decay: float) -> Method:
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model.parameters(), decay=decay)
    return Method("torch-ema ExponentialMovingAverage", ema.update,
                  "**parameters only** (no buffers); per-tensor sub/mul/sub")


def _averaged_model(model: nn.Module, decay: float) -> Method:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)  # its first update copies the weights
    return Method("torch AveragedModel (EMA multi_avg_fn)", lambda: ema.update_parameters(model),
                  "use_buffers=True; groups tensors every step")


@dataclasses.dataclass
class Setup:
    """The methods built for one model, plus what the checks after timing need."""

    model: nn.Module
    methods: list[Method]
    missing: list[tuple[str, str]]  # (method, why it is absent)
    ema: d2ema.EMA
    ema_flat: d2ema.EMA
    flat_model: nn.Module
    foreach_averages: list[torch.Tensor]


def build_methods(model: nn.Module, decay: float) -> Setup:
    """Every method for ``model``; peers that cannot be imported are listed as missing."""
    floor = _floor(model, decay)
    default, ema = _d2ema(model, decay)
    flat, ema_flat, flat_model = _d2ema_flat(model, decay)
    lerp, foreach_averages = _foreach_lerp(model, decay)
    mul_add = _foreach_mul_add(model, decay)
    methods = [floor, default, flat, _seed_loop(model, decay), mul_add, lerp]
    missing: list[tuple[str, str]] = []
    peers: list[tuple[str, str, Callable[[], Method]]] = [
        ("timm ModelEmaV3", "timm", lambda: _timm(model, decay)),
        ("ema-pytorch EMA", "ema-pytorch", lambda: _ema_pytorch(model, decay, False)),
        ("ema-pytorch EMA (use_foreach=True)", "ema-pytorch",
         lambda: _ema_pytorch(model, decay, True)),
        ("torch-ema ExponentialMovingAverage", "torch-ema", lambda: _torch_ema(model, decay)),
        ("torch AveragedModel (EMA multi_avg_fn)", "torch", lambda: _averaged_model(model, decay)),
    ]
    for name, dist, build in peers:
        try:
            methods.append(build())
        except ImportError:
            missing.append((name, f"not installed (`pip install {dist}`)"))
    _perturb(model)
    _perturb(flat_model)
    return Setup(model, methods, missing, ema, ema_flat, flat_model, foreach_averages)


# --------------------------------------------------------------------------------- timing
def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _quantile(xs: Sequence[float], q: float) -> float:
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


def time_round_robin(
    methods: Sequence[Method],
    reps: int | None,
    device: torch.device,
    warmup: int = WARMUP,
    inner: int = INNER,
    seconds: float = SECONDS_PER_MODEL,
) -> Timing:
    """Time every method ``reps`` times, interleaved, keeping repetitions on a quiet machine.

    Repetition ``r`` starts at method ``r % len(methods)``, so every method runs equally often
    after every position. A sample is the fastest of ``inner`` back-to-back updates, which
    filters a single preemption. A repetition during which other processes used more than
    ``BUSY_SHARE`` of the machine, beyond the cores our threads leave free, is run again
    within ``RETRY_FACTOR`` times the planned time; if fewer than ``MIN_QUIET`` quiet ones
    come, all are kept. ``reps=None`` picks as many as fit ``seconds``.
    """
    sync = _synchronizer(device)
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


def _swap_report(ema: d2ema.EMA, model: nn.Module, device: torch.device, reps: int) -> str:
    """Time ``ema.swapped(model)`` enter+exit and measure the storage it allocates.

    Inside the block every tracked float tensor must point into the EMA's own buffers; the
    bytes allocated are measured with ``torch.cuda.memory_allocated`` on CUDA and with the
    profiler's allocation records on the CPU.
    """
    sync = _synchronizer(device)
    tracked = _float_state(model)
    spans = [(g.flat.data_ptr(), g.flat.data_ptr() + g.flat.numel() * g.flat.element_size())
             for g in ema.groups]
    with ema.swapped(model):
        inside = sum(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in tracked)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        with ema.swapped(model):
            pass
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    allocated = _allocated_bytes(lambda: ema.swapped(model), device)
    return (
        f"{_quantile(times, 0.5):.3f} ms enter+exit, {allocated} bytes allocated, "
        f"{inside}/{len(tracked)} float tensors inside the block point into EMA storage"
    )


def _allocated_bytes(make_ctx: Callable[[], contextlib.AbstractContextManager], device) -> str:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with make_ctx():
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return f"{peak} (CUDA peak)"
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        with _quiet_stderr(), profile(activities=activities, profile_memory=True) as p, make_ctx():
            pass
        return str(sum(max(ev.cpu_memory_usage, 0) for ev in p.events()))
    except Exception as exc:  # the profiler is a nicety; never fail the benchmark on it
        return f"unmeasured ({type(exc).__name__})"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop log lines (file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------------- report
def _environment(threads: int, device: torch.device) -> list[str]:
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
            cwd=Path(__file__).resolve().parent, check=True,
        ).stdout.strip()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    peers = ", ".join(f"{dist} {version(dist)}" for dist in PEERS)
    return [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- d2ema {d2ema.__version__} (commit {commit}), torch {torch.__version__}, "
        f"detectron2 {d2}, Python {platform.python_version()}",
        f"- peers: {peers}",
        f"- device: {device}{gpu}; CPU: {cpu}, {os.cpu_count()} logical cores; "
        f"torch threads: {threads}",
    ]


def _table(methods: Sequence[Method], times: list[list[float]],
           missing: Sequence[tuple[str, str]]) -> tuple[list[str], dict[str, float]]:
    """Markdown rows and ``{method: median ratio to floor}``."""
    floor, ours = times[0], times[1]
    rows = [
        "| method | × floor | × d2ema | median ms | p25–p75 ms | p10–p90 × floor | note |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    ratios = {}
    for m, t in zip(methods, times):
        to_floor = [a / b for a, b in zip(t, floor)]
        to_ours = [a / b for a, b in zip(t, ours)]
        ratios[m.name] = _quantile(to_floor, 0.5)
        rows.append(
            f"| {m.name} | **{ratios[m.name]:.2f}** | {_quantile(to_ours, 0.5):.2f} | "
            f"{_quantile(t, 0.5):.3f} | {_quantile(t, 0.25):.3f}–{_quantile(t, 0.75):.3f} | "
            f"{_quantile(to_floor, 0.1):.2f}–{_quantile(to_floor, 0.9):.2f} | {m.note} |"
        )
    rows += [f"| {name} | – | – | – | – | – | {why} |" for name, why in missing]
    return rows, ratios


def _targets(name: str, ratios: dict[str, float]) -> list[str]:
    """d2ema's speed targets for this model, each with its numbers and PASS/FAIL."""
    ours = ratios["d2ema EMA (default)"]
    flat = ratios["d2ema EMA(flat=True)"]
    seed = next(r for m, r in ratios.items() if m.startswith("seed loop"))
    baselines = {m: r for m, r in ratios.items() if m.startswith("foreach")}
    peers = {m: r for m, r in ratios.items()
             if not m.startswith(("floor", "d2ema", "seed loop", "foreach"))}
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    for label, rivals in (("peer library", peers), ("foreach baseline", baselines)):
        if rivals:
            closest = min(rivals, key=rivals.__getitem__)
            check(ours < rivals[closest],
                  f"default faster than every {label} (closest: {closest} at "
                  f"{rivals[closest] / ours:.2f}× d2ema's time)")
    check(seed / ours >= 5, f"default ≥ 5× faster than the seed loop ({seed / ours:.1f}×)")
    if name in DEFAULT_AT_FLOOR:
        check(ours <= 1.10, f"default ≤ 1.10× floor ({ours:.3f}×)")
    check(flat <= 1.10, f"flat ≤ 1.10× floor ({flat:.3f}×)")
    return lines


def _agreement(setup: Setup) -> str:
    """d2ema's averages against the foreach-lerp baseline's after the same updates."""
    mine = setup.ema.tensors()
    names = [n for n, t in _named_state(setup.model) if t.is_floating_point()]
    diff = max(float((mine[n] - t).abs().max()) for n, t in zip(names, setup.foreach_averages))
    return f"max |d2ema − foreach lerp_| after the run: {diff:.2e}"


def _timing_note(timing: Timing, warmup: int) -> str:
    kept = len(timing.times[0])
    text = (
        f"{kept} repetitions after {warmup} warm-up; other processes used "
        f"{100 * timing.others_share:.0f}% of the machine's CPU while timing"
    )
    if kept < timing.rounds:
        text += f" ({timing.rounds - kept} repetitions with a busy neighbour dropped)"
    elif timing.others_share > BUSY_SHARE + spare_share():
        text += " (**too busy for clean numbers: rerun on a quiet machine**)"
    return text + "."


def run(
    models: Sequence[str] = tuple(MODELS),
    reps: int | None = None,
    threads: int = 2,
    device: str | torch.device = "cpu",
    *,
    decay: float = DECAY,
    inner: int = INNER,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """Benchmark ``models`` and return the markdown report (``log`` gets progress lines).

    ``reps=None`` adapts the repetitions to the model (about ``SECONDS_PER_MODEL`` each,
    between ``MIN_REPS`` and ``MAX_REPS``); ``quick`` runs 5 for a smoke test.
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    device = torch.device(device)
    torch.set_num_threads(threads)
    warmup = 1 if quick else WARMUP
    if quick:
        reps = 5
    out = ["# EMA update speed", "", *_environment(threads, device), f"- decay: {decay}", ""]
    out += [
        f"Each sample is the fastest of {inner} back-to-back updates; methods are timed round",
        "robin within each repetition, and ratios are medians of per-repetition ratios.",
        f"Repetitions during which other processes used over {BUSY_SHARE:.0%} of the CPU",
        "(beyond the cores our threads leave free) are dropped and run again. **× floor**:",
        "time over one `lerp_` across a single contiguous buffer of the model's float size,",
        "the memory-bandwidth bound (1.00 = no overhead). **× d2ema**: time over d2ema's",
        "default mode (> 1 = slower than d2ema). Absolute times depend on the machine; the",
        "ratios are the result.",
        "",
    ]
    summary: list[str] = ["## Targets", ""]
    for name in models:
        log(f"[bench] {name}: building")
        model = MODELS[name]().to(device)
        setup = build_methods(model, decay)
        timing = time_round_robin(setup.methods, reps, device, warmup=warmup, inner=inner)
        times = timing.times
        log(f"[bench] {name}: {len(times[0])} of {timing.rounds} repetitions kept")
        rows, ratios = _table(setup.methods, times, setup.missing)
        swap_reps = 5 if quick else 30
        out += [
            f"## {MODEL_TITLES[name]} (`{name}`)", "",
            f"{_describe(model)}; d2ema storage `num_bytes` = {setup.ema.num_bytes:,}. "
            f"{_timing_note(timing, warmup)}", "",
            *rows, "",
            f"- swap, default: {_swap_report(setup.ema, model, device, swap_reps)}",
            f"- swap, flat: {_swap_report(setup.ema_flat, setup.flat_model, device, swap_reps)}",
            f"- check: {_agreement(setup)}",
            "",
        ]
        summary += [f"**{MODEL_TITLES[name]}**", "", *_targets(name, ratios), ""]
        del setup, model
        gc.collect()
    return "\n".join(out + summary).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the report and write it to ``--out``; returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        metavar="MODEL", help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"timed repetitions per model (default: adaptive, "
                             f"{MIN_REPS}-{MAX_REPS})")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--inner", type=int, default=INNER,
                        help=f"back-to-back updates per sample, fastest kept ({INNER})")
    parser.add_argument("--decay", type=float, default=DECAY)
    parser.add_argument("--quick", action="store_true", help="5 repetitions: a smoke test")
    parser.add_argument("--out", default=None,
                        help=f"markdown file to write (default {DEFAULT_OUT} for a full run, "
                             "nothing for --quick; '-' writes nothing)")
    args = parser.parse_args(argv)
    report = run(args.models, args.reps, args.threads, args.device, decay=args.decay,
                 inner=args.inner, quick=args.quick,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(report)
    out = args.out if args.out is not None else (None if args.quick else str(DEFAULT_OUT))
    if out and out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report)
        print(f"[bench] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
