"""Build the EMAs of a detectron2 model and find them again: the primary EMA, its family of
extra and post-hoc EMAs, and the warning about an EMA that will mostly be its starting weights.

**Starting weights.** A classic EMA with constant decay ``d`` and no ramp keeps ``d**n`` of the
weights it started from after ``n`` updates: 0.999**800 = 45%, so a short run's EMA is mostly
random (or pretrained) initialisation, and evaluating it shows no detections at all. This is the
most common wrong guess (D2Go's default is 0.999 without a ramp); `initial_share_warning`
says so when training starts, with the fix.

Example::

    message = initial_share_warning(ema, total_steps=800)
    if message:
        logger.warning(message)

**The primary EMA.** The EMA lives on the (unwrapped) model as ``model.ema_state``, the attribute
D2Go and the seed article use, so every part of a trainer reaches it from the model alone.

Example::

    model = build_model(cfg)
    ema = build_model_ema(cfg, model)     # None unless cfg.MODEL_EMA.ENABLED
    assert get_model_ema(model) is ema

**Several EMAs of one model** (``MODEL_EMA.EXTRA_*`` and ``MODEL_EMA.POSTHOC.*``). Besides the
primary EMA (``MODEL_EMA.DECAY``, checkpoint key ``ema_state`` as D2Go writes it), a model may have

* extra EMAs, one per ``EXTRA_DECAYS`` value (the primary's schedule with another decay, named
  ``ema_<decay>``) and per ``EXTRA_SIGMA_RELS`` value (power EMAs, ``ema_sigma<sigma_rel>``),
  each evaluated with the raw weights and logged under its name (``ema_0.99/bbox/AP``: one
  TensorBoard curve each), saved under the checkpoint key ``ema_extras``;
* post-hoc EMAs (``POSTHOC.ENABLED``): power EMAs of ``POSTHOC.SIGMA_RELS``, not evaluated,
  snapshotted every ``POSTHOC.PERIOD`` iterations and at the last one into
  ``OUTPUT_DIR/ema_snapshots`` by the main process (`PostHocEMA`), saved under
  ``ema_posthoc`` so that a resumed run continues the series exactly.

They form the model's `EMAFamily`, built by `build_model_ema` and driven
by `EMAUpdateHook` (one hook updates every EMA per step);
`EMACheckpointer` saves and checks them with the primary.

Example::

    cfg.MODEL_EMA.EXTRA_DECAYS = [0.99, 0.9998]
    cfg.MODEL_EMA.POSTHOC.ENABLED = True
    trainer = EMATrainer(cfg)          # evaluates raw, ema/, ema_0.99/, ema_0.9998/
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from d2ema.averaging.state import unwrap_model
from d2ema.d2.config import settings as config_settings
from d2ema.d2.config.settings import EMASettings
from d2ema.d2.config.view import ConfigView
from d2ema.d2.family import (
    ATTRIBUTE,
    EMAFamily,
    attach_family,
    attach_settings,
    get_ema_family,
)
from d2ema.distributed import ShardedEMA
from d2ema.ema import EMA
from d2ema.errors import ReservedAttributeError
from d2ema.posthoc import PostHocEMA
from d2ema.schedules import Constant, SigmaRel

__all__ = [
    "WARN_SHARE",
    "build_ema_family",
    "build_model_ema",
    "check_posthoc_space",
    "initial_share",
    "initial_share_warning",
    "log_run_cost",
    "run_cost_line",
    "settings_given",
]


WARN_SHARE = 0.01  # warn when the starting weights keep more than this share at the end


def initial_share(ema: EMA, total_steps: int) -> float:
    """The weight the EMA's starting weights (those at step ``start``) still have at step
    ``total_steps``: the product of the decays of every update until then."""
    n = total_steps - ema.start
    if n <= 0:
        return 1.0
    if isinstance(ema.schedule, Constant):
        return ema.decay ** ((n // ema.every) * ema.every)
    share = 1.0
    for k in range(ema.every, n + 1, ema.every):
        share *= ema.decay_at(ema.start + k)
        if share < 1e-9:  # ramps and power EMAs get here within a few updates
            return share
    return share


def initial_share_warning(ema: EMA, total_steps: int, name: str = "the EMA",
                          key: Callable[[str], str] | None = None) -> str | None:
    """A warning with the fix if ``ema`` keeps more than `WARN_SHARE` of its starting
    weights at ``total_steps``, else None. ``key`` names the config keys it suggests
    (`EMASettings.key`; default: yacs)."""
    key = key or ConfigView(None, lazy=False).key
    share = initial_share(ema, total_steps)
    if share <= WARN_SHARE:
        return None
    n = total_steps - ema.start
    constant = isinstance(ema.schedule, Constant)
    formula = f" ({ema.decay:g}**{n})" if constant else ""
    ramp = f"a ramp ({key('SCHEDULE')} yolov5), " if constant else ""
    return (
        f"{name} (decay {ema.decay:g}, schedule {ema.meta()['schedule']}) will still be "
        f"{share:.0%} its starting weights after {n} steps{formula}: it would mostly show the "
        f"initial (random or pretrained) weights. Use {ramp}a power EMA ({key('SCHEDULE')} "
        f"sigma_rel, {key('SIGMA_REL')} 0.05, which adapts to the run length), or a decay of at "
        f"most {WARN_SHARE ** (1 / max(n, 1)):.4f} for this run"
    )


_GIVEN: contextvars.ContextVar[EMASettings | None] = contextvars.ContextVar(
    "d2ema_settings", default=None)


@contextlib.contextmanager
def settings_given(settings: EMASettings | None) -> Iterator[None]:
    """Inside the block `build_model_ema` uses ``settings`` rather than reading the config
    again: how a trainer hands the settings it read once to detectron2's ``build_model``
    classmethod, which receives only ``cfg``.

    Example::

        with settings_given(settings):
            model = EMATrainer.build_model(cfg)
    """
    token = _GIVEN.set(settings)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def build_model_ema(cfg: Any, model: nn.Module,
                    settings: EMASettings | None = None) -> EMA | None:
    """Validate the config's EMA settings (unless ``settings`` are given, or given by
    `settings_given`) and, if enabled, attach a new `EMA` (a
    `ShardedEMA` with ``SHARDED``), and build the extra and post-hoc
    EMAs the config asks for (`d2ema.d2.engine.build`). The settings stay with the model
    (`get_settings`), so that evaluations and the selection do not read the config again.

    Call it before building the optimizer and wrapping the model in DDP, as
    `EMATrainer` and ``d2ema train`` do: with ``FLAT`` unset (None) a plain EMA
    uses flat mode, which re-points the model's tensors into one buffer per dtype
    (`d2ema.averaging.flat`) so that an update is one ``lerp_``.
    """
    settings = settings or _GIVEN.get() or config_settings.ema_settings(cfg)
    target = unwrap_model(model)
    attach_settings(target, settings)
    if not settings.enabled:
        return None
    if hasattr(target, ATTRIBUTE):
        raise ReservedAttributeError(
            f"the model already has an attribute {ATTRIBUTE!r}: it is reserved for the EMA. "
            "Build the EMA once per model."
        )
    flat = settings.flat if settings.flat is not None else not settings.sharded
    kwargs = {**settings.ema_kwargs(), "flat": flat}
    ema = (ShardedEMA if settings.sharded else EMA)(target, **kwargs)
    setattr(target, ATTRIBUTE, ema)
    build_ema_family(target, settings, kwargs)  # MODEL_EMA.EXTRA_* and POSTHOC, if any
    return ema


logger = logging.getLogger(__name__)


SNAPSHOT_FOLDER = "ema_snapshots"


def build_ema_family(model: nn.Module, settings: EMASettings,
                     ema_kwargs: dict[str, Any] | None = None) -> EMAFamily | None:
    """Build and attach the model's extra and post-hoc EMAs, if the config asks for any;
    ``ema_kwargs``: those of the primary EMA (default: the settings')."""
    if not (settings.extra_decays or settings.extra_sigma_rels or settings.posthoc):
        return None
    from detectron2.utils import comm

    kwargs = dict(ema_kwargs or settings.ema_kwargs())
    extras = {}
    for decay in settings.extra_decays:
        schedule = dataclasses.replace(settings.schedule, decay=decay)
        extras[f"ema_{decay:g}"] = EMA(model, **{**kwargs, "decay": decay, "schedule": schedule})
    for sigma_rel in settings.extra_sigma_rels:
        extras[f"ema_sigma{sigma_rel:g}"] = EMA(model, **{**kwargs, "schedule": SigmaRel(
            sigma_rel=sigma_rel)})
    posthoc = None
    if settings.posthoc is not None:
        folder = os.path.join(settings.output_dir, settings.posthoc.dir or SNAPSHOT_FOLDER)
        posthoc = PostHocEMA(
            model, folder, settings.posthoc.sigma_rels,
            snapshot_every=settings.posthoc.period_for(settings.max_iter),
            dtype=settings.posthoc.dtype, enabled=comm.is_main_process(),
            **{k: v for k, v in kwargs.items() if k not in ("decay", "schedule")},
        )
    family = EMAFamily(extras, posthoc)
    attach_family(model, family)
    return family


def check_posthoc_space(model: nn.Module, max_iter: int, start_iter: int = 0) -> None:
    """Before training: refuse (`PostHocError`, one line) a post-hoc
    snapshot series larger than the free space of its disk (also checked in ``before_train``,
    for trainers of your own)."""
    family = get_ema_family(model)
    if family is not None and family.posthoc is not None:
        family.posthoc.writer.check_space(family.posthoc.snapshot_every, max_iter, start_iter)


def _tensor_bytes(tensors) -> int:
    """Bytes of the tensors' data, a tensor tied to another counted once (views into one flat
    buffer, as flat mode makes them, each count)."""
    seen = {(t.data_ptr() or id(t), t.numel(), t.dtype): t.numel() * t.element_size()
            for t in tensors}
    return sum(seen.values())


def _optimizer_bytes(optimizer) -> tuple[int, str]:
    """The optimizer's state in a checkpoint: measured once it holds any, else estimated from
    its kind (tensors per trainable weight: SGD with momentum 1, Adam and kin 2, ...)."""
    import torch

    if optimizer is None:
        return 0, "no optimizer"
    held = [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]
    if held:
        return _tensor_bytes(held), "measured"
    groups = optimizer.param_groups
    per = 2.0  # Adam, AdamW, RAdam, NAdam, Adamax, ... (exp_avg, exp_avg_sq)
    if isinstance(optimizer, torch.optim.SGD):
        per = float(any(g.get("momentum", 0) for g in groups))
    elif isinstance(optimizer, (torch.optim.Adagrad, torch.optim.RMSprop)):
        per = 1.0 + float(any(g.get("momentum", 0) or g.get("centered", False) for g in groups))
    if any(g.get("amsgrad", False) for g in groups):
        per += 1
    trainable = [p for g in groups for p in g["params"] if p.requires_grad]
    total = sum(p.numel() * max(p.element_size(), 4) for p in trainable)
    return int(per * total), f"estimated: {per:g} per weight for {type(optimizer).__name__}"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e10 else f"{n / 1e6:.1f} MB"


def run_cost_line(trainer, model: nn.Module, ema: EMA) -> str | None:
    """One line with what the run will write: the size of a checkpoint (model, each EMA,
    optimizer state), how many are kept (the trainer's ``PeriodicCheckpointer``: every
    ``period`` iterations plus ``model_final``, ``max_to_keep`` of the periodic ones), the
    post-hoc snapshot series, and the total against the free space of ``OUTPUT_DIR``'s disk.
    None when the trainer has no ``PeriodicCheckpointer`` and no snapshots.

    Example: ``logger.info(run_cost_line(trainer, model, ema))`` before training.
    """
    import shutil

    from detectron2.engine.hooks import PeriodicCheckpointer

    inner = unwrap_model(model)
    family = get_ema_family(inner)
    max_iter = int(getattr(trainer, "max_iter", 0) or 0)
    parts = {"model": _tensor_bytes(inner.state_dict().values())}
    parts["EMA"] = getattr(ema, "num_bytes", parts["model"])  # a sharded EMA: gathered whole
    for name, extra in (family.extras if family else {}).items():
        parts[name] = extra.num_bytes
    posthoc = family.posthoc if family else None
    if posthoc is not None:
        parts[f"{len(posthoc.emas)} post-hoc EMAs"] = sum(
            e.num_bytes for e in posthoc.emas.values())
    optimizer, how = _optimizer_bytes(getattr(trainer, "optimizer", None))
    parts[f"optimizer state ({how})"] = optimizer
    each = sum(parts.values())
    periodic = [h for h in getattr(trainer, "_hooks", []) if isinstance(h, PeriodicCheckpointer)]
    snapshots = 0
    if posthoc is not None and posthoc.writer.enabled and posthoc.snapshot_every:
        period = posthoc.snapshot_every
        count = max_iter // period + (max_iter % period != 0)
        snapshots = count * posthoc.writer.bytes_per_snapshot
    if not periodic and not snapshots:
        return None
    kept, total = "", snapshots
    if periodic and max_iter:
        hook = periodic[0]
        count = max_iter // hook.period
        keep = count if hook.max_to_keep is None else min(count, hook.max_to_keep)
        files = keep + 1  # and model_final
        total += files * each
        kept = (f"; {files} checkpoints kept (every {hook.period} iterations: "
                f"{'all' if hook.max_to_keep is None else f'the last {hook.max_to_keep}'} "
                f"of {count}, and model_final) = {_gb(files * each)}")
    folder = str(periodic[0].checkpointer.save_dir if periodic else posthoc.folder)  # type: ignore[union-attr]
    where = os.path.abspath(folder)
    while not os.path.exists(where) and where != os.path.dirname(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    detail = ", ".join(f"{name} {_gb(n)}" for name, n in parts.items())
    series = f"; post-hoc snapshots {_gb(snapshots)}" if posthoc is not None else ""
    return (f"disk use of this run: each checkpoint {_gb(each)} ({detail}){kept}{series}; "
            f"total {_gb(total)}, of {_gb(free)} free on the disk of {folder}")


def log_run_cost(trainer, model: nn.Module, ema: EMA) -> None:
    """`run_cost_line`, logged by the main process (``EMAHook.before_train``)."""
    from detectron2.utils import comm

    if trainer is not None and comm.is_main_process():
        line = run_cost_line(trainer, model, ema)
        if line:
            logger.info(line)


