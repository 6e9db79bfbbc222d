"""A run folder's saved ``config.yaml`` is data: read it without running code.

detectron2 treats the config file a user writes as code: a YAML config (or its ``_BASE_``) may
hold ``!!python/object/apply:eval`` values and a LazyConfig ``.py`` runs when it is loaded;
d2ema keeps that. The ``config.yaml`` that ``default_setup`` saves into a run's OUTPUT_DIR is
another matter: commands that read a run folder (``d2ema posthoc RUN --eval``, ``d2ema train
--config-file RUN/config.yaml --resume``) must not let whoever could edit that folder run code.

A config is *a run's saved config* when it is named ``config.yaml`` and its folder holds what a
training writes there (``last_checkpoint``, ``model_*.pth``, ``ema_snapshots/``,
``metrics.json``, ``log.txt``): what d2ema itself writes, found without reading the config. Such
a file is parsed with a safe YAML loader first and refused (:class:`~d2ema.errors.UsageError`,
one line) if it holds a Python tag other than ``!!python/tuple`` (which ``LazyConfig.save``
writes), a ``_BASE_`` (a saved config is complete), or, for a LazyConfig, a ``_target_``
outside the libraries a training config builds from (detectron2's model, data, solver and
evaluation parts, ``torch.nn``, ``torch.optim``, fvcore, d2ema). Only then does detectron2's own
loader read it.

Example::

    if is_run_config(path):
        check_saved_config(path)       # UsageError for a Python tag; nothing executed
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from .plain_config import _Loader

__all__ = ["check_saved_config", "is_run_config"]

_RUN_FILES = ("last_checkpoint", "ema_snapshots", "metrics.json", "log.txt")
_TARGETS = ("detectron2.modeling.", "detectron2.layers.", "detectron2.data.",
            "detectron2.evaluation.", "detectron2.solver.", "detectron2.structures.",
            "torch.nn.", "torch.optim.", "fvcore.", "d2ema.", "torchvision.transforms.")


def is_run_config(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the ``config.yaml`` a training saved into its OUTPUT_DIR."""
    path = Path(path)
    if path.name != "config.yaml":
        return False
    folder = path.parent
    return any((folder / n).exists() for n in _RUN_FILES) or any(folder.glob("model_*.pth"))


def _targets(node: Any, where: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield where or "(top)", value
            else:
                yield from _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def check_saved_config(path: str | os.PathLike[str]) -> None:
    """Refuse a run's saved config that would run code when loaded; see the module doc."""
    fix = ("a run's saved config.yaml is read as data; restore it, or pass the config file you "
           "trained with (your own .yaml or LazyConfig .py)")
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    except yaml.constructor.ConstructorError as e:
        tag = str(e.problem or e).replace("could not determine a constructor for the tag ", "")
        raise UsageError(f"{path} holds the Python YAML tag {tag}, which would run code; "
                         f"{fix}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{path} is not valid YAML ({type(e).__name__}); {fix}") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a YAML mapping; {fix}")
    if "_BASE_" in data:
        raise UsageError(f"{path} has a _BASE_ ({data['_BASE_']!r}), which a saved config never "
                         f"has; {fix}")
    for where, target in _targets(data):
        if not isinstance(target, str) or not target.startswith(_TARGETS):
            raise UsageError(f"{path}: {where}._target_ = {target!r} is not a part of "
                             f"detectron2, torch.nn/optim, fvcore or d2ema, and would be imported "
                             f"and called; {fix}")
