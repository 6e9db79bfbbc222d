"""``d2ema demo``: train a small detector on the CPU and watch EMA weights beat the raw ones.

A RetinaNet (ResNet-18 FPN, 128 px images, from scratch) trains on an embedded dataset
(``shapes`` or ``digits``, generated locally, no download) with :class:`~d2ema.d2.EMATrainer`.
Besides the trainer's own EMA (the first decay), a :class:`MultiEMAHook` keeps one more EMA per
extra decay, so a couple of decays are compared side by side in one run. At every evaluation
the raw weights and each EMA are scored with COCO AP on the validation split.

Outputs, in the output folder: ``ap_curves.png`` (AP over iterations, raw vs each EMA),
TensorBoard events (scalars ``bbox/AP`` for the raw weights and ``ema_<decay>/bbox/AP`` for each
EMA), ``results.json`` (every evaluation), ``log.txt`` (detectron2's full log, which the console
leaves out) and ``model_final.pth`` (raw weights + the first EMA, for ``d2ema export``).

Measured on 2 CPU cores shared with other jobs (load ~4, so 1 training thread; seed 0, shapes):
the default run (400 iterations of batch 8, AdamW at a constant LR after warm-up, evaluations
every 100 on 60 validation images) took 4m53s and ended at box AP 12.0 for the raw weights,
16.1 for EMA 0.99 and 16.6 for EMA 0.998. ``--iters 1000`` ends at 42.7 raw, 50.0 EMA 0.99 and
35.5 EMA 0.998 (whose ~500-iteration window lags while AP still rises). ``--quick`` (120
iterations, 40 validation images, decays 0.9 and 0.97) runs every step in 1m15s there. The
thread count changes float rounding, so numbers vary slightly with it (``--threads`` fixes it).

Example::

    from d2ema.demo import DemoOptions, run_demo
    result = run_demo(DemoOptions(quick=True, output="output/demo"))
    print(result.table())
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from detectron2.engine import HookBase, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .d2 import EMAHook, EMATrainer, ema_settings, get_model_ema
from .d2.trainer import evaluate_with_ema
from .ema import EMA

__all__ = [
    "DATASET_FAMILIES",
    "PRESETS",
    "DemoError",
    "DemoOptions",
    "DemoPreset",
    "DemoResult",
    "DemoTrainer",
    "MultiEMAHook",
    "demo_config",
    "parse_decays",
    "run_demo",
]

DATASET_FAMILIES = ("shapes", "digits")
RAW = "raw"
METRICS = ("AP", "AP50", "AP75")
_LOGGERS = ("detectron2", "fvcore", "d2ema")


class DemoError(ValueError):
    """A demo option that cannot work; the message says which and what is allowed."""


@dataclasses.dataclass(frozen=True)
class DemoPreset:
    """Schedule of a demo run (sized for 2 CPU cores; see the README for measured times)."""

    iters: int
    eval_period: int
    batch_size: int
    base_lr: float
    weight_decay: float
    warmup_iters: int
    tau: float  # yolov5 ramp of the EMA decays, in iterations
    decays: tuple[float, ...]  # compared side by side (horizons ~1/(1-d) suit the run length)
    train_images: int | None  # None: the dataset's default size
    val_images: int | None


# AdamW at a constant LR after warm-up: from scratch on 2 cores it learns several times faster
# than SGD (measured: box AP ~46 vs ~16 after 1000 iterations on shapes), and its weights keep
# moving, the regime where an EMA helps.
PRESETS = {
    # Training speed, batch 8: 0.25-0.3 s/iteration on 2 idle cores (2 threads); on 2 cores
    # busy with other jobs 0.65-1.2 s/iteration with 1 thread (choose_threads), 2-4 s with 2.
    # 400 iterations and 4 small evaluations: 4m53s on busy cores (load ~4). `--iters 1000`
    # ends at raw 42.7 vs EMA 0.99 50.0 AP: benchmarks/results/ema_quality.md.
    "default": DemoPreset(
        iters=400, eval_period=100, batch_size=8, base_lr=1e-3, weight_decay=0.05,
        warmup_iters=100, tau=100.0, decays=(0.99, 0.998), train_images=None, val_images=60,
    ),
    "quick": DemoPreset(
        iters=120, eval_period=60, batch_size=8, base_lr=1e-3, weight_decay=0.05,
        warmup_iters=40, tau=20.0, decays=(0.9, 0.97), train_images=None, val_images=40,
    ),
}


@dataclasses.dataclass
class DemoOptions:
    """What ``d2ema demo`` takes on its command line."""

    quick: bool = False
    dataset: str = "shapes"
    iters: int | None = None  # default: the preset's
    output: str | os.PathLike[str] = "output/d2ema_demo"
    seed: int = 0
    decays: str | Sequence[float] | None = None  # default: the preset's
    eval_period: int | None = None  # default: the preset's
    verbose: bool = False
    opts: Sequence[str] = ()  # extra "KEY VALUE" config overrides
    threads: int | None = None  # torch CPU threads (default: torch's, one per core)


def parse_decays(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.99,0.998"`` -> ``(0.99, 0.998)``; each decay in (0, 1), no duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    decays = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            d = float(item)
        except ValueError:
            raise DemoError(
                f"--decays: {item!r} is not a number; e.g. --decays 0.99,0.998"
            ) from None
        if not 0.0 < d < 1.0:
            raise DemoError(f"--decays: {d!r} is not in (0, 1); e.g. --decays 0.99,0.998")
        if d not in decays:
            decays.append(d)
    if not decays:
        raise DemoError("--decays: give at least one decay, e.g. --decays 0.99,0.998")
    return tuple(decays)


def ema_label(decay: float) -> str:
    return f"EMA {decay:g}"


def ema_prefix(decay: float) -> str:
    """Result/TensorBoard prefix of the EMA with ``decay``: ``ema_0.99`` (``ema_0.99/bbox/AP``)."""
    return f"ema_{decay:g}"


# ----------------------------------------------------------------------------- config
def _check(options: DemoOptions) -> tuple[DemoPreset, tuple[float, ...]]:
    if options.dataset not in DATASET_FAMILIES:
        raise DemoError(
            f"unknown dataset {options.dataset!r}; choose one of {', '.join(DATASET_FAMILIES)} "
            "(--dataset shapes)"
        )
    preset = PRESETS["quick" if options.quick else "default"]
    iters = preset.iters if options.iters is None else options.iters
    if iters < 1:
        raise DemoError(f"--iters {iters}: give a number of iterations >= 1")
    period = options.eval_period
    if period is None:
        period = preset.eval_period if options.iters is None else max(1, iters // 5)
    if period < 0:
        raise DemoError(f"--eval-period {period}: give 0 (evaluate at the end only) or more")
    if options.threads is not None and options.threads < 1:
        raise DemoError(f"--threads {options.threads}: give a number of threads >= 1")
    warmup = min(preset.warmup_iters, max(iters // 4, 1))
    tau = preset.tau if options.iters is None else max(iters / 10.0, 1.0)
    decays = preset.decays if options.decays is None else parse_decays(options.decays)
    preset = dataclasses.replace(
        preset, iters=iters, eval_period=period, warmup_iters=warmup, tau=tau, decays=decays
    )
    return preset, decays


def demo_config(options: DemoOptions, preset: DemoPreset | None = None):
    """The detectron2 config of the demo (datasets must be registered to train it)."""
    from .d2.model_configs import tiny_detector_config
    from .data import get_dataset_spec

    checked, decays = _check(options)
    preset = preset or checked
    train, val = f"{options.dataset}_train", f"{options.dataset}_val"
    cfg = tiny_detector_config(
        "retinanet", num_classes=len(get_dataset_spec(train).classes), image_size=128
    )
    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (val,)
    cfg.SOLVER.IMS_PER_BATCH = preset.batch_size
    cfg.SOLVER.BASE_LR = preset.base_lr  # AdamW: see DemoTrainer.build_optimizer
    cfg.SOLVER.WEIGHT_DECAY = preset.weight_decay
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.WARMUP_ITERS = preset.warmup_iters
    cfg.SOLVER.STEPS = ()  # constant LR after warm-up: the regime where EMA helps most
    cfg.SOLVER.MAX_ITER = preset.iters
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 5.0
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9  # only model_final.pth
    cfg.TEST.EVAL_PERIOD = preset.eval_period
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.DECAY = decays[0]
    cfg.MODEL_EMA.SCHEDULE = "yolov5"
    cfg.MODEL_EMA.TAU = float(preset.tau)
    cfg.MODEL_EMA.EVAL_BOTH = True
    cfg.OUTPUT_DIR = os.fspath(options.output)
    cfg.SEED = int(options.seed)
    if options.opts:
        try:
            cfg.merge_from_list(list(options.opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise DemoError(f"config override {' '.join(options.opts)!r}: {e}") from e
    return cfg


# ----------------------------------------------------------------------------- hooks, trainer
class MultiEMAHook(HookBase):
    """Keeps several :class:`~d2ema.EMA` of one model, keyed by label, up to date.

    Like :class:`d2ema.d2.EMAHook`: each EMA restarts from the model's weights before training
    and is updated after every optimizer step with the trainer's iteration as its step counter.
    Evaluate one with ``with ema.swapped(model): ...``.
    """

    def __init__(self, emas: dict[str, Any], model):
        self.emas = dict(emas)
        self.model = model

    def before_train(self) -> None:
        for ema in self.emas.values():
            ema.reset(self.model)

    def after_step(self) -> None:
        step = self.trainer.iter + 1
        for ema in self.emas.values():
            ema.update(self.model, step=step)


class _ProgressHook(HookBase):
    """Concise progress lines: iteration, loss, speed, ETA (training + remaining evals)."""

    def __init__(self, run: _Run, period: int):
        self.run, self.period = run, period

    def before_train(self) -> None:
        self.run.train_started = time.perf_counter()

    def after_step(self) -> None:
        it = self.trainer.iter + 1
        if it % self.period and it != self.trainer.max_iter:
            return
        storage = self.trainer.storage
        loss = storage.history("total_loss").median(min(self.period, 20))
        elapsed = time.perf_counter() - self.run.train_started - self.run.eval_seconds
        per_iter = elapsed / max(it - self.trainer.start_iter, 1)
        max_iter = self.trainer.max_iter
        eta = (max_iter - it) * per_iter + self.run.remaining_evals(it) * self.run.eval_estimate()
        self.run.say(
            f"iter {it:>{len(str(max_iter))}}/{max_iter}  loss {loss:.3f}  "
            f"{per_iter:.2f} s/iter  ETA {_duration(eta)}{self.run.latest_ap()}"
        )


def _renamed(results: dict[str, Any], decay: float) -> dict[str, Any]:
    """EMATrainer's ``ema/...`` keys -> ``ema_<decay>/...``."""
    prefix = ema_prefix(decay) + "/"
    return {(prefix + k[4:] if k.startswith("ema/") else k): v for k, v in results.items()}


class DemoTrainer(EMATrainer):
    """:class:`~d2ema.d2.EMATrainer` (its EMA: the first decay) + one more EMA per extra decay
    (:class:`MultiEMAHook`), all evaluated at each evaluation; concise progress lines."""

    def __init__(self, cfg, run: _Run):
        self.run = run
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # detectron2 v0.6's DefaultTrainer has none; the fast COCO evaluator needs _C.
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW (detectron2 v0.6 builds SGD only), with the config's gradient clipping."""
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        )
        optimizer = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return optimizer(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    def build_hooks(self):
        run, model = self.run, self.model
        settings = ema_settings(self.cfg)
        self.emas = {run.decays[0]: get_model_ema(model)}
        for decay in run.decays[1:]:
            schedule = dataclasses.replace(settings.schedule, decay=decay)
            kwargs = {**settings.ema_kwargs(), "decay": decay, "schedule": schedule}
            self.emas[decay] = EMA(model, **kwargs)
        extra = {ema_label(d): ema for d, ema in self.emas.items() if d != run.decays[0]}
        ret = super().build_hooks()
        main = next(i for i, h in enumerate(ret) if isinstance(h, EMAHook))
        ret.insert(main + 1, MultiEMAHook(extra, model))
        period = self.cfg.TEST.EVAL_PERIOD
        ret = [hooks.EvalHook(period, self.evaluate_all) if isinstance(h, hooks.EvalHook) else h
               for h in ret]
        ret.append(_ProgressHook(run, run.print_period))
        return ret

    def evaluate_all(self) -> dict[str, Any]:
        """Raw weights and every EMA: ``{"bbox": ..., "ema_0.99/bbox": ..., ...}``."""
        started = time.perf_counter()
        cfg, model, decays = self.cfg, self.model, self.run.decays
        with self.run.quiet_stdout():
            results = _renamed(self.test(cfg, model), decays[0])  # raw + the trainer's EMA
            for decay in decays[1:]:
                ema_results = evaluate_with_ema(
                    type(self), cfg, model, raw=False, ema=self.emas[decay]
                )
                results.update(_renamed(ema_results, decay))
        self.run.record(min(self.iter + 1, self.max_iter), results,
                        time.perf_counter() - started)
        self._last_eval_results = results
        return results


# ----------------------------------------------------------------------------- the run
def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _number(x: Any) -> float:
    """A COCO AP in %; detectron2 reports NaN when the model made no detections: that is 0."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(x) else x


class _Run:
    """State shared by the trainer's hooks: printing, eval timing, the history of results."""

    def __init__(self, options: DemoOptions, preset: DemoPreset, decays, stream: TextIO,
                 num_val: int):
        self.options, self.preset, self.decays, self.stream = options, preset, decays, stream
        self.num_val = num_val
        self.labels = [RAW] + [ema_label(d) for d in decays]
        self.history: list[dict[str, Any]] = []
        self.eval_seconds = 0.0
        self.eval_durations: list[float] = []
        self.train_started = time.perf_counter()
        self.print_period = _print_period(preset.iters)

    def say(self, line: str) -> None:
        print(f"[d2ema demo] {line}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def quiet_stdout(self) -> Iterator[None]:
        """pycocotools prints its summaries; keep them out of the console (not of log.txt)."""
        if self.options.verbose:
            yield
            return
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            yield
        logging.getLogger("d2ema.demo").info("COCO evaluation output:\n%s", buffer.getvalue())

    def eval_points(self) -> list[int]:
        p, n = self.preset.eval_period, self.preset.iters
        points = list(range(p, n, p)) if p > 0 else []
        return [*points, n]

    def remaining_evals(self, it: int) -> int:
        return sum(1 for p in self.eval_points() if p > it)

    def eval_estimate(self) -> float:
        if self.eval_durations:
            return self.eval_durations[-1]
        return 0.06 * self.num_val * len(self.labels)  # ~2 cores, until measured

    def record(self, it: int, results: dict[str, Any], seconds: float) -> None:
        self.eval_seconds += seconds
        self.eval_durations.append(seconds)
        sources = {RAW: "bbox", **{ema_label(d): f"{ema_prefix(d)}/bbox" for d in self.decays}}
        for label, key in sources.items():
            box = results.get(key, {})
            self.history.append(
                {"iter": it, "weights": label, **{m: _number(box.get(m)) for m in METRICS}}
            )
        self.say(f"eval at iter {it}: {self._ap_text(it)}  ({_duration(seconds)})")

    def _ap_text(self, it: int) -> str:
        rows = [r for r in self.history if r["iter"] == it]
        return "  ".join(f"{r['weights']} AP {r['AP']:.1f}" for r in rows)

    def latest_ap(self) -> str:
        if not self.history:
            return ""
        it = self.history[-1]["iter"]
        return f"  | AP@{it}: " + ", ".join(
            f"{r['weights']} {r['AP']:.1f}" for r in self.history if r["iter"] == it
        )


def _print_period(iters: int) -> int:
    raw = max(iters / 10, 1)
    for nice in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        if nice >= raw:
            return nice
    return int(raw)


@dataclasses.dataclass
class DemoResult:
    """What a demo run produced: every evaluation, and where its files are."""

    history: list[dict[str, Any]]
    labels: list[str]
    output_dir: Path
    plot: Path
    results_json: Path
    checkpoint: Path | None
    seconds: float
    train_seconds: float
    eval_seconds: float
    settings: dict[str, Any]

    def final(self) -> dict[str, dict[str, float]]:
        """Metrics of each weights at the last evaluation."""
        last = max(r["iter"] for r in self.history)
        return {r["weights"]: r for r in self.history if r["iter"] == last}

    def best(self) -> dict[str, tuple[float, int]]:
        """Best AP of each weights over the run, and its iteration."""
        out: dict[str, tuple[float, int]] = {}
        for r in self.history:
            ap = r["AP"]
            if not math.isnan(ap) and (r["weights"] not in out or ap > out[r["weights"]][0]):
                out[r["weights"]] = (ap, r["iter"])
        return out

    def tensorboard_files(self) -> list[Path]:
        return sorted(self.output_dir.glob("events.out.tfevents.*"))

    def table(self) -> str:
        """Raw vs each EMA at the final evaluation (COCO AP, %), plus each one's best AP."""
        final, best = self.final(), self.best()
        last = max(r["iter"] for r in self.history)
        raw_ap = final.get(RAW, {}).get("AP", float("nan"))
        header = (f"{'weights':<12}{'AP':>7}{'AP50':>7}{'AP75':>7}{'vs raw':>8}   "
                  f"best AP (iter)")
        lines = [f"COCO box AP (%) on the validation set at iteration {last}:", header,
                 "-" * len(header)]
        for label in self.labels:
            row = final.get(label)
            if row is None:
                continue
            gain = "" if label == RAW else f"{row['AP'] - raw_ap:+.1f}"
            b_ap, b_it = best.get(label, (float("nan"), 0))
            lines.append(
                f"{label:<12}{row['AP']:>7.1f}{row['AP50']:>7.1f}{row['AP75']:>7.1f}"
                f"{gain:>8}   {b_ap:.1f} ({b_it})"
            )
        decays = self.settings.get("decays", [])
        if decays:
            spans = ", ".join(f"{d:g}: ~{round(1 / (1 - d))}" for d in decays)
            lines.append(
                f"An EMA with decay d averages about the last 1/(1-d) iterations ({spans} of "
                f"{last}); one that spans much of a run lags while AP still rises."
            )
        return "\n".join(lines)


@contextlib.contextmanager
def _console_logging(output_dir: Path, verbose: bool, stream: TextIO) -> Iterator[None]:
    """detectron2/fvcore/d2ema logs: everything to ``log.txt``, warnings (all if verbose) to
    the console. Restores the loggers afterwards."""
    formatter = logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S")
    file_handler = logging.FileHandler(output_dir / "log.txt", mode="a")
    file_handler.setFormatter(formatter)
    console = logging.StreamHandler(stream)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(file_handler)
        logger.addHandler(console)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.removeHandler(file_handler)
            logger.removeHandler(console)
            for h in handlers:
                logger.addHandler(h)
            logger.setLevel(level)
            logger.propagate = propagate
        file_handler.close()


def choose_threads(requested: int | None) -> tuple[int | None, str]:
    """CPU threads for training, and why. Default: torch's (one per core), but 1 thread when
    other jobs already keep every core busy: then torch's spinning OpenMP threads wait on each
    other (measured on 2 busy cores: 4 s/iteration with 2 threads, 0.8 s with 1)."""
    if requested is not None:
        return requested, ""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None, ""
    if cores > 1 and load >= cores:
        return 1, (f"the machine is busy (load {load:.1f} on {cores} cores): training on 1 CPU "
                   f"thread, which is faster then (--threads {cores} to override)")
    return None, ""


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_demo(options: DemoOptions, stream: TextIO | None = None) -> DemoResult:
    """Train, evaluate and plot as described in the module docstring; print progress."""
    stream = stream or sys.stdout
    preset, decays = _check(options)
    started = time.perf_counter()
    output_dir = Path(options.output).expanduser()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create the output folder {output_dir}: {e.strerror}") from e
    cfg = demo_config(dataclasses.replace(options, output=str(output_dir)), preset)

    threads, why = choose_threads(options.threads)
    with _console_logging(output_dir, options.verbose, stream), _threads(threads):
        from detectron2.utils.env import seed_all_rng

        from .data import cache_root, get_dataset_spec, register_datasets

        train, val = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]
        sizes = {n: s for n, s in ((train, preset.train_images), (val, preset.val_images)) if s}
        n_train = sizes.get(train) or get_dataset_spec(train).num_images
        n_val = sizes.get(val) or get_dataset_spec(val).num_images
        run = _Run(options, preset, decays, stream, n_val)
        run.say(f"datasets: {train} ({n_train} images), {val} ({n_val} images), "
                f"cached in {cache_root()}")
        t0 = time.perf_counter()
        register_datasets(sizes=sizes, names=[train, val])
        run.say(f"datasets ready in {_duration(time.perf_counter() - t0)}")
        if why:
            run.say(why)
        run.say(
            f"training RetinaNet R18-FPN (128 px, from scratch) on {torch.get_num_threads()} "
            f"CPU thread(s): {preset.iters} iterations, batch {cfg.SOLVER.IMS_PER_BATCH}, "
            f"AdamW lr {cfg.SOLVER.BASE_LR:g}; EMA decays {', '.join(f'{d:g}' for d in decays)} "
            f"(yolov5 ramp, tau {cfg.MODEL_EMA.TAU:g}); evaluating "
            + (f"every {preset.eval_period} iterations" if preset.eval_period else "at the end")
        )
        seed_all_rng(int(cfg.SEED))
        cfg.freeze()
        trainer = DemoTrainer(cfg, run)
        trainer.resume_or_load(resume=False)
        t_train = time.perf_counter()
        trainer.train()
        train_and_eval = time.perf_counter() - t_train

        from .plotting import plot_ap_curves

        plot = plot_ap_curves(
            run.history, output_dir / "ap_curves.png",
            title=f"d2ema demo: RetinaNet R18-FPN on {options.dataset} (seed {options.seed})",
            raw_label=RAW,
        )
    checkpoint = output_dir / "model_final.pth"
    result = DemoResult(
        history=run.history,
        labels=run.labels,
        output_dir=output_dir,
        plot=Path(plot),
        results_json=output_dir / "results.json",
        checkpoint=checkpoint if checkpoint.is_file() else None,
        seconds=time.perf_counter() - started,
        train_seconds=train_and_eval - run.eval_seconds,
        eval_seconds=run.eval_seconds,
        settings={**dataclasses.asdict(preset), "decays": list(decays),
                  "dataset": options.dataset, "seed": options.seed},
    )
    _write_json(result)
    return result


def _write_json(result: DemoResult) -> None:
    data = {
        "settings": result.settings,
        "history": result.history,
        "seconds": {"total": result.seconds, "train": result.train_seconds,
                    "eval": result.eval_seconds},
    }
    tmp = result.results_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, result.results_json)
