"""Training with EMA in detectron2: building the EMAs of a model (:mod:`.build`), the hook that
updates them (:mod:`.hooks`), the trainer (:mod:`.trainer`), ``launch`` with a CPU mode
(:mod:`.launch`), what ``d2ema train`` runs (:mod:`.train_net`) and the run folder it writes:
its checks, lock, log and full-disk handling (:mod:`.run_folder`).

Example::

    from d2ema.d2 import EMATrainer   # re-exported from d2ema.d2.engine.trainer

    trainer = EMATrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
"""
