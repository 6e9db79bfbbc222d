"""The errors of the Lightning front end; both are `d2ema.errors.D2EMAError`.

Example::

    try:
        import d2ema.lightning
    except LightningMissingError as e:      # also an ImportError
        print(e)                            # ... pip install 'd2ema[lightning]'
"""

from __future__ import annotations

from d2ema.errors import D2EMAError

__all__ = ["LightningEMAError", "LightningMissingError"]


class LightningMissingError(D2EMAError, ImportError):
    """``d2ema.lightning`` imported where Lightning is not installed."""


class LightningEMAError(D2EMAError):
    """A Lightning setup the EMA callback cannot work with (strategy, checkpoint, selection);
    the message names what to do instead."""
