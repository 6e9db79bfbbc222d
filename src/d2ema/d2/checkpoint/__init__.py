"""The EMA in detectron2 checkpoints: the checkpointers and checkpointables (`.checkpointers`),
what a checkpoint must satisfy before any of it is loaded (`.load_checks`), which
checkpoint a resume loads (`.resume`), detectron2's ``.pkl`` weights read as data
(`.pickles`) and the export of the EMA weights as a plain checkpoint (`.export`).

Example::

    from d2ema.d2 import EMACheckpointer, get_model_ema

    EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model)).load(path)
"""
