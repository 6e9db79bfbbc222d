"""Which config system a detectron2 config is: yacs (``MODEL_EMA.*``) or LazyConfig
(``train.model_ema``), and what the rest of this layer reads from it, asked in one place.

A yacs config (``get_cfg()``) has upper-case keys (``MODEL``, ``SOLVER``, ``OUTPUT_DIR``, the
seed's ``MODEL_EMA``); a LazyConfig has lower-case roots (``train``, ``model``, ``dataloader``)
and detrex's ``train.model_ema``. `ConfigView` answers the question once per config and
names every key the way the user writes it, so that a message says ``MODEL_EMA.DECAY`` to a yacs
user and ``train.model_ema.decay`` to a LazyConfig user. `is_lazy` answers it for a file.

Example::

    view = ConfigView.of(cfg)
    view.lazy                      # False for get_cfg()
    view.key("POSTHOC.PERIOD")     # "MODEL_EMA.POSTHOC.PERIOD" / "train.model_ema.posthoc.period"
    view.output_dir, view.max_iter, view.name("max_iter")   # "SOLVER.MAX_ITER" / "train.max_iter"

    if is_lazy(args.config_file):
        ...  # LazyConfig.load, train.model_ema
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ['ConfigView', 'is_lazy']


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


# The EMA keys' node: cfg.MODEL_EMA (yacs) or cfg.train.model_ema (LazyConfig).
_EMA_NODE = ("MODEL_EMA", "train.model_ema")


# What this layer reads besides the EMA keys: (yacs key, LazyConfig key, default).
_FIELDS: dict[str, tuple[str, str, Any]] = {
    "output_dir": ("OUTPUT_DIR", "train.output_dir", "./output"),
    "max_iter": ("SOLVER.MAX_ITER", "train.max_iter", None),
    "device": ("MODEL.DEVICE", "train.device", "cuda"),
    "weights": ("MODEL.WEIGHTS", "train.init_checkpoint", ""),
    "batch": ("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size", 0),
    "coco_instances": ("DATASETS.COCO_INSTANCES", "train.coco_instances", None),
}


def _get(node: Any, dotted: str, default: Any = None) -> Any:
    """``node[a][b]`` for ``"a.b"`` in a CfgNode, a DictConfig or a dict; ``default`` if absent."""
    for part in dotted.split("."):
        get = getattr(node, "get", None)
        if get is None:
            return default
        node = get(part, None)
        if node is None:
            return default
    return node


@dataclasses.dataclass(frozen=True)
class ConfigView:
    """A yacs or LazyConfig config as this layer reads it: which system (``lazy``), the key
    names the user writes (`key`, `name`) and the values (`output_dir`, ...).
    Built with `of`; the values are read from ``cfg`` when asked, so a change to the
    config (an evaluation's own output folder) is seen."""

    cfg: Any
    lazy: bool

    @classmethod
    def of(cls, cfg: Any) -> ConfigView:
        """The view of ``cfg``: yacs if it has detectron2's ``MODEL`` node, else LazyConfig."""
        return cls(cfg, lazy=not hasattr(cfg, "MODEL"))

    # ------------------------------------------------------------------ the EMA keys
    @property
    def prefix(self) -> str:
        """``"MODEL_EMA."`` or ``"train.model_ema."``: what every EMA key starts with."""
        return _EMA_NODE[self.lazy] + "."

    def key(self, name: str) -> str:
        """The key the user sets for the keys-table name ``name`` (``"POSTHOC.PERIOD"``):
        ``MODEL_EMA.POSTHOC.PERIOD`` or ``train.model_ema.posthoc.period``."""
        return self.prefix + (name.lower() if self.lazy else name)

    def has_ema_node(self) -> bool:
        """Whether the config has the EMA keys' node at all."""
        return _get(self.cfg, _EMA_NODE[self.lazy]) is not None

    def ema_node(self) -> Any:
        """``cfg.MODEL_EMA`` or ``cfg.train.model_ema`` (``{}`` when absent)."""
        node = _get(self.cfg, _EMA_NODE[self.lazy])
        return node if node is not None else {}

    def ema_value(self, name: str, default: Any = None) -> Any:
        """The raw value of the EMA key ``name`` (keys-table spelling), ``default`` if unset
        (a value set to None stays None)."""
        *parents, leaf = (name.lower() if self.lazy else name).split(".")
        node = self.ema_node()
        for part in parents:
            node = node.get(part, None) or {}
        return node.get(leaf, default)

    # ------------------------------------------------------------------ the rest of the config
    def name(self, field: str) -> str:
        """The key of ``field`` (``"output_dir"``, ``"max_iter"``, ``"device"``, ``"weights"``,
        ``"batch"``, ``"coco_instances"``) in this config system."""
        return _FIELDS[field][self.lazy]

    def get(self, field: str) -> Any:
        """The value of ``field`` (see `name`), or its default when unset."""
        default = _FIELDS[field][2]
        return _get(self.cfg, self.name(field), default)

    @property
    def output_dir(self) -> str:
        """``OUTPUT_DIR`` / ``train.output_dir`` (detectron2's ``./output`` when unset)."""
        return str(self.get("output_dir"))

    @property
    def max_iter(self) -> Any:
        """``SOLVER.MAX_ITER`` / ``train.max_iter`` as written (None when unset)."""
        return self.get("max_iter")

    @property
    def device(self) -> str:
        """``MODEL.DEVICE`` / ``train.device`` (LazyConfig default ``"cuda"``)."""
        return str(self.get("device"))

    @property
    def weights(self) -> str:
        """``MODEL.WEIGHTS`` / ``train.init_checkpoint`` (``""`` when unset)."""
        return str(self.get("weights") or "")

    @property
    def test_sets(self) -> tuple[str, ...]:
        """``DATASETS.TEST`` of a yacs config (a LazyConfig names its sets in
        ``dataloader.test``: ``()`` here)."""
        return () if self.lazy else tuple(self.cfg.DATASETS.TEST)

    @property
    def train_sets(self) -> tuple[str, ...]:
        """``DATASETS.TRAIN`` of a yacs config (``()`` for a LazyConfig)."""
        return () if self.lazy else tuple(self.cfg.DATASETS.TRAIN)
