"""Evaluating a detectron2 model with its EMA: one default evaluator, one raw + EMA routine.

:func:`build_evaluator` is detectron2's ``tools/train_net.py`` choice by the dataset's
``evaluator_type`` (COCO for COCO-style datasets), with the fast COCO evaluation only where
detectron2's compiled ops exist (the v0.6 install here has a stand-in ``_C``). Everything in
d2ema that evaluates (``EMATrainer``, ``d2ema train``, the demo) uses it.

:func:`evaluate_with_ema` runs any ``test(model) -> results`` for the raw weights and inside
``ema.swapped(model)`` for the EMA, the latter's results under ``ema/``-prefixed keys, so
detectron2's ``EvalHook`` logs ``bbox/AP`` and ``ema/bbox/AP`` side by side.

Example::

    results = evaluate_with_ema(lambda m: inference_on_dataset(m, loader, evaluator),
                                model, ema, raw=True)
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_mean_
from ..ema import EMA
from ..health import nonfinite_message
from ..state import unwrap_model
from .eval_outputs import adapt_evaluator, evaluating_as, has_compiled_ops
from .family import get_extra_emas
from .safety import require_average

__all__ = [
    "EMA_PREFIX",
    "build_evaluator",
    "evaluate_extra_emas",
    "evaluate_with_ema",
    "has_compiled_ops",
    "precise_bn",
]

logger = logging.getLogger(__name__)

EMA_PREFIX = "ema/"


def build_evaluator(cfg: Any, dataset_name: str, output_folder: str | None = None) -> Any:
    """The evaluator for ``dataset_name``, chosen by its ``evaluator_type`` metadata.

    COCO-style datasets (``register_coco_instances`` sets ``evaluator_type="coco"``) get a
    ``COCOEvaluator``; sem_seg, panoptic, LVIS and Pascal VOC get detectron2's own. Raises
    ``NotImplementedError`` (detectron2's signal for "no evaluator") for anything else.
    """
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import (
        COCOEvaluator,
        DatasetEvaluators,
        LVISEvaluator,
        PascalVOCDetectionEvaluator,
        SemSegEvaluator,
    )

    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    evaluators = []
    if kind in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if kind in ("coco", "coco_panoptic_seg"):
        evaluators.append(
            COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops())
        )
    if kind == "lvis":
        return adapt_evaluator(LVISEvaluator(dataset_name, output_dir=output_folder))
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type {kind!r}); register it "
            "with detectron2's register_coco_instances, or override build_evaluator"
        )
    return adapt_evaluator(evaluators[0] if len(evaluators) == 1
                           else DatasetEvaluators(evaluators))


def precise_bn(model: nn.Module, batches: Iterable[Any], num_iter: int) -> None:
    """Recompute the BN statistics of the weights now in ``model`` from ``num_iter`` batches.

    In a multi-process job every rank runs it on its own batches and the statistics are then
    averaged over the ranks (a collective), so they come from every rank's batches and every
    rank ends with the same ones: what one process would get from all the batches.
    """
    from detectron2.utils.events import EventStorage
    from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

    model = unwrap_model(model)  # no DDP buffer broadcast from rank 0 in between
    was_training = model.training
    model.train()  # get_bn_modules lists BN layers in training mode only
    try:
        bn_layers = get_bn_modules(model)
        if not bn_layers:
            return
        # fvcore assigns new tensors to running_mean/var; write into the registered ones, so
        # that inside EMA.swapped() the statistics land in the EMA and the swap restores them
        own = [(bn, bn.running_mean, bn.running_var) for bn in bn_layers]
        with EventStorage():  # the model logs losses; discard them
            update_bn_stats(model, itertools.islice(iter(batches), num_iter), num_iter)
        with torch.no_grad():
            for bn, mean, var in own:
                mean.copy_(bn.running_mean)
                var.copy_(bn.running_var)
                bn.running_mean, bn.running_var = mean, var
        all_reduce_mean_([t for _, mean, var in own for t in (mean, var)])
    finally:
        model.train(was_training)


def evaluate_with_ema(
    test: Callable[[nn.Module], Mapping[str, Any] | None],
    model: nn.Module,
    ema: EMA | None,
    *,
    raw: bool = True,
    before_ema_test: Callable[[nn.Module], None] | None = None,
    prefix: str = EMA_PREFIX,
) -> OrderedDict:
    """``test(model)`` for the raw weights (if ``raw``, or if there is no EMA) and for the EMA.

    The EMA's results come under ``prefix`` (``ema/bbox``). ``before_ema_test`` runs inside
    the swap first, e.g. :func:`precise_bn` for the EMA weights. The trained weights are back
    in the model afterwards, also when a test raises. An EMA that was neither loaded nor
    updated raises :class:`~d2ema.errors.EMANotLoadedError` (it holds build-time weights).
    """
    if ema is not None:
        require_average(ema)  # before any evaluation runs
    results = OrderedDict()
    if raw or ema is None:
        if ema is not None:
            logger.info("Evaluating the raw (trained) weights: results without a prefix")
        with evaluating_as(""):
            results.update(test(model) or {})
    if ema is not None:
        logger.info("Evaluating the EMA weights: results under %s", prefix)
        if ema.nonfinite_step is not None:
            logger.warning(
                nonfinite_message(ema.nonfinite_step, "evaluating it", ema.nonfinite_after)
            )
        with ema.swapped(model), evaluating_as(prefix):
            if before_ema_test is not None:
                before_ema_test(model)
            ema_results = test(model) or {}
        results.update((f"{prefix}{k}", v) for k, v in ema_results.items())
    return results


def evaluate_extra_emas(test, model: nn.Module, before_ema_test=None) -> OrderedDict:
    """``test(model)`` with each extra EMA (:mod:`d2ema.d2.family`) swapped in, results under
    its name (``ema_0.99/bbox``)."""
    results = OrderedDict()
    for name, ema in get_extra_emas(model).items():
        results.update(evaluate_with_ema(test, model, ema, raw=False,
                                         before_ema_test=before_ema_test, prefix=f"{name}/"))
    return results
