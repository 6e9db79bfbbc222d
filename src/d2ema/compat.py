"""The seed article's / D2Go's / detrex's model-EMA API: see :mod:`d2ema.d2.compat`.

``from d2ema import compat as model_ema`` (was: ``from d2go.modeling import ema as model_ema``).
Importing it imports detectron2.
"""

from d2ema.d2.compat import *  # noqa: F403
from d2ema.d2.compat import __all__  # noqa: F401
