"""The application behind the ``d2ema`` command: the demo, its embedded datasets (``data``),
plots, small model configs and the update-speed benchmark. Built on `d2ema.d2`; nothing in
the library imports it."""
