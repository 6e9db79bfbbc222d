"""The torch versions d2ema is tested with, and the check that says which one a feature needs.

``pip install d2ema`` asks for ``torch>=2.13`` (the oldest torch the tests ran on: the core's
tests on 2.13.0, the whole suite on 2.14.1). An environment can still hold an older torch (a
``--no-deps`` install, a pinned image): importing d2ema works there, and building an EMA says in
one line which version it needs instead of failing somewhere inside torch.

Example::

    from d2ema.versions import require_torch
    require_torch("FSDP2 support")        # TorchVersionError below the tested floor
"""

from __future__ import annotations

import re

import torch

from d2ema.errors import D2EMAError

__all__ = ["TORCH_FLOOR", "TorchVersionError", "require_torch", "torch_version"]

TORCH_FLOOR = (2, 13)  # keep in step with pyproject.toml's dependencies and docs/install.md


class TorchVersionError(D2EMAError):
    """The installed torch is older than what a feature needs."""


def torch_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed torch (``"2.14.1+cpu"`` -> ``(2, 14)``)."""
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def require_torch(feature: str, minimum: tuple[int, int] = TORCH_FLOOR) -> None:
    """Raise :class:`TorchVersionError` naming ``feature`` and ``minimum`` if torch is older."""
    if torch_version() < minimum:
        need = ".".join(map(str, minimum))
        raise TorchVersionError(
            f"{feature} needs torch >= {need} (the oldest version d2ema is tested with); this "
            f"is torch {torch.__version__}: pip install 'torch>={need}'")
