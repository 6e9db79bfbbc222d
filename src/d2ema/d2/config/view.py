"""Which config system a detectron2 config is: yacs (``MODEL_EMA.*``) or LazyConfig
(``train.model_ema``).

Example::

    if is_lazy(args.config_file):
        ...  # LazyConfig.load, train.model_ema
"""

from __future__ import annotations

import re

__all__ = ['is_lazy']


_LAZY_ROOTS = ("train", "model", "dataloader")


def is_lazy(path: str) -> bool:
    """A LazyConfig: a ``.py``, or the ``config.yaml`` detectron2 saved for one (top-level
    keys such as ``train:``, ``model:``, and no upper-case yacs keys)."""
    if str(path).endswith(".py"):
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return False
    roots = re.findall(r"^([A-Za-z_]\w*)\s*:", text, flags=re.MULTILINE)
    return any(r in _LAZY_ROOTS for r in roots) and not any(r.isupper() for r in roots)
