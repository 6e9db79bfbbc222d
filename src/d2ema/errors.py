"""The errors d2ema raises for a user's mistake, all under one base class.

Every error a user can fix (a config value, a checkpoint that does not fit, a file that cannot
be read or written) derives from `D2EMAError`, and its message names the problem and
the fix. The command line prints any of them as one line and exits with status 2; anything
else is a bug and shows its traceback.

Example::

    try:
        ema.load_state_dict(torch.load(path))
    except D2EMAError as e:          # EMAStateError: nothing was changed
        print(f"cannot resume: {e}")
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "D2EMAError",
    "DatasetError",
    "EMANotBuiltError",
    "EMANotLoadedError",
    "EMAStateError",
    "ExportError",
    "NoEvaluatorError",
    "OutsideFolderError",
    "PickleRefusedError",
    "ReservedAttributeError",
    "RunLockedError",
    "TrainerError",
    "UsageError",
    "one_line",
]


class D2EMAError(Exception):
    """Base class of every user-facing d2ema error.

    ``parameters``: the core parameters the message tells the user to change, as
    ``"Class.parameter"`` (``"PostHocEMA.snapshot_every"``). The core names only its own
    parameters; a front end that sets them from its own config adds its key names beside them
    (the detectron2 layer: `d2ema.d2.config.keys.named_in_config`).

    Example::

        raise PostHocError("... set PostHocEMA(snapshot_every=...) larger",
                           parameters=("PostHocEMA.snapshot_every",))
    """

    parameters: tuple[str, ...] = ()

    def __init__(self, *args: object, parameters: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        if parameters:
            self.parameters = tuple(parameters)


class EMAStateError(D2EMAError, ValueError):
    """A state dict or checkpoint that does not fit this EMA; nothing was changed."""


class ConfigError(D2EMAError, ValueError):
    """An EMA config value that cannot work; the message names key, value and allowed range."""


class ExportError(D2EMAError, ValueError):
    """A checkpoint that cannot be exported, or an output that cannot be written."""


class CheckpointError(D2EMAError):
    """A checkpoint file that cannot be read (truncated, not a PyTorch file) or resumed from."""


class UsageError(D2EMAError):
    """A command-line input that cannot work (missing file, bad override, unknown dataset)."""


class DatasetError(D2EMAError, ValueError):
    """A dataset that is not registered, or cannot be registered as given."""


class EMANotLoadedError(D2EMAError, RuntimeError):
    """Asked to evaluate an EMA that holds no average: it was neither loaded nor updated."""


class TrainerError(D2EMAError, TypeError):
    """A trainer class put together so that it would train without its EMA."""


class OutsideFolderError(D2EMAError, ValueError):
    """A file a run folder names (``index.json``, ``last_checkpoint``) that lies outside it."""


class PickleRefusedError(D2EMAError):
    """A pickled weights file that asks for more than arrays and containers (it could run code)."""


class RunLockedError(D2EMAError):
    """Another process is training into the same OUTPUT_DIR."""


class EMANotBuiltError(D2EMAError, AttributeError):
    """The model has no EMA attached (``model.ema_state``): build it first. An AttributeError
    too, as D2Go raised."""


class ReservedAttributeError(D2EMAError, ValueError):
    """The model already has the attribute the EMA is attached as (``ema_state``)."""


class NoEvaluatorError(D2EMAError, NotImplementedError):
    """No evaluator for a dataset. A NotImplementedError too, which detectron2's
    ``DefaultTrainer.test`` catches to skip the dataset, as for its own ``build_evaluator``."""


def one_line(message: object) -> str:
    """``message`` with its lines joined by ``"; "`` (by a space after a line ending in ``:``):
    how the command line prints errors."""
    lines = [part.strip() for part in str(message).splitlines() if part.strip()]
    out = ""
    for line in lines:
        out += (" " if out.endswith(":") else "; " if out else "") + line
    return out or "error"
