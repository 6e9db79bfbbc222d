"""The EMA in detectron2 checkpoints: the checkpointers and checkpointables (:mod:`.checkpointers`),
what a checkpoint must satisfy before any of it is loaded (:mod:`.load_checks`), which
checkpoint a resume loads (:mod:`.resume`), detectron2's ``.pkl`` weights read as data
(:mod:`.pickles`) and the export of the EMA weights as a plain checkpoint (:mod:`.export`).

Example::

    from d2ema.d2 import EMACheckpointer, get_model_ema

    EMACheckpointer(model, cfg.OUTPUT_DIR, ema=get_model_ema(model)).load(path)
"""
