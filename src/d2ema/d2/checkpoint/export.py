"""Export the EMA weights of a training checkpoint as a plain detectron2 checkpoint.

The result holds the EMA under ``model`` (names as in the model's state dict), so any
detectron2 loads it as ``MODEL.WEIGHTS`` (``DetectionCheckpointer(model).load(path)``), with no
d2ema installed. For each entry of the checkpoint's ``model``:

* an EMA tensor of the same name replaces it, cast to the raw tensor's dtype (the EMA of bf16 or
  fp16 weights is kept in fp32; the export has the model's dtypes);
* entries the EMA does not track (e.g. buffers with ``INCLUDE_BUFFER`` off) keep their raw values.

EMA tensors without a ``model`` entry are left out (and counted). A checkpoint without a
``model`` dict gets the EMA tensors as its model. The file is written atomically: a temporary
file in the same folder, renamed over the target once complete, so a failed export leaves no
partial file and never damages an existing one.

Example::

    summary = export_ema("output/model_final.pth", "output/model_ema.pth")
    print(summary.describe())

`export_with_config` also writes the plain config beside the weights
(`d2ema.d2.config.saved`), so that plain detectron2 runs them with no d2ema installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from d2ema.d2.checkpoint.resume import read_checkpoint
from d2ema.d2.config.saved import (
    RUN_CONFIG,
    find_run_config,
    plain_config_path,
    plain_config_text,
    plain_output_dir,
)
from d2ema.errors import ExportError
from d2ema.io.atomic import atomic_write_files, check_target
from d2ema.io.format import META_KEY, STATE_KEY, align_names, nonfinite_names, shorten

__all__ = [
    "EXPORT_KEY",
    "ExportError",
    "ExportSummary",
    "ema_model_state",
    "export_ema",
    "export_with_config",
]


EXPORT_KEY = "d2ema_export"


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    source: Path
    output: Path
    replaced: int  # model entries that now hold the EMA
    kept_raw: int  # model entries the EMA does not track
    ema_only: int  # EMA tensors with no model entry (not exported)
    step: int | None

    def describe(self) -> str:
        step = f" (EMA step {self.step})" if self.step is not None else ""
        kept = f", {self.kept_raw} raw (not tracked by the EMA)" if self.kept_raw else ""
        left = (f"; {self.ema_only} EMA tensors without a model entry left out (buffers the "
                "model does not save, such as pixel_mean and the anchors, which it rebuilds "
                "from its config: harmless)" if self.ema_only else "")
        return (f"wrote {self.output}: {self.replaced} EMA tensors{step}{kept}{left}. "
                f"Use it as MODEL.WEIGHTS {self.output}")


def _load(path: Path) -> Mapping[str, Any]:
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist; pass the .pth file a d2ema/D2Go "
                          "training run wrote (e.g. output/model_final.pth)")
    if not path.is_file():
        raise ExportError(f"checkpoint {path} is not a file; pass a .pth file")
    # plain data only, checked whole: the reader --resume and --eval-only use
    checkpoint = read_checkpoint(path, ExportError)
    if not isinstance(checkpoint, Mapping):
        raise ExportError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def ema_model_state(checkpoint: Mapping[str, Any], source: str = "the checkpoint"):
    """``(state, replaced, kept_raw, ema_only)``: the checkpoint's ``model`` with the EMA in it."""
    ema = checkpoint.get(STATE_KEY)
    if ema is None:
        raise ExportError(
            f"{source} has no EMA (no '{STATE_KEY}' key); train with MODEL_EMA.ENABLED True "
            "(d2ema's EMATrainer, D2Go or the seed's model_ema) to get one"
        )
    if not isinstance(ema, Mapping) or not all(isinstance(t, torch.Tensor) for t in ema.values()):
        raise ExportError(f"{source}: '{STATE_KEY}' is not a dict of tensors")
    ema = dict(ema)
    model = checkpoint.get("model")
    if model is None:
        return dict(ema), len(ema), 0, 0
    if not isinstance(model, Mapping):
        raise ExportError(f"{source}: 'model' is a {type(model).__name__}, not a state dict")
    ema = align_names(ema, model)
    common = [n for n in model if n in ema]
    if not common:
        raise ExportError(
            f"{source}: none of the {len(ema)} EMA tensors has the name of a model weight, so the "
            "EMA does not belong to this model; export a checkpoint saved by one training run"
        )
    state: dict[str, Any] = {}
    for name, raw in model.items():
        if name not in ema:
            state[name] = raw
            continue
        value = ema[name]
        if isinstance(raw, torch.Tensor):
            if tuple(value.shape) != tuple(raw.shape):
                raise ExportError(f"{source}: EMA tensor {name} has shape {tuple(value.shape)}, "
                                  f"the model's {tuple(raw.shape)}; the checkpoint is inconsistent")
            value = value.to(dtype=raw.dtype)
        state[name] = value.detach().clone()
    ema_only = len(set(ema) - set(model))
    return state, len(common), len(model) - len(common), ema_only


def _step(checkpoint: Mapping[str, Any]) -> int | None:
    meta = checkpoint.get(META_KEY)
    if isinstance(meta, Mapping) and isinstance(meta.get("step"), int):
        return int(meta["step"])
    it = checkpoint.get("iteration")
    return int(it) + 1 if isinstance(it, int) else None


def _write(obj: Any, output: Path, extra: Sequence[tuple[Path, str]] = ()) -> None:
    try:
        atomic_write_files([(output, obj), *extra])  # all written, or none replaced
    except OSError as e:
        where = e.filename or output
        raise ExportError(f"cannot write {where}: {e.strerror or e}; nothing was replaced"
                          f"{' (' + str(output) + ' neither)' if extra else ''}") from e


def _check_finite(checkpoint: Mapping[str, Any], source: Path) -> None:
    bad = nonfinite_names(checkpoint[STATE_KEY])
    if bad:
        meta = checkpoint.get(META_KEY)
        step = meta.get("nonfinite_step") if isinstance(meta, Mapping) else None
        since = f" (since step {step})" if isinstance(step, int) else ""
        raise ExportError(
            f"the EMA in {source} holds NaN or Inf{since} in {len(bad)} of "
            f"{len(checkpoint[STATE_KEY])} tensors ({shorten(bad, 3)}); export a checkpoint "
            "from before that, or pass --allow-nonfinite (allow_nonfinite=True) to write it anyway"
        )


def export_ema(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    allow_nonfinite: bool = False,
    extra: Sequence[tuple[str | os.PathLike[str], str]] = (),
    ema: Mapping[str, torch.Tensor] | None = None,
    info: Mapping[str, Any] | None = None,
) -> ExportSummary:
    """Write ``output``: a detectron2 checkpoint whose ``model`` holds the EMA of ``checkpoint``.

    ``ema``: other EMA tensors to export with ``checkpoint``'s model (e.g. a post-hoc EMA
    rebuilt from snapshots), instead of its ``ema_state``; ``info``: more entries for the
    file's ``d2ema_export`` record (e.g. ``step``, ``posthoc``).

    Raises `ExportError` for a missing/unreadable checkpoint, one without ``ema_state``,
    an EMA that does not fit the model or holds NaN/Inf (unless ``allow_nonfinite``), or an
    output that cannot be written (a folder, FIFO or device node there is never replaced).
    ``extra``: ``(path, text)`` files written with ``output`` as a group: if one cannot be
    written, none is replaced.
    """
    source, output = Path(checkpoint), Path(output)
    if output.exists() and output.is_dir():
        raise ExportError(f"output {output} is a folder; give a file name, e.g. {output}/ema.pth")
    try:
        check_target(output)
    except OSError as e:
        raise ExportError(f"cannot write {output}: {e.strerror or e}") from e
    with contextlib.suppress(OSError):
        if output.exists() and source.exists() and os.path.samefile(source, output):
            raise ExportError(f"output {output} is the input checkpoint; write another file "
                              "(the export holds the EMA only, no optimizer or raw weights)")
    data = _load(source)
    if ema is not None:
        data = {"model": data.get("model"), STATE_KEY: dict(ema)}
    state, replaced, kept, ema_only = ema_model_state(data, f"checkpoint {source}")
    if not allow_nonfinite:
        _check_finite(data, source)
    record = {"source": str(source), "step": _step(data), "format": "d2ema EMA export, v1",
              **(info or {})}
    exported = {"model": state, EXPORT_KEY: record}
    _write(exported, output, [(Path(p), text) for p, text in extra])
    return ExportSummary(source, output, replaced, kept, ema_only, record["step"])


def _lazy_python_objects(config: Path) -> bool:
    """A LazyConfig's saved config.yaml that holds Python objects plain YAML does not read."""
    from d2ema.d2.config.view import is_lazy

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
    """`export_ema` (``export_kwargs``: its ``ema=`` and
    ``info=``), then
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
