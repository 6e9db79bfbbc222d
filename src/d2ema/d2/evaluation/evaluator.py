"""Evaluating a detectron2 model with its EMA: one default evaluator, one raw + EMA routine,
each set of weights writing its own files, and no EMA evaluated that holds only its build-time
weights.

`build_evaluator` is detectron2's ``tools/train_net.py`` choice by the dataset's
``evaluator_type`` (COCO for COCO-style datasets), with the fast COCO evaluation only where
detectron2's compiled ops exist (the v0.6 install here has a stand-in ``_C``). Everything in
d2ema that evaluates (``EMATrainer``, ``d2ema train``, the demo) uses it.

`evaluate_with_ema` runs any ``test(model) -> results`` for the raw weights and inside
``ema.swapped(model)`` for the EMA, the latter's results under ``ema/``-prefixed keys, so
detectron2's ``EvalHook`` logs ``bbox/AP`` and ``ema/bbox/AP`` side by side.

Example::

    results = evaluate_with_ema(lambda m: inference_on_dataset(m, loader, evaluator),
                                model, ema, raw=True)


Evaluators as d2ema runs them: each set of weights writes its own files, and the fast COCO
evaluation is used only where detectron2's compiled ops exist.

detectron2's evaluators write into one folder (``OUTPUT_DIR/inference``), so the EMA's
evaluation would overwrite the raw weights' ``coco_instances_results.json``. Inside
`evaluating_as`, `adapt_evaluator` moves an evaluator's folder to
``inference_ema`` (``inference_ema_0.99`` for an extra EMA): the raw weights keep
``inference``. It also turns a ``COCOEvaluator``'s fast implementation off where detectron2 was
installed without compiled ops (its stand-in ``_C``), with a one-line notice, instead of
failing with ``MissingCompiledOp`` at the first evaluation with detections, after training:
a ``train_net.py`` copied from detectron2 and the model zoo's LazyConfigs use the fast one.

Example::

    with evaluating_as("ema/"):
        evaluator = adapt_evaluator(Trainer.build_evaluator(cfg, "my_val"))

`require_average` refuses to evaluate an EMA that was neither loaded nor updated: it holds
the weights the model had when it was built (random, in detectron2's eval-only pattern, whose
plain ``DetectionCheckpointer`` loads the model but not ``ema_state``).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from d2ema.averaging.health import NONFINITE_FIX, nonfinite_message
from d2ema.averaging.state import unwrap_model
from d2ema.d2.config.keys import named_in_config
from d2ema.d2.config.view import ConfigView
from d2ema.d2.family import get_extra_emas, get_settings
from d2ema.distributed import all_reduce_mean_
from d2ema.ema import EMA
from d2ema.errors import EMANotLoadedError, NoEvaluatorError

__all__ = [
    "EMA_PREFIX",
    "adapt_evaluator",
    "build_evaluator",
    "evaluate_extra_emas",
    "evaluate_with_ema",
    "evaluating_as",
    "has_compiled_ops",
    "output_suffix",
    "precise_bn",
    "python_coco_eval",
    "require_average",
]


def require_average(ema: EMA) -> None:
    """Raise `EMANotLoadedError` if ``ema`` holds only the weights it was built from."""
    if getattr(ema, "provenance", "updated") != "built":
        return
    raise EMANotLoadedError(
        "the model's EMA was neither loaded from a checkpoint nor updated by training: it holds "
        "the weights the model had when it was built, so it is not evaluated as 'ema/...'. A "
        "plain DetectionCheckpointer loads the model but not its EMA ('ema_state'); load both "
        "with d2ema.d2.EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model))"
        ".load(path) (resume_or_load(path, resume=False) loads the model only), or evaluate the "
        "raw weights with MODEL_EMA.ENABLED False"
    )


logger = logging.getLogger(__name__)


_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("d2ema_eval_label", default="")


_NOTICED: set[str] = set()


def has_compiled_ops() -> bool:
    """Whether detectron2's C++/CUDA ops are built (not d2ema's stand-in ``_C`` module)."""
    try:
        import detectron2._C as compiled
    except ImportError:
        return False
    return not getattr(compiled, "D2EMA_STUB", False)


def output_suffix(label: str) -> str:
    """``"ema/"`` -> ``"_ema"``, ``"ema_0.99/"`` -> ``"_ema_0.99"``, ``""`` -> ``""``."""
    label = label.strip("/")
    return "_" + label.replace("/", "_") if label else ""


@contextlib.contextmanager
def evaluating_as(label: str) -> Iterator[None]:
    """Evaluators adapted inside write into their folder + `output_suffix` (label)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def _notice(key: str, message: str) -> None:
    if key not in _NOTICED:
        _NOTICED.add(key)
        logger.warning(message)


def _leaves(evaluator: Any) -> Iterator[Any]:
    inner = getattr(evaluator, "_evaluators", None)  # DatasetEvaluators
    if isinstance(inner, (list, tuple)):
        for e in inner:
            yield from _leaves(e)
    else:
        yield evaluator


def adapt_evaluator(evaluator: Any) -> Any:
    """The same ``evaluator``, its output folder for the weights now evaluated
    (`evaluating_as`) and its COCO evaluation in Python where compiled ops are missing."""
    from detectron2.evaluation import COCOEvaluator

    suffix = output_suffix(_LABEL.get())
    for e in _leaves(evaluator):
        if isinstance(e, COCOEvaluator) and getattr(e, "_use_fast_impl", False) and (
                not has_compiled_ops()):
            e._use_fast_impl = False
            _notice("fast", "detectron2's compiled ops are not installed: COCO evaluation uses "
                    "the Python implementation (COCOEvaluator use_fast_impl=False; same AP, "
                    "slower)")
        if not isinstance(getattr(e, "_output_dir", None), str):
            continue
        base = getattr(e, "_d2ema_output_dir", None) or e._output_dir.rstrip("/\\")
        e._d2ema_output_dir = base
        e._output_dir = base + suffix
    return evaluator


def python_coco_eval(cfg: Any) -> None:
    """Before training: a LazyConfig whose ``dataloader.evaluator`` is a ``COCOEvaluator``
    with the fast implementation gets ``use_fast_impl=False`` where compiled ops are missing."""
    node = cfg.get("dataloader", {}).get("evaluator", None) if ConfigView.of(cfg).lazy else None
    if node is None or has_compiled_ops():
        return
    target = node.get("_target_", None) if hasattr(node, "get") else None
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    from detectron2.evaluation import COCOEvaluator

    is_coco = isinstance(target, type) and issubclass(target, COCOEvaluator)
    if (is_coco or str(name).endswith("COCOEvaluator")) and node.get("use_fast_impl", True):
        node.use_fast_impl = False
        logger.warning("detectron2's compiled ops are not installed: dataloader.evaluator "
                "uses the Python COCO evaluation (use_fast_impl=False; same AP, slower)")


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
        raise NoEvaluatorError(
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
    the swap first, e.g. `precise_bn` for the EMA weights. The trained weights are back
    in the model afterwards, also when a test raises. An EMA that was neither loaded nor
    updated raises `EMANotLoadedError` (it holds build-time weights).
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
            settings = get_settings(model)
            logger.warning(
                nonfinite_message(ema.nonfinite_step, "evaluating it", ema.nonfinite_after)
                + named_in_config(NONFINITE_FIX, settings.key if settings else None)
            )
        with ema.swapped(model), evaluating_as(prefix):
            if before_ema_test is not None:
                before_ema_test(model)
            ema_results = test(model) or {}
        results.update((f"{prefix}{k}", v) for k, v in ema_results.items())
    return results


def evaluate_extra_emas(test, model: nn.Module, before_ema_test=None) -> OrderedDict:
    """``test(model)`` with each extra EMA (`d2ema.d2.engine.build`) swapped in, results under
    its name (``ema_0.99/bbox``)."""
    results = OrderedDict()
    for name, ema in get_extra_emas(model).items():
        results.update(evaluate_with_ema(test, model, ema, raw=False,
                                         before_ema_test=before_ema_test, prefix=f"{name}/"))
    return results
