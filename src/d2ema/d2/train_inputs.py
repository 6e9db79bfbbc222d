"""What ``d2ema train`` is given, checked before any process starts: which config system a file
is, whether it can be read, whether its checkpoint exists, whether a LazyConfig has what a
training needs. Each mistake is a :class:`~d2ema.errors.UsageError` naming the fix.

Example::

    path = check_readable(args.config_file)
    if is_lazy(path): check_lazy_keys(cfg, args)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..confined import no_links_out
from ..errors import UsageError

__all__ = ["check_lazy_keys", "check_output_dir", "check_readable", "check_weights", "is_lazy",
           "unknown_key_hint"]

_LAZY_ROOTS = ("train", "model", "dataloader")


def is_lazy(path: str) -> bool:
    """A LazyConfig: a ``.py``, or the ``config.yaml`` detectron2 saved for one (top-level
    keys such as ``train:``, ``model:``, and no upper-case yacs keys)."""
    if str(path).endswith(".py"):
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return False
    roots = re.findall(r"^([A-Za-z_]\w*)\s*:", text, flags=re.MULTILINE)
    return any(r in _LAZY_ROOTS for r in roots) and not any(r.isupper() for r in roots)


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
    lazy = not hasattr(cfg, "MODEL")
    weights = cfg.train.get("init_checkpoint", "") if lazy else cfg.MODEL.WEIGHTS
    if args.eval_only and not weights:
        last = None if lazy else Path(cfg.OUTPUT_DIR, "last_checkpoint")
        if last is None or not args.resume or not last.is_file():
            key = "train.init_checkpoint=" if lazy else "MODEL.WEIGHTS "
            alt = "" if lazy else " (or --resume, with checkpoints in OUTPUT_DIR)"
            raise UsageError(f"--eval-only evaluates a checkpoint, but {key.strip(' =')} is "
                             f"empty (that would evaluate random weights); pass "
                             f"{key}output/model_final.pth{alt}")
    if not weights or "://" in str(weights) or args.resume or Path(weights).is_file():
        return
    key = "train.init_checkpoint" if lazy else "MODEL.WEIGHTS"
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


def _writable(folder: Path, key: str) -> None:
    """``folder`` is a folder this user can write, or can be made (its nearest existing parent
    is a writable folder)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == folder else f"is inside {probe}, which is a file"
        raise UsageError(f"{key} = {folder} {where}; give a folder (new or existing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{key} = {folder} cannot be written ({probe} is read-only for this "
                         "user); give a folder you can write")


def check_output_dir(cfg, args) -> None:
    """The run's output folder (and its snapshot folder) can be written, and a training has
    steps to run: checked before any process starts or anything is written."""
    lazy = not hasattr(cfg, "OUTPUT_DIR")
    train: Any = cfg.get("train", {}) if lazy else None
    key = "train.output_dir" if lazy else "OUTPUT_DIR"
    folder = str(train.get("output_dir", "") if lazy else cfg.OUTPUT_DIR)
    if folder and "://" not in folder:
        _writable(Path(folder), key)
        no_links_out(folder, f"{key} = {folder}")  # no planted link makes a write land elsewhere
        if args.resume and Path(folder).is_dir():
            from ..resume import tagged_checkpoint

            tagged_checkpoint(folder)  # a last_checkpoint naming a file elsewhere: refused now
        from .config import ema_settings

        settings = ema_settings(cfg) if not lazy or "model_ema" in train else None
        posthoc = getattr(settings, "posthoc", None) if settings is not None else None
        if posthoc is not None and posthoc.dir:
            sub = "train.model_ema.posthoc.dir" if lazy else "MODEL_EMA.POSTHOC.DIR"
            _writable(Path(folder, posthoc.dir), sub)
    if args.eval_only:
        return
    iters = train.get("max_iter", None) if lazy else cfg.SOLVER.MAX_ITER
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        name = "train.max_iter" if lazy else "SOLVER.MAX_ITER"
        raise UsageError(f"{name} = {iters!r}: a training needs at least 1 iteration; give a "
                         "whole number >= 1")
