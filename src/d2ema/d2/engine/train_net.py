"""What ``d2ema train`` runs: detectron2's ``tools/train_net.py`` (YAML) and
``tools/lazyconfig_train_net.py`` (LazyConfig ``.py``) with EMA.

Both config systems go through the same pieces of this layer: `build_model_ema`
attaches the EMA after the model is built (before the optimizer and DDP), an
`EMACheckpointer` saves and checks it, an
`EMAUpdateHook` updates it
after every optimizer step, and `evaluate_with_ema` scores the raw and the EMA
weights. Settings come from ``MODEL_EMA.*`` or ``train.model_ema.*``.

Every mistake in the input (a missing or unreadable config, a bad override, an unknown dataset,
a missing checkpoint) raises a `D2EMAError` *before* any worker starts, with
a message that names the problem and the fix.

``args.dataset`` (``--dataset NAME=ANNOTATIONS.json:IMAGE_DIR``) goes into the config, so its
``config.yaml`` resumes the run (`d2ema.d2.data.datasets`). A config is loaded once per
process,
as in detectron2's tools (a LazyConfig may register its own data with plain detectron2).

The caller may pass ``prepare(cfg)``, run in every worker before training (e.g. to register
datasets), and ``known_datasets``, names it will provide; both must be picklable (module-level
functions) because ``launch`` may start new processes.

Example::

    args = argparse.Namespace(config_file="cfg.yaml", opts=[], resume=False, eval_only=False,
                              num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto")
    train_main(args)

What ``d2ema train`` is given is checked before any process starts: which config system a
file is, whether it can be read, whether its checkpoint exists, whether a LazyConfig has what a
training needs (`check_readable`, `check_weights`, `check_lazy_keys`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from d2ema.d2.checkpoint.checkpointers import (
    AtomicCheckpointer,
    EMACheckpointer,
    NoEMACheckpointer,
    check_resume_keeps_ema,
)
from d2ema.d2.config import settings as config_settings
from d2ema.d2.config.keys import core_words_named
from d2ema.d2.config.saved import check_saved_config, is_run_config, load_saved_lazy
from d2ema.d2.config.settings import EMASettings, add_model_ema_configs, check_device
from d2ema.d2.config.view import ConfigView, is_lazy
from d2ema.d2.config.yacs_numbers import integers_for_floats
from d2ema.d2.data.datasets import (
    add_dataset_config,
    add_datasets_to_config,
    check_datasets_known,
    check_datasets_used,
    register_config_datasets,
)
from d2ema.d2.engine.build import build_model_ema, check_posthoc_space, settings_given
from d2ema.d2.engine.hooks import EMAUpdateHook
from d2ema.d2.engine.run_folder import (
    check_output_dir,
    disk_full_as_error,
    new_eval_dir,
    output_dir,
    run_dir,
    run_lock,
    setup_run,
)
from d2ema.d2.engine.trainer import EMATrainer
from d2ema.d2.evaluation.evaluator import (
    adapt_evaluator,
    evaluate_extra_emas,
    evaluate_with_ema,
    python_coco_eval,
)
from d2ema.d2.evaluation.select import check_selection
from d2ema.errors import D2EMAError, UsageError, one_line

__all__ = [
    "check_lazy_keys",
    "check_readable",
    "check_weights",
    "is_lazy",
    "load_config",
    "load_run",
    "train_main",
    "train_worker",
    "unknown_key_hint",
]


logger = logging.getLogger(__name__)


Prepare = Callable[[Any], Any]


# ----------------------------------------------------------------------------- configs
def _reason(e: BaseException) -> str:
    text = one_line(str(e)) if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_config(path_text: str, opts: Sequence[str] = (), datasets: Sequence[str] = ()):
    """The config of ``d2ema train``: yacs (``get_cfg`` + ``MODEL_EMA``) or a LazyConfig, with
    ``datasets`` (``NAME=ANNOTATIONS.json:IMAGE_DIR``) added to its list of COCO datasets; its
    EMA settings checked (`load_run` returns them too).

    Raises `UsageError` for a missing, unreadable or invalid file or override,
    `ConfigError` for an invalid EMA setting and
    `DatasetError` for a malformed dataset or missing dataset files.
    """
    return load_run(path_text, opts, datasets)[0]


def load_run(path_text: str, opts: Sequence[str] = (),
             datasets: Sequence[str] = ()) -> tuple[Any, EMASettings | None]:
    """`load_config`, and the EMA settings read from it: once for the whole command, then
    handed on (None for a LazyConfig without ``train``, which `check_lazy_keys` refuses).
    """
    path = check_readable(path_text)
    if is_run_config(path):  # a run folder's saved config is data, never code
        check_saved_config(path)
    opts = list(opts or ())
    if is_lazy(path_text):
        from detectron2.config import LazyConfig

        try:  # a run's saved config.yaml: built from checked data, never by detectron2's loader
            cfg = load_saved_lazy(path) if is_run_config(path) else LazyConfig.load(str(path))
        except D2EMAError:
            raise
        except Exception as e:
            raise UsageError(f"cannot load LazyConfig {path}: {_reason(e)}") from e
        try:
            cfg = LazyConfig.apply_overrides(cfg, opts)
        except Exception as e:
            raise UsageError(f"invalid override in {' '.join(opts)!r}: {_reason(e)}; "
                             "LazyConfig overrides are key=value, e.g. train.max_iter=100") from e
        if "train" not in cfg:
            return cfg, None
        view = ConfigView.of(cfg)
        check_device(view.name("device"), view.device, "=")
        settings = config_settings.ema_settings(cfg)
        add_datasets_to_config(cfg, datasets)
        return cfg, settings

    import yaml
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_model_ema_configs(cfg)
    add_dataset_config(cfg)
    try:
        with integers_for_floats():  # MODEL_EMA.TAU 5, as people write it
            cfg.merge_from_file(str(path))
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML ({one_line(str(e))})") from e
    except Exception as e:
        raise UsageError(f"cannot use config file {path}: {_reason(e)}"
                         f"{unknown_key_hint(cfg, e)}") from e
    if len(opts) % 2:
        raise UsageError(f"config overrides must be KEY VALUE pairs; got {len(opts)} words: "
                         f"{' '.join(opts)}")
    try:
        with integers_for_floats():
            cfg.merge_from_list(opts)
    except Exception as e:
        raise UsageError(f"invalid config override in {' '.join(opts)!r}: {_reason(e)}"
                         f"{unknown_key_hint(cfg, e)}") from e
    check_device("MODEL.DEVICE", cfg.MODEL.DEVICE, " ")
    settings = config_settings.ema_settings(cfg)  # ConfigError names key, value, what is allowed
    if not add_datasets_to_config(cfg, datasets):
        del cfg.DATASETS["COCO_INSTANCES"]  # config.yaml stays as without d2ema's datasets
    return cfg, settings


def _check_dist_url(url: str) -> None:
    """A URL torch.distributed can rendezvous at: tcp://HOST:PORT, file:///PATH or env://."""
    import re
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    host = parts.hostname if parts is not None else None
    if parts is not None and (parts.scheme == "env" or (parts.scheme == "file" and parts.path)
                              or (parts.scheme == "tcp" and host and port
                                  and re.fullmatch(r"[\w.:-]+", host, re.ASCII))):
        return
    raise UsageError(f"--dist-url {url!r} is not a rendezvous address: give tcp://HOST:PORT "
                     "(machine 0's address and a free port), file:///SHARED/PATH or env://")


def _check_launch(args, cfg=None) -> None:
    """The process counts fit this machine (its GPUs; its cores in the CPU testing mode) and
    the batch splits evenly over the processes."""
    import os

    import torch

    if args.num_gpus < 1 or args.num_machines < 1 or not 0 <= args.machine_rank < args.num_machines:
        raise UsageError(f"--num-gpus {args.num_gpus} and --num-machines {args.num_machines} "
                         f"must be at least 1, and --machine-rank {args.machine_rank} must be in "
                         f"0..{args.num_machines - 1}")
    world = args.num_gpus * args.num_machines
    url = getattr(args, "dist_url", None)
    # 'auto' or no URL cannot join machines; an explicit loopback address joins "machines" on
    # this host, as detectron2's launcher allows
    if args.num_machines > 1 and url in (None, "auto"):
        raise UsageError(f"--num-machines {args.num_machines} needs --dist-url "
                         "tcp://ADDRESS:PORT with the address of machine 0 as every machine "
                         "reaches it (tcp://127.0.0.1:PORT for processes on this host); "
                         f"{'auto' if url else 'the default'} only works on one machine")
    if world > 1 and url not in (None, "auto"):
        _check_dist_url(url)
    gpus, cores = torch.cuda.device_count(), os.cpu_count()
    if world > 1 and gpus and args.num_gpus > gpus:
        raise UsageError(f"--num-gpus {args.num_gpus}, but this machine has {gpus} CUDA "
                         f"devices; use --num-gpus {gpus} or fewer")
    if world > 1 and not gpus and args.num_gpus > (cores or 1):
        raise UsageError(f"--num-gpus {args.num_gpus}: with no CUDA device that many CPU "
                         f"processes (gloo, a testing mode) would start, but this machine has "
                         f"{cores} CPU cores; use --num-gpus {cores} or fewer")
    if world == 1 or cfg is None or args.eval_only:
        return
    view = ConfigView.of(cfg)
    batch = view.get("batch")
    if batch % world:
        raise UsageError(f"{view.name('batch')} = {batch} does not split over {world} "
                         f"processes; use a multiple of {world}")


# ----------------------------------------------------------------------------- entry points
def train_main(
    args: argparse.Namespace,
    prepare: Prepare | None = None,
    known_datasets: Collection[str] = (),
) -> int:
    """Check the inputs, then run `train_worker` in ``launch``'s processes."""
    # validate before spawning workers
    cfg, settings = load_run(args.config_file, args.opts, _datasets(args))
    if is_lazy(args.config_file):
        check_lazy_keys(cfg, args)
    assert settings is not None  # check_lazy_keys refuses a LazyConfig without train
    check_weights(cfg, args)
    check_output_dir(cfg, args, settings)  # writable, not a file, steps to run
    if args.resume and not args.eval_only:  # before config.yaml is rewritten
        check_resume_keeps_ema(cfg, settings)
    check_datasets_used(cfg, _datasets(args), tests_only=args.eval_only)
    check_datasets_known(cfg, known_datasets)
    check_selection(cfg, settings)
    _check_launch(args, cfg)
    if getattr(args, "dist_url", None) is None:
        args.dist_url = getattr(args, "default_dist_url", "auto")
        if getattr(args, "num_machines", 1) == 1 and getattr(args, "num_gpus", 1) > 1:
            from d2ema.d2.engine.launch import free_default  # the default port busy: another

            args.dist_url = free_default(args.dist_url)
    if args.eval_only:  # one folder for every rank; the run's config.yaml stays as it is
        args.eval_dir = new_eval_dir(run_dir(cfg))
    from d2ema.d2.engine.launch import launch

    in_process = args.num_gpus * args.num_machines == 1  # launch() then calls the worker here
    # one training per OUTPUT_DIR, from before anything is written there; a full disk: one line
    with run_lock(cfg, args), disk_full_as_error(output_dir(cfg)):
        try:
            launch(
                train_worker,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args, prepare, *((cfg, settings) if in_process else ())),
            )
        except KeyboardInterrupt as e:  # the command says where --resume will start
            e.resume_note = resume_note(output_dir(cfg))  # type: ignore[attr-defined]
            raise
    return 0


def resume_note(folder: str | Path) -> str:
    """Where ``--resume`` continues a run of ``folder``, for the interrupted command's line:
    from the iteration after the checkpoint ``last_checkpoint`` names.

    Example: ``resume_note("output")`` -> ``"--resume continues from iteration 5000
    (model_0004999.pth)"``.
    """
    from d2ema.d2.checkpoint.resume import tagged_checkpoint

    try:
        path, _ = tagged_checkpoint(folder)
    except D2EMAError:
        path = None
    if path is None:
        return "no checkpoint was saved yet: --resume starts from iteration 0"
    match = re.match(r"^.+_(\d+)\.pth$", path.name)
    if match is None:  # model_final.pth: training had finished
        return f"--resume continues after the last iteration ({path.name})"
    return f"--resume continues from iteration {int(match.group(1)) + 1} ({path.name})"


def _datasets(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "dataset", None) or ())


def train_worker(args: argparse.Namespace, prepare: Prepare | None = None, cfg: Any = None,
                 settings: EMASettings | None = None):
    """One training process (`d2ema.d2.engine.launch.launch` runs it on each GPU, or on the
    CPU with gloo where there is no GPU). ``cfg`` and ``settings``: the config already loaded in
    this process and its EMA settings, if any (a LazyConfig file runs once per process; the
    settings are read once per process and handed to the trainer)."""
    if cfg is None:
        cfg, settings = load_run(args.config_file, args.opts, _datasets(args))
    if settings is None:
        settings = config_settings.ema_settings(cfg)
    register_config_datasets(cfg)
    with core_words_named(settings.key):  # a core error gets the key beside its parameter
        if is_lazy(args.config_file):
            return _lazy_main(cfg, args, prepare, settings)
        return _yacs_main(cfg, args, prepare, settings)


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


def _warn_no_ema(path: str) -> None:
    logger.warning(
        "the checkpoint %s has no EMA ('ema_state'): evaluating its raw weights, reported "
        "without the 'ema/' prefix", path,
    )


# ----------------------------------------------------------------------------- yacs
def _yacs_main(cfg, args, prepare: Prepare | None, settings: EMASettings):
    from detectron2.evaluation import verify_results
    from detectron2.utils import comm

    from d2ema.d2.family import get_model_ema

    run = setup_run(cfg, args)
    if prepare is not None:
        prepare(cfg)
    if args.eval_only:
        with settings_given(settings):
            model = EMATrainer.build_model(cfg)
        ema = get_model_ema(model)
        if ema is not None:
            checkpointer = EMACheckpointer(model, run, ema=ema)
        else:
            checkpointer = AtomicCheckpointer(model, save_dir=run)
        # load(), not resume_or_load(resume=False): the latter loads the model only, not the EMA
        path = cfg.MODEL.WEIGHTS
        if args.resume and checkpointer.has_checkpoint():
            path = checkpointer.get_checkpoint_file()
        checkpointer.load(path)
        if ema is not None and settings.use_ema_weights_for_eval_only and not (
            checkpointer.ema_loaded
        ):
            _warn_no_ema(path)
            results = EMATrainer.test_with_ema(cfg, model, None, raw=True)
        else:
            results = EMATrainer.test_eval_only(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        _say(f"evaluation results: {_summary(results)}")
        return results
    trainer = EMATrainer(cfg, ema_settings=settings)
    trainer.resume_or_load(resume=args.resume)
    check_posthoc_space(trainer.model, trainer.max_iter, trainer.start_iter)
    trainer.train()  # with MODEL_EMA.POSTHOC.SELECT, then chooses the EMA length
    results = getattr(trainer, "_last_eval_results", None)
    if results:
        _say(f"final evaluation: {_summary(results)}")
    _say(f"done; checkpoints in {cfg.OUTPUT_DIR}")
    return results


# ----------------------------------------------------------------------------- LazyConfig
def _lazy_test(cfg, model) -> dict[str, Any]:
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test),
        adapt_evaluator(instantiate(cfg.dataloader.evaluator)),
    )
    print_csv_format(ret)
    return dict(ret or {})


def _lazy_checkpointer(model, ema, output_dir: str, settings, **checkpointables):
    if ema is None:  # a resume must not drop a checkpoint's EMA unnoticed
        return NoEMACheckpointer(model, output_dir, discard_ema=settings.discard_on_resume,
                                 key=settings.key, **checkpointables)
    return EMACheckpointer(model, output_dir, ema=ema, **checkpointables)


def _lazy_main(cfg, args, prepare: Prepare | None, settings: EMASettings):
    """tools/lazyconfig_train_net.py with the EMA of this layer."""
    from detectron2.config import instantiate
    from detectron2.engine import (
        AMPTrainer,
        SimpleTrainer,
        create_ddp_model,
        default_writers,
        hooks,
    )
    from detectron2.utils import comm

    run = setup_run(cfg, args)
    python_coco_eval(cfg)  # before training, not at the first evaluation after it
    if prepare is not None:
        prepare(cfg)
    train = cfg.train
    model = instantiate(cfg.model)
    model.to(train.get("device", "cuda"))
    ema = build_model_ema(cfg, model, settings)  # before the optimizer and DDP (FLAT re-points)

    if args.eval_only:
        model = create_ddp_model(model)
        checkpointer = _lazy_checkpointer(model, ema, run, settings)
        checkpointer.load(train.init_checkpoint)
        use_ema = ema is not None and settings.use_ema_weights_for_eval_only
        if use_ema and not checkpointer.ema_loaded:
            _warn_no_ema(train.init_checkpoint)
            use_ema = False
        results = evaluate_with_ema(
            lambda m: _lazy_test(cfg, m), model, ema if use_ema else None,
            raw=not use_ema or settings.eval_both,
        )
        _say(f"evaluation results: {_summary(results)}")
        return results

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **train.get("ddp", {}))
    amp = train.get("amp", {}).get("enabled", False)
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, loader, optimizer)
    checkpointer = _lazy_checkpointer(model, ema, train.output_dir, settings, trainer=trainer)
    last_results: dict[str, Any] = {}

    def evaluate():
        last_results.clear()
        last_results.update(evaluate_with_ema(
            lambda m: _lazy_test(cfg, m), model, ema, raw=ema is None or settings.eval_both
        ))
        last_results.update(evaluate_extra_emas(lambda m: _lazy_test(cfg, m), model))
        return last_results

    checkpoint_args = dict(train.get("checkpointer", {"period": 5000}))
    trainer.register_hooks([
        hooks.IterationTimer(),
        EMAUpdateHook(ema, model, checkpointer=checkpointer,
                checkpoint_period=checkpoint_args.get("period", 0)) if ema is not None else None,
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
    check_posthoc_space(model, train.max_iter, start_iter)
    trainer.train(start_iter, train.max_iter)
    if last_results:
        _say(f"final evaluation: {_summary(last_results)}")
    _say(f"done; checkpoints in {train.output_dir}")
    return last_results




def check_readable(path_text: str) -> Path:
    path = Path(path_text)
    if not path.exists():
        raise UsageError(f"config file {path} does not exist; pass an existing --config-file "
                         "(a YAML config or a LazyConfig .py)")
    if not path.is_file():
        raise UsageError(f"config file {path} is not a file; pass a YAML config or a .py")
    if path.suffix not in (".yaml", ".yml", ".py"):
        raise UsageError(f"config file {path} should end in .yaml, .yml (detectron2 config) or "
                         ".py (LazyConfig)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from e
    return path


def check_weights(cfg, args) -> None:
    view = ConfigView.of(cfg)
    lazy, weights = view.lazy, view.weights
    if args.eval_only and not weights:
        last = None if lazy else Path(view.output_dir, "last_checkpoint")
        if last is None or not args.resume or not last.is_file():
            key = view.name("weights") + ("=" if lazy else " ")
            alt = "" if lazy else " (or --resume, with checkpoints in OUTPUT_DIR)"
            raise UsageError(f"--eval-only evaluates a checkpoint, but {key.strip(' =')} is "
                             f"empty (that would evaluate random weights); pass "
                             f"{key}output/model_final.pth{alt}")
    if not weights or "://" in str(weights) or args.resume or Path(weights).is_file():
        return
    key = view.name("weights")
    example = f"{key}=output/model_final.pth" if lazy else f"{key} output/model_final.pth"
    raise UsageError(f"checkpoint {weights} ({key}) does not exist; pass an existing file, "
                     f"e.g. {example}")


def check_lazy_keys(cfg, args) -> None:
    needed = ["model", "dataloader", "train"]
    if not args.eval_only:
        needed += ["optimizer", "lr_multiplier"]
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise UsageError(
            f"LazyConfig {args.config_file} defines no {', '.join(missing)}; a training config "
            "needs model, dataloader (train, test, evaluator), optimizer, lr_multiplier and train "
            "(as detectron2's configs/common/*.py)"
        )


def _yacs_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        keys.append(prefix + name)
        if isinstance(value, dict):
            keys += _yacs_keys(value, f"{prefix}{name}.")
    return keys


def unknown_key_hint(cfg, error: BaseException) -> str:
    """For yacs's ``Non-existent config key: MODEL_EMA.DECAYY``: `` (did you mean
    MODEL_EMA.DECAY?)``, the closest existing key; else ``""``."""
    import difflib

    found = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(error))
    if not found:
        return ""
    close = difflib.get_close_matches(found.group(1), _yacs_keys(cfg), n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""
