"""``d2ema``: the command line.

Subcommands::

    d2ema demo   [--quick] [--dataset shapes|digits] [--iters N] [--output DIR] [--seed S]
                 [--decays 0.99,0.998] [--eval-period K] [--verbose] [KEY VALUE ...]
    d2ema train  --config-file CFG [--resume] [--eval-only] [--num-gpus N] [--num-machines M]
                 [--machine-rank R] [--dist-url URL] [KEY VALUE ... | key=value ...]
    d2ema export CHECKPOINT -o OUT.pth
    d2ema bench  [arguments of benchmarks/update_speed.py]

``train`` is detectron2's ``tools/train_net.py`` (YAML configs) and
``tools/lazyconfig_train_net.py`` (``.py`` LazyConfigs) with EMA: ``MODEL_EMA.*`` or
``train.model_ema.*``. The embedded datasets (``shapes_*``, ``digits_*``) are generated and
registered when a config names them.

A mistake in the input (unknown dataset, missing or unreadable config or checkpoint, a
checkpoint without EMA, an invalid ``MODEL_EMA`` value) prints one line on stderr saying what
and how to fix it, and exits with status 2; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "build_parser", "main"]

PROG = "d2ema"
EXIT_USAGE = 2


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [CLIError]
    for module, names in (
        ("d2ema.demo", ("DemoError",)),
        ("d2ema.export", ("ExportError",)),
        ("d2ema.d2.config", ("ConfigError",)),
        ("d2ema.data.registry", ("UnknownDatasetError",)),
        ("d2ema.ema", ("EMAStateError",)),
    ):
        mod = sys.modules.get(module)  # only what ran can have raised
        if mod is not None:
            types += [getattr(mod, n) for n in names]
    return tuple(types)


def _one_line(message: str) -> str:
    lines = [part.strip() for part in str(message).splitlines() if part.strip()]
    return "; ".join(lines) or "error"


# ----------------------------------------------------------------------------- parser
def _add_verbose(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite `d2ema --verbose <command>`.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show detectron2's log on the console and tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact, fast and safe EMA of model weights for detectron2.",
        epilog="Run 'd2ema <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="tracebacks of errors, detectron2's log on the console")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    demo = sub.add_parser(
        "demo", help="train a small RetinaNet on the CPU and compare raw vs EMA AP",
        description="Train a ResNet-18 FPN RetinaNet (128 px, from scratch) on an embedded "
        "dataset on the CPU with EMA; evaluate raw and EMA weights periodically; print a table "
        "and write a plot, TensorBoard events and a checkpoint. About 3-5 minutes on 2 cores "
        "(--quick: about 1 minute).",
    )
    demo.add_argument("--quick", action="store_true", help="a short smoke run (about 1 minute)")
    demo.add_argument("--dataset", default="shapes", help="shapes (default) or digits")
    demo.add_argument("--iters", type=int, default=None, help="training iterations")
    demo.add_argument("-o", "--output", default="output/d2ema_demo", metavar="DIR",
                      help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--decays", default=None,
                      help="comma-separated EMA decays to compare (default: 0.99,0.998; "
                      "--quick: 0.9,0.97)")
    demo.add_argument("--eval-period", type=int, default=None, metavar="K",
                      help="evaluate every K iterations (0: at the end only)")
    demo.add_argument("--threads", type=int, default=None, metavar="N",
                      help="CPU threads (default: one per core, or 1 when other jobs already "
                      "keep every core busy, which is faster then)")
    _add_verbose(demo)
    demo.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                      help="detectron2 config overrides, e.g. SOLVER.BASE_LR 0.0005")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train", help="detectron2's train_net.py with EMA (YAML or LazyConfig .py)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or --eval-only) a detectron2 model with EMA of its weights.\n"
        "YAML configs: MODEL_EMA.ENABLED True, MODEL_EMA.DECAY 0.9998, ...; LazyConfigs: "
        "train.model_ema.enabled=True, ...\n\nExamples:\n"
        "  d2ema train --config-file cfg.yaml MODEL_EMA.ENABLED True SOLVER.MAX_ITER 1000\n"
        "  d2ema train --config-file cfg.yaml --eval-only MODEL.WEIGHTS out/model_final.pth "
        "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY True\n"
        "  d2ema train --config-file cfg.py train.model_ema.enabled=True",
    )
    train.add_argument("--config-file", required=True, metavar="FILE",
                       help="YAML config, or a LazyConfig .py")
    train.add_argument("--resume", action="store_true",
                       help="resume from the last checkpoint of the output folder")
    train.add_argument("--eval-only", action="store_true", help="evaluate only")
    train.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine (default 1)")
    train.add_argument("--num-machines", type=int, default=1, help="number of machines")
    train.add_argument("--machine-rank", type=int, default=0, help="rank of this machine")
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    train.add_argument("--dist-url", default=f"tcp://127.0.0.1:{port}",
                       help="URL of the distributed process group ('auto': a free local port)")
    _add_verbose(train)
    train.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                       help="config overrides: 'KEY VALUE' pairs (YAML) or key=value (.py)")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser(
        "export", help="write a checkpoint whose weights are the EMA (for MODEL.WEIGHTS)",
        description="Write OUT: a detectron2 checkpoint whose 'model' holds the EMA weights of "
        "CHECKPOINT (its 'ema_state'), loadable by any detectron2 as MODEL.WEIGHTS. Written "
        "atomically.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="training checkpoint (.pth)")
    export.add_argument("-o", "--output", required=True, metavar="OUT.pth", help="file to write")
    _add_verbose(export)
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser(
        "bench", add_help=False, help="time EMA updates (runs benchmarks/update_speed.py)",
        description="Run benchmarks/update_speed.py of the source checkout; every argument is "
        "passed on ('d2ema bench --help' shows them).",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``d2ema`` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verbose = bool(getattr(args, "verbose", False))
    if not verbose:
        _quiet_warnings()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_error_types()):
            raise
        if verbose:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE


def _quiet_warnings() -> None:
    """Deprecation notices of torch/detectron2 internals are not the user's to act on."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in ("torch", "detectron2", "fvcore", "iopath", "pycocotools"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    options = DemoOptions(
        quick=args.quick, dataset=args.dataset, iters=args.iters, output=args.output,
        seed=args.seed, decays=args.decays, eval_period=args.eval_period,
        verbose=bool(getattr(args, "verbose", False)), opts=tuple(args.opts or ()),
        threads=args.threads,
    )
    result = run_demo(options)
    out = result.output_dir
    lines = [
        "",
        result.table(),
        "",
        f"plot:        {result.plot}",
        f"TensorBoard: tensorboard --logdir {out}   (scalars bbox/AP and ema_<decay>/bbox/AP)",
        f"results:     {result.results_json}",
        f"full log:    {out / 'log.txt'}",
    ]
    if result.checkpoint is not None:
        lines.append(f"checkpoint:  {result.checkpoint}   (EMA as plain weights: d2ema export "
                     f"{result.checkpoint} -o {out / 'model_ema.pth'})")
    lines.append(f"took {_duration(result.seconds)} (training {_duration(result.train_seconds)}, "
                 f"evaluation {_duration(result.eval_seconds)})")
    print("\n".join(lines), flush=True)
    return 0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ----------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_ema

    summary = export_ema(args.checkpoint, args.output)
    print(summary.describe())
    return 0


# ----------------------------------------------------------------------------- bench
def benchmark_script() -> Path | None:
    """``benchmarks/update_speed.py`` of the source checkout d2ema runs from, if any."""
    root = Path(__file__).resolve().parents[2]
    path = root / "benchmarks" / "update_speed.py"
    return path if path.is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    path = benchmark_script()
    if path is None:
        raise CLIError(
            "benchmarks/update_speed.py not found next to the installed package: 'd2ema bench' "
            "needs a source checkout installed with 'pip install -e .'"
        )
    spec = importlib.util.spec_from_file_location("d2ema_bench_update_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    if not callable(getattr(module, "main", None)):
        raise CLIError(f"{path} has no main(argv) function")
    saved_argv = sys.argv
    sys.argv = [f"{PROG} bench", *args.bench_args]  # its usage line reads "d2ema bench"
    try:
        return int(module.main(list(args.bench_args)) or 0)
    finally:
        sys.argv = saved_argv


# ----------------------------------------------------------------------------- train: configs
def _is_lazy(path: str) -> bool:
    return path.endswith(".py")


def _check_readable(path_text: str) -> Path:
    path = Path(path_text)
    if not path.exists():
        raise CLIError(f"config file {path} does not exist; pass an existing --config-file "
                       "(a YAML config or a LazyConfig .py)")
    if not path.is_file():
        raise CLIError(f"config file {path} is not a file; pass a YAML config or a .py")
    if path.suffix not in (".yaml", ".yml", ".py"):
        raise CLIError(f"config file {path} should end in .yaml, .yml (detectron2 config) or "
                       ".py (LazyConfig)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise CLIError(f"cannot read config file {path}: {e.strerror or e}") from e
    return path


def _reason(e: BaseException) -> str:
    text = _one_line(str(e)) if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_config(path_text: str, opts: Sequence[str] = ()):
    """The config of ``d2ema train``: yacs (``get_cfg`` + ``MODEL_EMA``) or a LazyConfig.

    Raises :class:`CLIError` for a missing, unreadable or invalid file or override, and
    :class:`~d2ema.d2.ConfigError` for an invalid EMA setting.
    """
    path = _check_readable(path_text)
    opts = list(opts or ())
    if _is_lazy(path_text):
        from detectron2.config import LazyConfig

        try:
            cfg = LazyConfig.load(str(path))
        except Exception as e:
            raise CLIError(f"cannot load LazyConfig {path}: {_reason(e)}") from e
        try:
            cfg = LazyConfig.apply_overrides(cfg, opts)
        except Exception as e:
            raise CLIError(f"invalid override in {' '.join(opts)!r}: {_reason(e)}; "
                           "LazyConfig overrides are key=value, e.g. train.max_iter=100") from e
        if "train" in cfg:
            _check_device(str(cfg.train.get("device", "cuda")), "train.device", "=")
            if "model_ema" in cfg.train:
                from .d2 import ema_settings

                ema_settings(cfg)
        return cfg

    import yaml
    from detectron2.config import get_cfg

    from .d2 import add_model_ema_configs, ema_settings

    cfg = get_cfg()
    add_model_ema_configs(cfg)
    try:
        cfg.merge_from_file(str(path))
    except yaml.YAMLError as e:
        raise CLIError(f"config file {path} is not valid YAML ({_one_line(str(e))})") from e
    except Exception as e:
        raise CLIError(f"cannot use config file {path}: {_reason(e)}") from e
    if len(opts) % 2:
        raise CLIError(f"config overrides must be KEY VALUE pairs; got {len(opts)} words: "
                       f"{' '.join(opts)}")
    try:
        cfg.merge_from_list(opts)
    except Exception as e:
        raise CLIError(f"invalid config override in {' '.join(opts)!r}: {_reason(e)}") from e
    _check_device(cfg.MODEL.DEVICE, "MODEL.DEVICE", " ")
    ema_settings(cfg)  # ConfigError names the key, the value and what is allowed
    return cfg


def _check_device(device: str, key: str, sep: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError(f"{key} is {device!r} but this machine has no CUDA device; "
                           f"train on the CPU with {key}{sep}cpu")


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict) or hasattr(node, "items"):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
        for value in node:
            yield from _strings(value)


def embedded_datasets(cfg) -> list[str]:
    """Names of d2ema's embedded datasets a config mentions."""
    from .data import DATASETS

    if hasattr(cfg, "DATASETS"):
        names = [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
    else:
        from omegaconf import OmegaConf

        names = list(_strings(OmegaConf.to_container(cfg, resolve=False)))
    return [n for n in dict.fromkeys(names) if n in DATASETS]


def register_embedded_datasets(cfg) -> list[str]:
    """Generate and register the embedded datasets the config names and detectron2 lacks."""
    from detectron2.data import DatasetCatalog

    from .data import register_datasets

    missing = [n for n in embedded_datasets(cfg) if n not in DatasetCatalog.list()]
    if missing:
        register_datasets(names=missing)
    return missing


def _check_weights(cfg, args) -> None:
    lazy = not hasattr(cfg, "MODEL")
    weights = cfg.train.get("init_checkpoint", "") if lazy else cfg.MODEL.WEIGHTS
    if not weights or "://" in str(weights) or args.resume or Path(weights).is_file():
        return
    key = "train.init_checkpoint" if lazy else "MODEL.WEIGHTS"
    example = f"{key}=output/model_final.pth" if lazy else f"{key} output/model_final.pth"
    raise CLIError(f"checkpoint {weights} ({key}) does not exist; pass an existing file, "
                   f"e.g. {example}")


def _check_datasets(cfg) -> None:
    from detectron2.data import DatasetCatalog

    from .data import DATASETS

    known = set(DatasetCatalog.list()) | set(DATASETS)
    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        if name not in known:
            raise CLIError(
                f"unknown dataset {name!r} in DATASETS; use an embedded one "
                f"({', '.join(DATASETS)}) or a detectron2 builtin (e.g. coco_2017_train, with "
                "its files under $DETECTRON2_DATASETS)"
            )


def _check_launch(args) -> None:
    world = args.num_gpus * args.num_machines
    if world > 1:
        import torch

        if args.num_gpus > torch.cuda.device_count():
            raise CLIError(f"--num-gpus {args.num_gpus}, but this machine has "
                           f"{torch.cuda.device_count()} CUDA devices; use --num-gpus "
                           f"{max(torch.cuda.device_count(), 1)}")


def _check_lazy_keys(cfg, args) -> None:
    needed = ["model", "dataloader", "train"]
    if not args.eval_only:
        needed += ["optimizer", "lr_multiplier"]
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise CLIError(
            f"LazyConfig {args.config_file} defines no {', '.join(missing)}; a training config "
            "needs model, dataloader (train, test, evaluator), optimizer, lr_multiplier and train "
            "(as detectron2's configs/common/*.py)"
        )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_file, args.opts)  # validate before spawning workers
    if _is_lazy(args.config_file):
        _check_lazy_keys(cfg, args)
    _check_weights(cfg, args)
    if hasattr(cfg, "DATASETS"):
        _check_datasets(cfg)
    _check_launch(args)
    from detectron2.engine import launch

    launch(
        train_worker,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    return 0


def train_worker(args: argparse.Namespace):
    """One training process (``detectron2.engine.launch`` runs it on each GPU)."""
    cfg = load_config(args.config_file, args.opts)
    if _is_lazy(args.config_file):
        return _lazy_main(cfg, args)
    return _yacs_main(cfg, args)


# ----------------------------------------------------------------------------- train: yacs
@functools.cache
def trainer_class():
    """``EMATrainer`` with ``build_evaluator`` of tools/train_net.py (COCO without ``_C``)."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import (
        COCOEvaluator,
        DatasetEvaluators,
        LVISEvaluator,
        PascalVOCDetectionEvaluator,
        SemSegEvaluator,
    )

    from .d2 import EMATrainer

    class Trainer(EMATrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            if output_folder is None:
                output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
            kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
            evaluators = []
            if kind in ("sem_seg", "coco_panoptic_seg"):
                evaluators.append(SemSegEvaluator(dataset_name, distributed=True,
                                                  output_dir=output_folder))
            if kind in ("coco", "coco_panoptic_seg"):
                evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder,
                                                use_fast_impl=_has_compiled_ops()))
            if kind == "lvis":
                return LVISEvaluator(dataset_name, output_dir=output_folder)
            if kind == "pascal_voc":
                return PascalVOCDetectionEvaluator(dataset_name)
            if not evaluators:
                raise NotImplementedError(
                    f"no evaluator for dataset {dataset_name} of evaluator_type {kind!r}"
                )
            return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    return Trainer


def _has_compiled_ops() -> bool:
    import detectron2._C as compiled

    return not getattr(compiled, "D2EMA_STUB", False)


def _say(message: str) -> None:
    from detectron2.utils import comm

    if comm.is_main_process():
        print(f"[d2ema train] {message}", flush=True)


def _summary(results: Any) -> str:
    from detectron2.evaluation.testing import flatten_results_dict

    flat = flatten_results_dict(dict(results)) if results else {}
    keys = [k for k in flat if k.rsplit("/", 1)[-1] in ("AP", "AP50", "AP75", "mIoU")]
    if not keys:
        return json.dumps({k: str(v) for k, v in flat.items()})
    parts = [f"{k}={float(flat[k]):.2f}" for k in keys]
    note = " (nan: no detections)" if any(math.isnan(float(flat[k])) for k in keys) else ""
    return ", ".join(parts) + note


def _yacs_main(cfg, args):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import default_setup
    from detectron2.evaluation import verify_results
    from detectron2.utils import comm

    from .d2 import EMACheckpointer, get_model_ema

    cfg.freeze()
    default_setup(cfg, args)
    register_embedded_datasets(cfg)
    trainer_cls = trainer_class()
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        ema = get_model_ema(model)
        if ema is not None:
            checkpointer = EMACheckpointer(model, cfg.OUTPUT_DIR, ema=ema)
        else:
            checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        # load(), not resume_or_load(resume=False): the latter loads the model only, not the EMA
        path = cfg.MODEL.WEIGHTS
        if args.resume and checkpointer.has_checkpoint():
            path = checkpointer.get_checkpoint_file()
        checkpointer.load(path)
        use_ema = ema is not None and cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY
        if use_ema and not checkpointer.ema_loaded:
            logging.getLogger(__name__).warning(
                "the checkpoint has no EMA ('ema_state'): the 'EMA' results are those of its "
                "raw weights"
            )
        results = trainer_cls.test_eval_only(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        _say(f"evaluation results: {_summary(results)}")
        return results
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    if results:
        _say(f"final evaluation: {_summary(results)}")
    _say(f"done; checkpoints in {cfg.OUTPUT_DIR}")
    return results


# ----------------------------------------------------------------------------- train: lazy
def _lazy_test(cfg, model, prefix: str = "") -> dict[str, Any]:
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(ret)
    return {f"{prefix}{k}": v for k, v in (ret or {}).items()}


def _lazy_do_test(cfg, model) -> dict[str, Any]:
    """Raw weights, then (if EMA is on) the EMA weights under ``ema/`` keys."""
    from . import compat
    from .d2 import ema_settings

    ret = _lazy_test(cfg, model)
    if ema_settings(cfg).enabled:
        with compat.apply_model_ema_and_restore(model):
            ret.update(_lazy_test(cfg, model, prefix="ema/"))
    return ret


def _lazy_main(cfg, args):
    """tools/lazyconfig_train_net.py with the seed's / detrex's EMA calls (``d2ema.compat``)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import instantiate
    from detectron2.engine import (
        AMPTrainer,
        SimpleTrainer,
        create_ddp_model,
        default_setup,
        default_writers,
        hooks,
    )
    from detectron2.utils import comm

    from . import compat
    from .d2 import ema_settings

    default_setup(cfg, args)
    register_embedded_datasets(cfg)
    settings = ema_settings(cfg)
    train = cfg.train
    device = train.get("device", "cuda")
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(device)
        model = create_ddp_model(model)
        compat.may_build_model_ema(cfg, model)
        DetectionCheckpointer(model, **compat.may_get_ema_checkpointer(cfg, model)).load(
            train.init_checkpoint
        )
        if settings.enabled and settings.use_ema_weights_for_eval_only:
            if not compat.get_model_ema_state(model).has_inited():
                logging.getLogger(__name__).warning(
                    "the checkpoint has no EMA ('ema_state'): evaluating its raw weights"
                )
            with compat.apply_model_ema_and_restore(model):
                results = _lazy_test(cfg, model, prefix="ema/")
        else:
            results = _lazy_test(cfg, model)
        _say(f"evaluation results: {_summary(results)}")
        return results

    model = instantiate(cfg.model)
    model.to(device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **train.get("ddp", {}))
    compat.may_build_model_ema(cfg, model)
    amp = train.get("amp", {}).get("enabled", False)
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, loader, optimizer)
    checkpointer = DetectionCheckpointer(
        model, train.output_dir, trainer=trainer, **compat.may_get_ema_checkpointer(cfg, model)
    )
    last_results: dict[str, Any] = {}

    def evaluate():
        last_results.clear()
        last_results.update(_lazy_do_test(cfg, model))
        return last_results

    checkpoint_args = dict(train.get("checkpointer", {"period": 5000}))
    trainer.register_hooks([
        hooks.IterationTimer(),
        compat.EMAHook(cfg, model) if settings.enabled else None,
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **checkpoint_args)
        if comm.is_main_process() else None,
        hooks.EvalHook(train.get("eval_period", 0), evaluate),
        hooks.PeriodicWriter(default_writers(train.output_dir, train.max_iter),
                             period=train.get("log_period", 20))
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, train.max_iter)
    if last_results:
        _say(f"final evaluation: {_summary(last_results)}")
    _say(f"done; checkpoints in {train.output_dir}")
    return last_results


if __name__ == "__main__":
    sys.exit(main())
