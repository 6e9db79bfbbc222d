"""Pieces of test_d2_posthoc_select.py that must be importable in other processes (``d2ema
train --num-gpus 2`` spawns its workers; a SIGKILLed child runs a script).

A tiny model trained for a few iterations makes no detections, so every COCO AP is 0 and every
choice a tie. :func:`weight_score` keeps the real (distributed) evaluation but scores each
weight set by a number computed from the weights every process holds, gathered from all of
them: the choice then depends on the weights, and a process that did not receive the main
process's weights would change it.
"""

from __future__ import annotations

import math


def _fingerprint(model) -> float:
    from d2ema.averaging.state import unwrap_model

    return float(sum(p.detach().double().sum() for p in unwrap_model(model).parameters()))


def weight_score(cfg) -> None:
    """``prepare`` for train_main: patch the selection's evaluation (see the module docstring)."""
    from detectron2.utils import comm

    from d2ema.d2.evaluation import select as posthoc_select

    real = posthoc_select._evaluate
    if getattr(real, "_weight_score", False):
        return

    def evaluate(trainer, dataset, label):
        real(trainer, dataset, label)  # the collectives of a real evaluation, on every rank
        prints = comm.all_gather(_fingerprint(trainer.model))
        if not comm.is_main_process():
            return {}
        mean = sum(prints) / len(prints)
        ap = 100 * (0.5 + 0.5 * math.sin(1e4 * mean))  # any length may win
        return {"bbox": {"AP": ap, "AP50": ap}}

    evaluate._weight_score = True
    posthoc_select._evaluate = evaluate
