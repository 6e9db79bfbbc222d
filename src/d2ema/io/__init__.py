"""Files, as the core reads and writes them: the EMA's checkpoint format, writes that are
complete or absent, pickles read as data, paths kept inside their folder, and signals turned into
exceptions so that a write's ``finally`` runs.

* :mod:`~d2ema.io.format`: the one place that knows the ``ema_state`` / ``ema_meta`` keys;
* :mod:`~d2ema.io.atomic`: complete-or-absent writes (``atomic_save``, ``atomic_write_text``);
* :mod:`~d2ema.io.safe_pickle`: ``.pkl`` read through a restricted unpickler;
* :mod:`~d2ema.io.confined`: a path a file names, kept inside the folder it belongs to;
* :mod:`~d2ema.io.interrupts`: SIGTERM / SIGHUP as exceptions.
"""
