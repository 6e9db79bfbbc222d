"""Speed benchmarks of d2ema, callable from Python and from ``d2ema bench``.

* `.update_speed`: one EMA update, d2ema against the memory-bandwidth floor, the seed
  article's loop, fused foreach baselines and the peer libraries (timm, ema-pytorch, torch-ema,
  ``AveragedModel``; each is timed where it is installed);
* `.train_step`: what users feel, detectron2 RetinaNet training iterations with and
  without EMA;
* `.timing`: the shared measurement rules (interleaved repetitions, medians of paired
  ratios, repetitions with a busy neighbour dropped).

``benchmarks/update_speed.py`` and ``benchmarks/train_step.py`` are thin command lines over
these modules; results go to ``benchmarks/results/``.

Example::

    from d2ema.app.speed import update_speed
    print(update_speed.run(["tiny500"], reps=20))
"""
