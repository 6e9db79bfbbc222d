"""Time one EMA update per method on real detection/classification models, side by side.

An EMA update reads the model and the average and writes the average: a memory-bound pass
whose lower bound is one ``lerp_`` over a single contiguous buffer of the same size (the
"floor" row). Every other row is reported as a ratio to that floor, measured in the same
run, so the numbers say how much time a method spends beyond moving the bytes (Python loops,
per-tensor dispatch, temporaries) and stay comparable across machines, where absolute
milliseconds do not. GB/s counts the bytes an update must move (read average and weights,
write average) over its median time; on CUDA the report also gives the card's bandwidth.

The methods are in `.methods`, the timing rules in `.timing`. The report also
times ``EMA.swapped`` and checks that it allocates no storage, and checks that d2ema's average
equals the foreach baseline's after the run (so no row is a no-op).

Example::

    report = run(["resnet50", "tiny500"], device="cpu")   # markdown
    main(["--quick", "--models", "tiny500"])              # the command line
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

import d2ema
from d2ema.app.speed.methods import (
    DEFAULT,
    FLAT,
    MODEL_TITLES,
    MODELS,
    PEERS,
    Setup,
    build_methods,
    describe,
    float_state,
    named_state,
)
from d2ema.app.speed.timing import (
    BUSY_SHARE,
    INNER,
    MAX_REPS,
    MIN_REPS,
    RESULTS,
    SECONDS,
    WARMUP,
    Method,
    copy_bandwidth,
    environment,
    quantile,
    spec_bandwidth,
    synchronizer,
    time_round_robin,
)

__all__ = ["DEFAULT_OUT", "main", "run"]

DECAY = 0.9998
DEFAULT_OUT = RESULTS / "update_speed.md"
# Models of few, large tensors: the EMATrainer default must be within 1.05x the floor there,
# and 2x elsewhere; plain EMA(model) within 1.10x there.
LARGE = {"resnet50", "retinanet_r50_fpn"}


def _swap_report(ema: d2ema.EMA, model: nn.Module, device: torch.device, reps: int) -> str:
    """Time ``ema.swapped(model)`` enter+exit and measure the storage it allocates.

    Inside the block every tracked float tensor must point into the EMA's own buffers; the
    bytes allocated are measured with ``torch.cuda.memory_allocated`` on CUDA and with the
    profiler's allocation records on the CPU.
    """
    sync = synchronizer(device)
    tracked = float_state(model)
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
        f"{quantile(times, 0.5):.3f} ms enter+exit, {allocated} bytes allocated, "
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


def _table(
    methods: Sequence[Method],
    times: list[list[float]],
    missing: Sequence[tuple[str, str]],
    nbytes: int,
) -> tuple[list[str], dict[str, float]]:
    """Markdown rows and ``{method: median ratio to floor}``; ``nbytes`` moved per update."""
    floor, ours = times[0], times[1]
    rows = [
        "| method | × floor | × d2ema | median ms | p25–p75 ms | p10–p90 × floor | GB/s | note |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    ratios = {}
    for m, t in zip(methods, times):
        to_floor = [a / b for a, b in zip(t, floor)]
        to_ours = [a / b for a, b in zip(t, ours)]
        ratios[m.name] = quantile(to_floor, 0.5)
        med = quantile(t, 0.5)
        rows.append(
            f"| {m.name} | **{ratios[m.name]:.2f}** | {quantile(to_ours, 0.5):.2f} | "
            f"{med:.3f} | {quantile(t, 0.25):.3f}–{quantile(t, 0.75):.3f} | "
            f"{quantile(to_floor, 0.1):.2f}–{quantile(to_floor, 0.9):.2f} | "
            f"{nbytes / med / 1e6:.0f} | {m.note} |"
        )
    rows += [f"| {name} | – | – | – | – | – | – | {why} |" for name, why in missing]
    return rows, ratios


def _targets(name: str, ratios: dict[str, float]) -> list[str]:
    """d2ema's speed targets for this model, each with its numbers and PASS/FAIL."""
    flat, plain = ratios[FLAT], ratios[DEFAULT]
    seed = next(r for m, r in ratios.items() if m.startswith("seed loop"))
    baselines = {m: r for m, r in ratios.items() if m.startswith("foreach")}
    peers = {m: r for m, r in ratios.items()
             if not m.startswith(("floor", "d2ema", "seed loop", "foreach"))}
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    limit = 1.05 if name in LARGE else 2.0
    check(flat <= limit, f"EMATrainer default ≤ {limit:.2f}× floor ({flat:.3f}×)")
    for who, mine in (("EMATrainer default", flat), ("EMA(model)", plain)):
        for label, rivals in (("peer library", peers), ("foreach baseline", baselines)):
            if rivals:
                closest = min(rivals, key=rivals.__getitem__)
                check(mine < rivals[closest],
                      f"{who} faster than every {label} (closest: {closest} at "
                      f"{rivals[closest] / mine:.2f}× its time)")
    check(seed / plain >= 5, f"EMA(model) ≥ 5× faster than the seed loop ({seed / plain:.1f}×)")
    if name in LARGE:
        check(plain <= 1.10, f"EMA(model) ≤ 1.10× floor ({plain:.3f}×)")
    return lines


def _agreement(setup: Setup) -> str:
    """d2ema's averages against the foreach-lerp baseline's after the same updates."""
    mine = setup.ema.tensors()
    names = [n for n, t in named_state(setup.model) if t.is_floating_point()]
    diff = max(float((mine[n] - t).abs().max()) for n, t in zip(names, setup.foreach_averages))
    return f"max |d2ema − foreach lerp_| after the run: {diff:.2e}"


def _bandwidth_lines(device: torch.device) -> list[str]:
    measured = copy_bandwidth(device)
    spec = spec_bandwidth(device)
    line = f"- memory bandwidth: one large `copy_` moved {measured / 1e9:.0f} GB/s (read + write)"
    if spec:
        line += f"; the card's peak from its properties: {spec / 1e9:.0f} GB/s"
    return [line]


def run(
    models: Sequence[str] = tuple(MODELS),
    reps: int | None = None,
    threads: int = 2,
    device: str | torch.device = "cpu",
    *,
    decay: float = DECAY,
    inner: int = INNER,
    seconds: float = SECONDS,
    quick: bool = False,
    peers: bool = True,
    log: Callable[[str], None] = print,
) -> str:
    """Benchmark ``models`` and return the markdown report (``log`` gets progress lines).

    ``reps=None`` adapts the repetitions to the model (about ``seconds`` each, between
    ``MIN_REPS`` and ``MAX_REPS``); ``quick`` runs 5 for a smoke test; ``peers=False`` leaves
    the peer libraries out.
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    device = torch.device(device)
    torch.set_num_threads(threads)
    warmup = 1 if quick else WARMUP
    if quick:
        reps = 5
    out = ["# EMA update speed", "", *environment(threads, device, PEERS), f"- decay: {decay}"]
    out += [*_bandwidth_lines(device), ""]
    out += [
        f"Each sample is the fastest of {inner} back-to-back updates; methods are timed round",
        "robin within each repetition, and ratios are medians of per-repetition ratios.",
        f"Repetitions during which other processes used over {BUSY_SHARE:.0%} of the CPU",
        "(beyond the cores our threads leave free) are dropped and run again. **× floor**:",
        "time over one `lerp_` across a single contiguous buffer of the model's float size,",
        "the memory-bandwidth bound (1.00 = no overhead). **× d2ema**: time over the",
        "EMATrainer default (> 1 = slower). **GB/s**: the bytes an update must move (read",
        "average and weights, write average) over the median time. Absolute times depend on",
        "the machine; the ratios are the result.",
        "",
    ]
    summary: list[str] = ["## Targets", ""]
    for name in models:
        log(f"[bench] {name}: building")
        try:
            model = MODELS[name]().to(device)
        except ImportError as e:
            out += [f"## {MODEL_TITLES[name]} (`{name}`)", "", f"Skipped: {e}.", ""]
            continue
        setup = build_methods(model, decay, peers)
        log(f"[bench] {name}: timing {len(setup.methods)} methods round robin "
            f"({'5 repetitions' if quick else f'about {seconds:.0f} s'}; progress per model)")
        timing = time_round_robin(setup.methods, reps, device, warmup=warmup, inner=inner,
                                  seconds=seconds)
        log(f"[bench] {name}: {len(timing.times[0])} of {timing.rounds} repetitions kept")
        nbytes = 3 * sum(t.numel() * t.element_size() for t in float_state(model))
        rows, ratios = _table(setup.methods, timing.times, setup.missing, nbytes)
        swap_reps = 5 if quick else 30
        out += [
            f"## {MODEL_TITLES[name]} (`{name}`)", "",
            f"{describe(model)}; d2ema storage `num_bytes` = {setup.ema.num_bytes:,}. "
            f"{timing.note(warmup)}", "",
            *rows, "",
            f"- swap, EMATrainer default: "
            f"{_swap_report(setup.ema_flat, setup.flat_model, device, swap_reps)}",
            f"- swap, EMA(model): {_swap_report(setup.ema, model, device, swap_reps)}",
            f"- check: {_agreement(setup)}",
            "",
        ]
        summary += [f"**{MODEL_TITLES[name]}**", "", *_targets(name, ratios), ""]
        del setup, model
        gc.collect()
    return "\n".join(out + summary).rstrip() + "\n"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line: print the report and write it to ``--out``; returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        metavar="MODEL", help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"timed repetitions per model (default: adaptive, "
                             f"{MIN_REPS}-{MAX_REPS})")
    parser.add_argument("--seconds", type=float, default=SECONDS,
                        help=f"time budget per model for adaptive --reps ({SECONDS:.0f})")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--inner", type=int, default=INNER,
                        help=f"back-to-back updates per sample, fastest kept ({INNER})")
    parser.add_argument("--decay", type=float, default=DECAY)
    parser.add_argument("--quick", action="store_true", help="5 repetitions: a smoke test")
    parser.add_argument("--no-peers", action="store_true", help="leave the peer libraries out")
    parser.add_argument("--out", default=None,
                        help=f"markdown file to write (default {DEFAULT_OUT} for a full run, "
                             "nothing for --quick; '-' writes nothing)")
    args = parser.parse_args(argv)
    report = run(args.models, args.reps, args.threads, args.device, decay=args.decay,
                 inner=args.inner, seconds=args.seconds, quick=args.quick,
                 peers=not args.no_peers,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(report)
    out = args.out if args.out is not None else (None if args.quick else str(DEFAULT_OUT))
    if out and out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report)
        print(f"[bench] wrote {out}", file=sys.stderr)
    return 0
