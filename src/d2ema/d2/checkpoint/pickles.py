"""detectron2's ``.pkl`` weights (model zoo, Caffe2 / Detectron1) read without running code.

`load_pkl_weights` is ``DetectionCheckpointer._load_file`` for ``.pkl`` files, with
`d2ema.io.safe_pickle.load_pickle` in place of ``pickle.load``: the same dict comes out
(``{"model": ..., "__author__": ..., "matching_heuristics": ...}``), and a pickle that asks for
anything beyond arrays and containers is refused in one line (unless ``--trust-pickle``).

Example::

    checkpoint = load_pkl_weights("R-50.pkl")     # {"model": {name: ndarray}, ...}
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from d2ema.errors import CheckpointError
from d2ema.io.safe_pickle import load_pickle, trusted

__all__ = ['load_pkl_weights']


logger = logging.getLogger(__name__)


_UNREADABLE = (pickle.UnpicklingError, ValueError, EOFError, ImportError, IndexError, KeyError,
               TypeError, AttributeError, MemoryError)


def _weights(path: str, data: Any) -> None:
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of weights")
    if trusted():
        return
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, (np.ndarray, np.generic,
                                                               int, float)):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not an "
                                  "array; it is not a detectron2 weights file")


def load_pkl_weights(path: str) -> dict[str, Any]:
    """A ``.pkl`` weights file as detectron2's checkpointer returns it; see the module doc."""
    try:
        data = load_pickle(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from e
    except _UNREADABLE as e:
        raise CheckpointError(f"checkpoint {path} is not a readable pickle ({type(e).__name__}); "
                              "pass a detectron2 .pkl or a .pth checkpoint") from e
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of weights")
    if "model" in data and "__author__" in data:  # detectron2 model zoo format
        _weights(path, data["model"])
        logger.info("Reading a file from '%s'", data["__author__"])
        return dict(data)
    if "blobs" in data:  # Caffe2 / Detectron1: detection models have "blobs"
        data = data["blobs"]
    _weights(path, data)
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
