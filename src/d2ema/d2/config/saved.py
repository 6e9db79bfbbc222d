"""A run folder's saved ``config.yaml``: read as data, never as code, and written plain for
detectron2 without d2ema.

**Read as data.** detectron2 treats the config file a user writes as code: a YAML config (or its
``_BASE_``) may hold ``!!python/object/apply:eval`` values and a LazyConfig ``.py`` runs when it is
loaded; d2ema keeps that. The ``config.yaml`` that ``default_setup`` saves into a run's OUTPUT_DIR
is another matter: commands that read a run folder (``d2ema posthoc RUN --eval``, ``d2ema train
--config-file RUN/config.yaml --resume``) must not let whoever could edit that folder run code.

A config is *a run's saved config* when it is named ``config.yaml`` and its folder holds what a
training writes there (``last_checkpoint``, ``model_*.pth``, ``ema_snapshots/``,
``metrics.json``, ``log.txt``): what d2ema itself writes, found without reading the config. Such
a file is parsed with a safe YAML loader first and refused (:class:`~d2ema.errors.UsageError`,
one line) if it holds a Python tag other than those ``LazyConfig.save`` writes for a config
of those libraries (``!!python/tuple``; ``!!python/name:`` and ``functools.partial`` of a
class or function of them), a ``_BASE_`` (a saved config is complete), or, for a LazyConfig, a
``_target_`` outside the libraries a training config builds from (detectron2's model, data,
solver and evaluation parts, ``torch.nn``, ``torch.optim``, fvcore's schedulers, d2ema's model
configs and datasets). Only then does detectron2's own loader read it.

For example::

    if is_run_config(path):
        check_saved_config(path)       # UsageError for a Python tag; nothing executed

**Written plain.** A d2ema run's ``OUTPUT_DIR/config.yaml`` holds ``MODEL_EMA`` (and
``DATASETS.COCO_INSTANCES`` when ``--dataset`` was used), which plain detectron2 refuses
("Non-existent config key"); that file stays as it is, for d2ema to resume from.
:func:`write_plain_config` writes a copy without d2ema's keys whose ``MODEL.WEIGHTS`` is the
exported file, so that ``get_cfg()`` + ``merge_from_file`` (or ``tools/train_net.py --eval-only``)
runs the EMA weights with no d2ema installed. A LazyConfig's saved ``config.yaml`` loses
``train.model_ema`` / ``train.coco_instances`` and gets ``train.init_checkpoint``.

Example::

    config = find_run_config("output/model_final.pth")     # output/config.yaml, if any
    write_plain_config(config, "model_ema.yaml", weights="model_ema.pth")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from d2ema.errors import ExportError, UsageError
from d2ema.io.atomic import atomic_write_text
from d2ema.io.confined import escapes

__all__ = [
    "check_saved_config",
    "find_run_config",
    "is_run_config",
    "plain_config_path",
    "plain_config_text",
    "plain_output_dir",
    "write_plain_config",
]


_RUN_FILES = ("last_checkpoint", "ema_snapshots", "metrics.json", "log.txt")


_TARGETS = ("detectron2.modeling.", "detectron2.layers.", "detectron2.data.",
            "detectron2.evaluation.", "detectron2.solver.", "detectron2.structures.",
            "torch.nn.", "torch.optim.", "fvcore.common.param_scheduler.",
            "d2ema.app.model_configs.", "d2ema.d2.data.datasets.", "torchvision.transforms.")


class _Loader(yaml.SafeLoader):
    """Safe YAML plus ``!!python/tuple``, which ``LazyConfig.save`` writes for tuples."""


_Loader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node)
)


class _Check(_Loader):
    """:class:`_Loader` plus the Python references ``LazyConfig.save`` writes for classes and
    ``functools.partial`` (``norm_layer=partial(nn.LayerNorm, eps=1e-6)``), admitted only for
    the libraries of :data:`_TARGETS`; they are checked here, not built."""


def _refuse(tag: str, node) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(
        None, None, f"could not determine a constructor for the tag {tag!r}", node.start_mark)


def _name(loader, suffix: str, node):
    if not suffix.startswith(_TARGETS):
        raise _refuse(f"tag:yaml.org,2002:python/name:{suffix}", node)
    return f"<{suffix}>"


def _partial(loader, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)  # args/state: names checked inside
    return loader.construct_sequence(node, deep=True)


_Check.add_multi_constructor("tag:yaml.org,2002:python/name:", _name)


_Check.add_constructor("tag:yaml.org,2002:python/object/apply:functools.partial", _partial)


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
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Check)
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
                             f"detectron2's model/data/solver/evaluation, torch.nn/optim, fvcore's "
                             f"schedulers or d2ema's model configs, and would be imported and "
                             f"called; {fix}")


RUN_CONFIG = "config.yaml"


def find_run_config(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The ``config.yaml`` detectron2 wrote beside a run's checkpoints, if there is one."""
    path = Path(checkpoint).parent / RUN_CONFIG
    if path.is_file() and escapes(path.parent, path):  # read as data, and only from the run
        raise ExportError(f"{path} is a symbolic link to {os.path.realpath(path)}, outside the "
                          "run's folder; pass the run's config with --config")
    return path if path.is_file() else None


def plain_config_path(weights: str | os.PathLike[str]) -> Path:
    """Where the config of exported ``weights`` goes: the same name, ending in ``.yaml``."""
    weights = Path(weights)
    path = weights.with_suffix(".yaml")
    return path if path != weights else weights.with_name(weights.name + ".config.yaml")


def plain_output_dir(weights: str | os.PathLike[str]) -> str:
    """The output folder of the plain config: beside the export, never the run's folder
    (detectron2's ``default_setup`` would replace the run's ``config.yaml``)."""
    weights = Path(weights)
    return str(weights.with_name(weights.stem + "_output"))


def _strip(data: dict[str, Any], weights: str) -> dict[str, Any]:
    if "MODEL" in data or "MODEL_EMA" in data:  # yacs
        data.pop("MODEL_EMA", None)
        if isinstance(data.get("DATASETS"), dict):
            data["DATASETS"].pop("COCO_INSTANCES", None)
        data.setdefault("MODEL", {})["WEIGHTS"] = weights
        data["OUTPUT_DIR"] = plain_output_dir(weights)
    elif isinstance(data.get("train"), dict):  # LazyConfig
        for key in ("model_ema", "coco_instances"):
            data["train"].pop(key, None)
        data["train"]["init_checkpoint"] = weights
        data["train"]["output_dir"] = plain_output_dir(weights)
    else:
        raise ExportError("is neither a detectron2 yacs config (MODEL, ...) nor a LazyConfig "
                          "(model, train, ...)")
    return data


def plain_config_text(config: str | os.PathLike[str], weights: str) -> str:
    """``config`` without d2ema's keys, its weights set to ``weights``, as YAML text.

    Raises :class:`ExportError` for a config that cannot be read (a Python tag included: a
    run's config is read as data).
    """
    config = Path(config)
    try:
        data = yaml.load(config.read_text(), Loader=_Loader)
    except OSError as e:
        raise ExportError(f"cannot read config {config}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ExportError(f"cannot read config {config} as plain YAML ({problem}); a run's "
                          "config is read as data: pass --config with the run's YAML config") from e
    if not isinstance(data, dict):
        raise ExportError(f"config {config} is not a YAML mapping; pass the run's config.yaml")
    try:
        data = _strip(data, weights)
    except ExportError as e:
        raise ExportError(f"config {config} {e}") from None
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def write_plain_config(
    config: str | os.PathLike[str], output: str | os.PathLike[str], weights: str
) -> Path:
    """Write ``output``: :func:`plain_config_text` of ``config``.

    Raises :class:`ExportError` for a config that cannot be read or written.
    """
    output = Path(output)
    text = plain_config_text(config, weights)
    try:
        atomic_write_text(text, output)
    except OSError as e:
        raise ExportError(f"cannot write {output}: {e.strerror or e}") from e
    return output
