"""Training with EMA in detectron2: building the EMAs of a model (`.build`), the hook that
updates them (`.hooks`), the trainer (`.trainer`), ``launch`` with a CPU mode
(`.launch`), what ``d2ema train`` runs (`.train_net`) and the run folder it writes:
its checks, lock, log and full-disk handling (`.run_folder`).

Example::

    from d2ema.d2 import EMATrainer   # re-exported from d2ema.d2.engine.trainer

    trainer = EMATrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
"""
