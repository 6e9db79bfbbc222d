"""Pickled weights (``.pkl``) read as data: arrays and containers, never code.

detectron2's model zoo ships ImageNet backbones (``R-50.pkl``) and Caffe2-converted models
(``model_final_*.pkl``) as pickles of dicts of numpy arrays, and its checkpointer reads them
with ``pickle.load``, which runs whatever a pickle asks for. `load_pickle` admits only
what such files hold (dicts, lists, tuples, sets, strings, bytes, numbers, ``OrderedDict``,
numpy arrays, dtypes and scalars) and refuses any other global with
`PickleRefusedError`, naming the file, the global and the opt-in.

Trusting a file to run code is an explicit choice: ``--trust-pickle`` on the command line, or
the environment variable ``D2EMA_TRUST_PICKLE=1`` (which the flag sets, so worker processes see
it too); then the file is read with plain ``pickle.load`` as detectron2 does.

Example::

    data = load_pickle("R-50.pkl")          # {"blobs": {...}} or {name: ndarray}
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from typing import Any

from d2ema.errors import PickleRefusedError

__all__ = ['TRUST_ENV', 'add_trust_pickle', 'load_pickle', 'trust_pickles', 'trusted']


TRUST_ENV = "D2EMA_TRUST_PICKLE"


_NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray")


_ALLOWED = {
    **{(m, n): True for m in _NUMPY for n in ("_reconstruct", "scalar")},
    **{(m, "_frombuffer"): True for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): True,
    ("numpy", "dtype"): True,
    ("collections", "OrderedDict"): True,
    ("_codecs", "encode"): True,  # how protocol 2 writes bytes from Python 3
    **{(m, n): True for m in ("builtins", "__builtin__")
       for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                 "str", "bytes", "bytearray", "bool", "long", "unicode")},
}


def trusted() -> bool:
    """Whether the user opted in to unpickling any file (``--trust-pickle``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def trust_pickles(enabled: bool = True) -> Iterator[None]:
    """Within the block, opt in for this process and the workers it starts (what
    ``--trust-pickle`` does); the environment is restored after it."""
    before = os.environ.get(TRUST_ENV)
    if enabled:
        os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = before


def add_trust_pickle(parser) -> None:
    """Add ``--trust-pickle`` to an ``argparse`` parser (``d2ema train``, ``d2ema posthoc``)."""
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load .pkl weights with plain pickle, which can run code: only for "
                        "files you trust (default: arrays and containers only)")


class _Restricted(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise PickleRefusedError(
            f"{self.path} is a pickle that asks for {module}.{name}, which weights (arrays in "
            "dicts) never need: unpickling it could run code, so it is not loaded. Use a .pth "
            f"file, or if you trust this file pass --trust-pickle (or set {TRUST_ENV}=1)")


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """The content of a pickled weights file; `PickleRefusedError` for anything beyond
    arrays and containers unless `trusted`."""
    with open(path, "rb") as f:
        if trusted():
            return pickle.load(f, encoding="latin1")
        return _Restricted(f, str(path)).load()
