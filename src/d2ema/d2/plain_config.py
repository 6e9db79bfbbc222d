"""A config for plain detectron2 beside exported EMA weights.

A d2ema run's ``OUTPUT_DIR/config.yaml`` holds ``MODEL_EMA`` (and ``DATASETS.COCO_INSTANCES``
when ``--dataset`` was used), which plain detectron2 refuses ("Non-existent config key"); that
file stays as it is, for d2ema to resume from. :func:`write_plain_config` writes a copy without
d2ema's keys whose ``MODEL.WEIGHTS`` is the exported file, so that ``get_cfg()`` +
``merge_from_file`` (or ``tools/train_net.py --eval-only``) runs the EMA weights with no d2ema
installed. A LazyConfig's saved ``config.yaml`` loses ``train.model_ema`` /
``train.coco_instances`` and gets ``train.init_checkpoint``.

Example::

    config = find_run_config("output/model_final.pth")     # output/config.yaml, if any
    write_plain_config(config, "model_ema.yaml", weights="model_ema.pth")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text
from ..confined import escapes
from ..errors import ExportError
from ..export import export_ema

__all__ = ["export_with_config", "find_run_config", "plain_config_path", "plain_config_text",
           "plain_output_dir", "write_plain_config"]

RUN_CONFIG = "config.yaml"


class _Loader(yaml.SafeLoader):
    """Safe YAML plus ``!!python/tuple``, which ``LazyConfig.save`` writes for tuples."""


_Loader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node)
)


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


def _lazy_python_objects(config: Path) -> bool:
    """A LazyConfig's saved config.yaml that holds Python objects plain YAML does not read."""
    from .train_inputs import is_lazy

    try:
        text = config.read_text(errors="replace")
    except OSError:
        return False
    return is_lazy(str(config)) and "!!python/" in text


def export_with_config(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    *,
    allow_nonfinite: bool = False,
    **export_kwargs: Any,
) -> list[str]:
    """:func:`~d2ema.export.export_ema` (``export_kwargs``: its ``ema=`` and ``info=``), then
    the plain config (``config``, else the run's ``config.yaml`` beside ``checkpoint``) beside
    ``output``; returns the lines to print."""
    if config is not None and not Path(config).is_file():
        raise ExportError(f"config {config} does not exist; pass the run's config.yaml "
                          "(OUTPUT_DIR/config.yaml), or leave --config out")
    config = Path(config) if config is not None else find_run_config(checkpoint)
    weights, path = str(Path(output).resolve()), plain_config_path(output)
    # both files written as a pair: if the config cannot be, the weights are not replaced
    extra, note = [], None
    if config is not None:
        try:
            extra = [(path, plain_config_text(config, weights))]
        except ExportError:
            if not _lazy_python_objects(config):
                raise
            note = (f"no plain config written: {config} is a LazyConfig saved with Python "
                    f"objects; with plain detectron2 use your LazyConfig .py with "
                    f"train.init_checkpoint={weights} (as lazyconfig_train_net.py --eval-only)")
    lines = [export_ema(checkpoint, output, allow_nonfinite=allow_nonfinite, extra=extra,
                        **export_kwargs).describe()]
    if config is None:
        lines.append(f"no {RUN_CONFIG} beside {checkpoint}: pass --config RUN_CONFIG.yaml to "
                     "also write a config for plain detectron2")
        return lines
    if note is not None:
        return [*lines, note]
    lines.append(f"wrote {path}: {config} without d2ema's keys, weights {weights}, output "
                 f"folder {plain_output_dir(weights)} (not the run's); plain detectron2 reads "
                 f"it (e.g. tools/train_net.py --config-file {path} --eval-only)")
    return lines
