"""Evaluators as d2ema runs them: each set of weights writes its own files, and the fast COCO
evaluation is used only where detectron2's compiled ops exist.

detectron2's evaluators write into one folder (``OUTPUT_DIR/inference``), so the EMA's
evaluation would overwrite the raw weights' ``coco_instances_results.json``. Inside
:func:`evaluating_as`, :func:`adapt_evaluator` moves an evaluator's folder to
``inference_ema`` (``inference_ema_0.99`` for an extra EMA): the raw weights keep
``inference``. It also turns a ``COCOEvaluator``'s fast implementation off where detectron2 was
installed without compiled ops (its stand-in ``_C``), with a one-line notice, instead of
failing with ``MissingCompiledOp`` at the first evaluation with detections, after training:
a ``train_net.py`` copied from detectron2 and the model zoo's LazyConfigs use the fast one.

Example::

    with evaluating_as("ema/"):
        evaluator = adapt_evaluator(Trainer.build_evaluator(cfg, "my_val"))
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

__all__ = [
    "adapt_evaluator",
    "evaluating_as",
    "has_compiled_ops",
    "output_suffix",
    "python_coco_eval",
]

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
    """Evaluators adapted inside write into their folder + :func:`output_suffix` (label)."""
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
    (:func:`evaluating_as`) and its COCO evaluation in Python where compiled ops are missing."""
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
    node = cfg.get("dataloader", {}).get("evaluator", None) if hasattr(cfg, "get") else None
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
