"""Evaluation with EMA: raw and EMA weights evaluated side by side, each with its own output
folder (`.evaluator`), the end-of-training choice of the EMA length
(``MODEL_EMA.POSTHOC.SELECT``, `.select`) and its report (`.report`), and the scoring
of a finished run's other weights (`.run_eval`).

Example::

    from d2ema.d2 import evaluate_with_ema

    results = evaluate_with_ema(cfg, model, evaluators)   # {"bbox": ..., "ema/bbox": ...}
"""
