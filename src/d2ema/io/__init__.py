"""Files, as the core reads and writes them: the EMA's checkpoint format, writes that are
complete or absent, pickles read as data, paths kept inside their folder, and signals turned into
exceptions so that a write's ``finally`` runs.

* `format`: the one place that knows the ``ema_state`` / ``ema_meta`` keys;
* `atomic`: complete-or-absent writes (``atomic_save``, ``atomic_write_text``);
* `safe_pickle`: ``.pkl`` read through a restricted unpickler;
* `confined`: a path a file names, kept inside the folder it belongs to;
* `interrupts`: SIGTERM / SIGHUP as exceptions.
"""
