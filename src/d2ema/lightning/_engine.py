"""The one place where the Lightning front end reaches below d2ema's public API.

Each name here is an internal helper of the core; when the core moves it, this file is the only
one to re-point.

Example::

    from ._engine import atomic_save
    atomic_save({"state_dict": weights}, "out/ema_weights.pth")   # complete or absent
"""

from __future__ import annotations

from d2ema.io.atomic import atomic_save, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_text"]
