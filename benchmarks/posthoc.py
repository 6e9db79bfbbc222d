"""Post-hoc EMA, measured: reconstructions against EMAs tracked directly, in weights and AP.

1. **Synthetic** (no detectron2, about a minute): a drifting random walk of a small model,
   power EMAs 0.05/0.10 snapshotted every 10 of 2000 steps; EMAs of other widths and constant
   decays rebuilt from every K-th snapshot against the same EMAs tracked directly (error vs K),
   and from float16/bfloat16 copies of the snapshots.
2. **shapes** (the acceptance run): the demo's RetinaNet R18-FPN (128 px, from scratch, AdamW,
   constant LR) trained on ``shapes`` with ``MODEL_EMA`` at its defaults (decay 0.999, no ramp:
   "the default single EMA"), ``MODEL_EMA.POSTHOC.ENABLED`` at its defaults (sigma_rel 0.05/0.10,
   a snapshot every MAX_ITER/100 iterations), and 5 power EMAs (sigma_rel 0.02-0.2) plus a
   constant 0.99 tracked directly (``EXTRA_SIGMA_RELS``/``EXTRA_DECAYS``). After training, the
   same lengths are rebuilt from the snapshots and compared in weights and COCO AP, a sweep of
   lengths gives the best post-hoc EMA, and float16/bfloat16 copies of the series are scored.
3. **Snapshot cost** (paired): a second training with the default ``POSTHOC`` config in which
   blocks of 2K iterations alternate between writing one snapshot and writing none; the extra
   wall and CPU time per snapshot over K iterations is the cost at the default K.

5. **Selection in the run** (``--parts 5``, a section of its own in the report): a training
   run with ``MODEL_EMA.POSTHOC.SELECT`` choosing on a held-out split of ``shapes`` (another
   seed), every length also scored on the test set: the gap between the chosen length's test
   AP and the best test AP of the sweep, against choosing on the test set itself.

Writes ``benchmarks/results/posthoc.md`` and ``posthoc.png``; work files (about 10 GB of
snapshots, deleted at the end unless ``--keep``) go to ``output/posthoc_bench``::

    PYTHONPATH=src .venv/bin/python benchmarks/posthoc.py           # ~45 min on 2 busy cores
    PYTHONPATH=src .venv/bin/python benchmarks/posthoc.py --iters 60 --pairs 2 --val 20  # smoke
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/posthoc.py --parts 5 \
        --iters 300 --work output/posthoc_select     # part 5 alone, into the existing report
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from d2ema.posthoc import PostHocEMA, Target, reconstruct
from d2ema.posthoc.snapshots import FORMAT, INDEX, read_index

HERE = Path(__file__).resolve().parent
DIRECT_SIGMAS = (0.02, 0.035, 0.07, 0.14, 0.2)
DIRECT_DECAYS = (0.99,)
SWEEP = [Target("sigma_rel", s) for s in (0.01, 0.05, 0.1, 0.25)] + [
    Target("decay", d) for d in (0.98, 0.993)]


# ----------------------------------------------------------------------------- helpers
def errors(rec: dict, direct: dict, raw: dict) -> tuple[float, float]:
    """||rec - direct|| over ||direct|| and over ||direct - raw||, float tensors, float64
    (tensors the raw state lacks, such as non-persistent buffers, are constant: left out)."""
    num = den = lag = 0.0
    for name, d in direct.items():
        if d.is_floating_point() and name in raw:
            d = d.double()
            num += float((rec[name].double() - d).square().sum())
            den += float(d.square().sum())
            lag += float((d - raw[name].double()).square().sum())
    return math.sqrt(num / den), math.sqrt(num / lag)


def copy_series(src: Path, dst: Path, dtype: str | None = None, every: int = 1) -> Path:
    """The series of ``src`` keeping every ``every``-th snapshot time, cast to ``dtype``."""
    dst.mkdir(parents=True, exist_ok=True)
    times = sorted({e.t for e in read_index(src)})
    keep = set(times[every - 1 :: every])
    entries = []
    for e in read_index(src):
        if e.t not in keep:
            continue
        if dtype is None:
            (dst / e.file).symlink_to((src / e.file).resolve())
            entries.append(e.__dict__)
            continue
        data = torch.load(src / e.file, weights_only=True)
        low = getattr(torch, dtype)
        data["tensors"] = {n: (t.to(low) if t.is_floating_point() and torch.isfinite(
            t.to(low)).all() else t) for n, t in data["tensors"].items()}
        torch.save(data, dst / e.file)
        entries.append({**e.__dict__, "dtype": dtype, "bytes": (dst / e.file).stat().st_size})
    (dst / INDEX).write_text(json.dumps({"format": FORMAT, "version": 1, "snapshots": entries}))
    return dst


# ----------------------------------------------------------------------------- 1. synthetic
def synthetic(work: Path) -> list[str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))
    steps, base = 2000, 10
    ph = PostHocEMA(model, work / "synthetic", snapshot_every=base)
    from d2ema import EMA

    direct = {Target("sigma_rel", s): EMA(model, schedule="sigma_rel",
                                          schedule_params={"sigma_rel": s})
              for s in (0.02, 0.07, 0.15)}
    direct |= {Target("decay", d): EMA(model, d) for d in (0.99, 0.997)}
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for t in [*model.parameters(), model[1].running_mean]:
                t.add_(0.02 * torch.randn(t.shape, generator=gen) + 0.001 * math.sin(step / 150))
        ph.update(model)
        for ema in direct.values():
            ema.update(model)
    ph.close()
    raw = dict(model.named_parameters()) | dict(model.named_buffers())
    raw = {k: v.detach() for k, v in raw.items()}
    lines = ["## 1. Synthetic trajectory: error against K", "",
             f"A drifting random walk of a Linear(64, 64) + BatchNorm1d model for {steps} steps; "
             "power EMAs 0.05/0.10 snapshotted (fp32) every K steps; each target rebuilt at the "
             "last step and compared with the same EMA tracked directly by `d2ema.EMA`. *misfit*: "
             "the solver's profile misfit (data-independent); *err*: ||rebuilt - direct|| / "
             "||direct||; *err/lag*: the same over ||direct - raw weights||.", "",
             "| K | K/T | target | misfit | err | err/lag |", "|--:|--:|---|--:|--:|--:|"]
    for every in (1, 2, 5, 10, 20, 50):
        folder = copy_series(ph.folder, work / f"synthetic_k{every}", every=every)
        for rec in reconstruct(folder, list(direct), max_residual=10):
            err, lag = errors(rec.tensors, direct[rec.fit.target].tensors(), raw)
            lines.append(f"| {base * every} | {base * every / steps:.3f} | {rec.fit.target.label} "
                         f"| {rec.fit.residual:.1e} | {err:.1e} | {lag:.1e} |")
    lines += ["", "Snapshot precision, K = 20 (T/100): err / err/lag of the rebuilt EMA; "
              "*rounding*: mean ||stored - fp32|| / ||fp32|| of the snapshots.", "",
              "| stored as | rounding | sigma_rel 0.07 | sigma_rel 0.02 (below the stored) |",
              "|---|--:|--:|--:|"]
    for dtype in (None, "float16", "bfloat16"):
        folder = copy_series(ph.folder, work / f"synthetic_{dtype}", dtype, every=2)
        cells = []
        for target in (Target("sigma_rel", 0.07), Target("sigma_rel", 0.02)):
            rec = next(reconstruct(folder, [target]))
            cells.append("{:.1e} / {:.1e}".format(*errors(rec.tensors,
                                                           direct[target].tensors(), raw)))
        rounding = _rounding(ph.folder, folder) if dtype else 0.0
        lines.append(f"| {dtype or 'float32'} | {rounding:.1e} | {cells[0]} | {cells[1]} |")
    return [*lines, ""]


def _rounding(exact: Path, low: Path) -> float:
    out = []
    for e in read_index(low)[:6]:
        a = torch.load(exact / e.file, weights_only=True)["tensors"]
        b = torch.load(low / e.file, weights_only=True)["tensors"]
        out.append(errors(b, a, {k: 0 * v for k, v in a.items()})[0])
    return statistics.mean(out)


# ----------------------------------------------------------------------------- 2. shapes run
def bench_config(args, out: Path, period: int = 0, extras: bool = True):
    from d2ema.app.demo import DemoOptions, demo_config
    from d2ema.d2.config.settings import KEYS

    cfg = demo_config(DemoOptions(dataset="shapes", iters=args.iters, eval_period=0,
                                  output=out, seed=args.seed, decays=(0.999,)))
    cfg.MODEL_EMA.SCHEDULE = "constant"  # MODEL_EMA at its defaults: decay 0.999, no ramp
    cfg.MODEL_EMA.TAU = KEYS["TAU"][0]  # (the demo's ramp parameter, unused now)
    cfg.MODEL_EMA.EXTRA_DECAYS = list(DIRECT_DECAYS) if extras else []
    cfg.MODEL_EMA.EXTRA_SIGMA_RELS = list(DIRECT_SIGMAS) if extras else []
    cfg.MODEL_EMA.POSTHOC.ENABLED = True
    cfg.MODEL_EMA.POSTHOC.PERIOD = period  # 0: the default, MAX_ITER / 100
    cfg.DATASETS.TEST = ()  # scored after training, every weight set by one evaluator
    return cfg


def trainer_class():
    from d2ema.app.demo.trainer import DemoTrainer
    from d2ema.d2 import EMATrainer

    return type("BenchTrainer", (EMATrainer,),
                {"build_optimizer": DemoTrainer.__dict__["build_optimizer"]})


def shapes_run(args, work: Path) -> tuple[list[str], list[dict]]:
    from d2ema.d2 import get_ema_family
    from d2ema.d2.evaluation.run_eval import RunEvaluator, primary_ap

    out = work / "shapes"
    cfg = bench_config(args, out)
    cfg.freeze()
    trainer = trainer_class()(cfg)
    trainer.resume_or_load(resume=False)
    writer = get_ema_family(trainer.model).posthoc.writer
    blocked = _timed(writer, "write")
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    entries = read_index(writer.folder)
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    raw = final["model"]
    direct = {f"ema_sigma{s:g}": Target("sigma_rel", s) for s in DIRECT_SIGMAS}
    direct |= {f"ema_{d:g}": Target("decay", d) for d in DIRECT_DECAYS}
    eval_cfg = cfg.clone()
    eval_cfg.defrost()
    eval_cfg.DATASETS.TEST = ("shapes_val",)
    run = RunEvaluator(eval_cfg, False, out, out / "posthoc")

    def score(tensors) -> float:
        with contextlib.redirect_stdout(io.StringIO()):
            return primary_ap(run.evaluate(tensors))

    rows = [{"target": "raw weights", "kind": "raw", "AP": score(None)},
            {"target": "default single EMA (0.999, no ramp)", "kind": "single",
             "AP": score(final["ema_state"])}]
    agree = ["## 2. shapes: post-hoc against directly tracked EMAs", "",
             f"{args.iters} iterations, batch 8, {torch.get_num_threads()} thread(s); "
             f"{len(entries)} snapshots (2 EMAs x {len(entries) // 2} times, every "
             f"{writer_period(entries)} iterations and at {args.iters}), "
             f"{writer.bytes_per_snapshot / 1e6:.0f} MB per time, fp32. COCO box AP on "
             f"{args.val} validation images.", "",
             "| EMA | misfit | err | err/lag | AP tracked | AP post-hoc | difference |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for rec in reconstruct(writer.folder, list(direct.values()), skip_unrepresentable=True):
        name = next(n for n, t in direct.items() if t == rec.fit.target)
        tracked = final["ema_extras"][name]["ema_state"]
        err, lag = errors(rec.tensors, tracked, raw)
        ap_direct, ap_post = score(tracked), score(rec.tensors)
        agree.append(f"| {rec.fit.target.label} | {rec.fit.residual:.1e} | {err:.1e} | "
                     f"{lag:.1e} | {ap_direct:.1f} | {ap_post:.1f} | {ap_post - ap_direct:+.2f} |")
        rows.append({"target": rec.fit.target.label, "kind": rec.fit.target.kind,
                     "sigma_rel": rec.fit.sigma_rel, "AP": ap_post, "AP_tracked": ap_direct})
    for rec in reconstruct(writer.folder, SWEEP, skip_unrepresentable=True):
        rows.append({"target": rec.fit.target.label, "kind": rec.fit.target.kind,
                     "sigma_rel": rec.fit.sigma_rel, "AP": score(rec.tensors)})
    best = max((r for r in rows if r["kind"] in ("sigma_rel", "decay")), key=lambda r: r["AP"])
    agree += ["", "## 3. Which EMA? (AP at the end of the run)", "",
              "| weights | ~sigma_rel | COCO box AP |", "|---|--:|--:|"]
    for r in sorted(rows, key=lambda r: r.get("sigma_rel", 1.0)):
        mark = " **(best post-hoc)**" if r is best else ""
        sig = f"{r['sigma_rel']:.3f}" if "sigma_rel" in r else ""
        agree.append(f"| {r['target']}{mark} | {sig} | {r['AP']:.1f} |")
    agree += ["", "Precision of the snapshots (the series re-saved in that dtype):", "",
              "| stored as | target | err | err/lag | AP |", "|---|---|--:|--:|--:|"]
    for dtype in ("float16", "bfloat16"):
        folder = copy_series(writer.folder, work / f"shapes_{dtype}", dtype)
        for rec in reconstruct(folder, [direct["ema_sigma0.07"], direct["ema_sigma0.02"]],
                               skip_unrepresentable=True):
            name = f"ema_sigma{rec.fit.target.value:g}"
            err, lag = errors(rec.tensors, final["ema_extras"][name]["ema_state"], raw)
            agree.append(f"| {dtype} | {rec.fit.target.label} | {err:.1e} | {lag:.1e} | "
                         f"{score(rec.tensors):.1f} |")
        shutil.rmtree(folder)
    agree += ["", f"Training took {train_seconds / 60:.1f} min; writing snapshots kept the "
              f"training loop waiting {blocked['seconds']:.1f} s in total "
              f"({blocked['seconds'] / train_seconds:.2%}; {blocked['calls']} calls; the files "
              "are written by a background thread).", ""]
    return agree, rows


def writer_period(entries) -> int:
    steps = sorted({e.step for e in entries})
    return steps[1] - steps[0] if len(steps) > 1 else steps[0]


def _timed(obj, method: str) -> dict:
    """Wrap ``obj.method`` to add up its wall time (in the calling thread)."""
    stats = {"seconds": 0.0, "calls": 0}
    inner = getattr(obj, method)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            stats["seconds"] += time.perf_counter() - t
            stats["calls"] += 1

    setattr(obj, method, wrapper)
    return stats


# ----------------------------------------------------------------------------- 5. selection
SELECT_SET = "shapes_select"  # a held-out split: shapes images of another seed than val/train


def register_select_set(size: int) -> None:
    from dataclasses import replace

    from d2ema.app.data import registry

    registry.DATASETS[SELECT_SET] = replace(registry.DATASETS["shapes_val"], name=SELECT_SET,
                                            seed=5, num_images=size)
    registry.register_datasets(names=[SELECT_SET])


def selection_run(args, work: Path) -> list[str]:
    """``MODEL_EMA.POSTHOC.SELECT`` with ``SELECT_ON`` a held-out split, in the training run
    itself; then every length of the sweep scored on the test set too (``d2ema posthoc``'s
    evaluator), so that both choices can be read off: on the held-out split, on the test set."""
    from d2ema.d2.evaluation.run_eval import RunEvaluator, primary_ap
    from d2ema.posthoc import DEFAULT_SIGMA_RELS

    out = work / "select"
    cfg = bench_config(args, out, extras=False)
    cfg.MODEL_EMA.POSTHOC.SELECT = True
    cfg.MODEL_EMA.POSTHOC.SELECT_ON = SELECT_SET
    cfg.DATASETS.TEST = ("shapes_val",)
    cfg.freeze()
    trainer = trainer_class()(cfg)
    trainer.resume_or_load(resume=False)
    timed = _timed(trainer, "select_posthoc")
    started = time.perf_counter()
    trainer.train()  # then select_posthoc()
    selected = timed["seconds"]
    trained = time.perf_counter() - started - selected
    chosen = json.loads((out / "posthoc" / "results.json").read_text())
    held = {r["target"]: r["AP"] for r in chosen["rows"] if r["kind"] == "sigma_rel"}
    run = RunEvaluator(cfg, False, out, work / "select_test")
    test = {}
    for rec in reconstruct(out / "ema_snapshots", [Target("sigma_rel", s) for s in
                                                   DEFAULT_SIGMA_RELS], skip_unrepresentable=True):
        with contextlib.redirect_stdout(io.StringIO()):
            test[rec.fit.target.label] = primary_ap(run.evaluate(rec.tensors))
    by_held = max(held, key=lambda k: held[k])
    by_test = max(test, key=lambda k: test[k])
    best = test[by_test]
    lines = ["## 5. Choosing the length in the run: on a held-out split vs on the test set", "",
             f"`MODEL_EMA.POSTHOC.SELECT True`, `SELECT_ON {SELECT_SET}` ({args.select} shapes "
             f"images of another seed), test set shapes_val ({args.val} images); {args.iters} "
             f"iterations ({trained / 60:.1f} min), selection {selected / 60:.1f} min. Every "
             "length of the sweep was also scored on the test set to find the best there.", "",
             "| chosen on | chosen length | its AP there | its test AP | best test AP of the "
             "sweep | gap |", "|---|---|--:|--:|--:|--:|",
             f"| {SELECT_SET} (held out) | {by_held} | {held[by_held]:.1f} | "
             f"{test[by_held]:.1f} | {best:.1f} | {test[by_held] - best:+.1f} |",
             f"| shapes_val (the test set) | {by_test} | {best:.1f} | {best:.1f} (optimistic) "
             f"| {best:.1f} | {0.0:+.1f} |", "",
             "| sigma_rel | AP held out | AP test |", "|--:|--:|--:|"]
    for label in test:
        lines.append(f"| {label.split()[-1]} | {held.get(label, math.nan):.1f} | "
                     f"{test[label]:.1f} |")
    lines += ["", f"In the run: raw test AP {chosen['test_AP']['raw']:.1f}, primary EMA "
              f"{chosen['test_AP']['ema']:.1f}, chosen EMA {chosen['test_AP']['chosen']:.1f} "
              f"({chosen['chosen']['target']}).", ""]
    return lines


# ----------------------------------------------------------------------------- 3. cost
def cost_run(args, work: Path) -> list[str]:
    from detectron2.engine import HookBase

    from d2ema.d2 import get_ema_family

    K = max(1, round(args.iters / 100))  # the default period of the acceptance run
    warm, block = 20, 2 * K
    cfg = bench_config(args, work / "cost", period=10**9, extras=False)
    cfg.SOLVER.MAX_ITER = warm + 2 * args.pairs * block + 1
    cfg.freeze()
    trainer = trainer_class()(cfg)
    trainer.resume_or_load(resume=False)
    family = get_ema_family(trainer.model)
    updates = _timed(family.posthoc, "update")
    marks: list[tuple[float, float]] = []

    class Blocks(HookBase):
        def after_step(self):
            n = self.trainer.iter + 1 - warm
            if n >= 0 and n % block == 0:
                marks.append((time.perf_counter(), time.process_time()))
            b = n // block
            on = (b % 2 == 0) == (b // 2 % 2 == 0)  # on/off, then off/on: no order bias
            if n > 0 and n % block == K and on:
                family.posthoc.snapshot()

    trainer.register_hooks([Blocks()])
    trainer.train()
    alone = []  # the same snapshot with no training running (the writer is closed by now, so
    for _ in range(6):  # it writes synchronously): its own cost, without interference
        family.posthoc.update(trainer.model)
        c0, w0 = time.process_time(), time.perf_counter()
        family.posthoc.snapshot()
        alone.append((time.perf_counter() - w0, time.process_time() - c0))
    pairs = []
    for j in range(args.pairs):
        spans = [(marks[i + 1][0] - marks[i][0], marks[i + 1][1] - marks[i][1])
                 for i in (2 * j, 2 * j + 1)]
        on_first = j % 2 == 0
        on, off = spans if on_first else spans[::-1]
        pairs.append((on[0] - off[0], on[1] - off[1], off[0] / block, off[1] / block))
    wall, cpu = [p[0] for p in pairs], [p[1] for p in pairs]
    per_iter, cpu_iter = (statistics.mean(p[i] for p in pairs) for i in (2, 3))

    def se(xs: list[float]) -> float:
        return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan

    n_iter = cfg.SOLVER.MAX_ITER
    return ["## 4. Cost of writing snapshots (paired)", "",
            f"The default POSTHOC config (2 power EMAs, fp32), {args.pairs} pairs of blocks of "
            f"{block} iterations; in one block of each pair one snapshot "
            f"({family.posthoc.writer.bytes_per_snapshot / 1e6:.0f} MB) is written in the middle, "
            "in the other none (order alternating). Extra time per snapshot = block with - block "
            f"without; at the default K = {K} (MAX_ITER {args.iters} / 100) its share is that over "
            "K iterations.", "",
            "| measure | per iteration without | extra per snapshot | share of K iterations |",
            "|---|--:|--:|--:|",
            f"| wall time | {per_iter:.3f} s | {statistics.mean(wall):+.3f} s (SE {se(wall):.3f}) "
            f"| {statistics.mean(wall) / (K * per_iter):+.2%} "
            f"(SE {se(wall) / (K * per_iter):.2%}) |",
            f"| CPU time of the process | {cpu_iter:.3f} s | {statistics.mean(cpu):+.3f} s (SE "
            f"{se(cpu):.3f}) | {statistics.mean(cpu) / (K * cpu_iter):+.2%} (SE "
            f"{se(cpu) / (K * cpu_iter):.2%}) |", "",
            "The same snapshot written synchronously with no training running (median of 6): "
            f"{statistics.median(a[0] for a in alone):.3f} s wall, "
            f"{statistics.median(a[1] for a in alone):.3f} s CPU, which is "
            f"{statistics.median(a[1] for a in alone) / (K * cpu_iter):.2%} of K iterations.", "",
            f"Updating the 2 post-hoc EMAs every step took {updates['seconds'] / n_iter * 1e3:.0f}"
            f" ms per iteration ({updates['seconds'] / n_iter / per_iter:.1%} of an iteration; "
            "not part of the snapshot cost; see benchmarks/update_speed.py).", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--pairs", type=int, default=12, help="timing pairs (part 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="output/posthoc_bench")
    parser.add_argument("--out", default=str(HERE / "results" / "posthoc.md"))
    parser.add_argument("--parts", default="1,2,4")
    parser.add_argument("--keep", action="store_true", help="keep the snapshots in --work")
    parser.add_argument("--select", type=int, default=100,
                        help="images of the held-out selection split (part 5)")
    args = parser.parse_args(argv)
    from d2ema.app.data import register_datasets
    from d2ema.app.demo.run import choose_threads

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    threads, _ = choose_threads(None)
    torch.set_num_threads(threads or torch.get_num_threads())
    register_datasets(sizes={"shapes_val": args.val}, names=["shapes_train", "shapes_val"])
    parts = args.parts.split(",")
    lines = ["# Post-hoc EMA: reconstructions vs EMAs tracked directly", "",
             f"`benchmarks/posthoc.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
             .replace(" `", "`"),
             f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d')}).", ""]
    if "1" in parts:
        lines += synthetic(work)
    rows = []
    if "2" in parts:
        more, rows = shapes_run(args, work)
        lines += more
    if "4" in parts:
        lines += cost_run(args, work)
    if "5" in parts:
        register_select_set(args.select)
        lines += selection_run(args, work)
    if parts == ["5"] and Path(args.out).is_file():  # one section, into the existing report
        kept = Path(args.out).read_text().split("\n## 5. ")[0].rstrip("\n")
        section = "\n".join(lines[lines.index("## 5. Choosing the length in the run: on a "
                                              "held-out split vs on the test set"):])
        command = lines[2] + " " + lines[3]
        Path(args.out).write_text(f"{kept}\n\n{section}\nCommand: {command}\n")
    else:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if rows:
        from d2ema.app.plotting import plot_ap_vs_length

        plot_ap_vs_length([r for r in rows if r["kind"] != "single"],
                          Path(args.out).with_suffix(".png"),
                          title=f"shapes, {args.iters} iterations: AP against EMA length")
        (work / "rows.json").write_text(json.dumps(rows, indent=1))
    if not args.keep:
        for sub in work.glob("*"):
            if sub.is_dir():
                shutil.rmtree(sub)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
