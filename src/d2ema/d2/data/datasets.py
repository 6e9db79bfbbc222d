"""Your own COCO-format datasets in detectron2, by name: registered once, checked before use.

``d2ema train --dataset NAME=ANNOTATIONS.json:IMAGE_DIR`` (repeatable) writes the same strings
into the run's config, ``DATASETS.COCO_INSTANCES`` (yacs) or ``train.coco_instances``
(LazyConfig), so ``OUTPUT_DIR/config.yaml`` resumes the run with no extra argument; a config may
also list them itself. Each becomes detectron2's ``register_coco_instances(NAME, {}, json,
images)``: ``evaluator_type="coco"``, so the default evaluator scores it with COCO AP.

`register_coco_dataset` is idempotent: registering the same name with the same files again
does nothing (a LazyConfig ``.py`` that registers its own data may be executed more than once),
while the same name with other files is refused. `check_datasets_known` turns detectron2's
``KeyError`` for an unknown name into a `DatasetError` that lists what is
registered and how to add a dataset.

Example::

    register_coco_dataset("my_train", "data/train.json", "data/images")    # in a LazyConfig
    # or: d2ema train --config-file cfg.yaml --dataset my_train=data/train.json:data/images
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from d2ema.d2.config.view import ConfigView
from d2ema.d2.data.coco_check import check_coco_file
from d2ema.errors import DatasetError

__all__ = [
    "FORMAT",
    "LAZY_KEY",
    "YACS_KEY",
    "CocoDataset",
    "add_dataset_config",
    "add_datasets_to_config",
    "check_datasets_known",
    "config_datasets",
    "dataset_names_in_config",
    "parse_coco_dataset",
    "register_coco_dataset",
    "register_config_datasets",
]


FORMAT = "NAME=ANNOTATIONS.json:IMAGE_DIR"


YACS_KEY = ConfigView(None, lazy=False).name("coco_instances")


LAZY_KEY = ConfigView(None, lazy=True).name("coco_instances")


_EXAMPLE = "my_train=data/annotations/train.json:data/images/train"


@dataclasses.dataclass(frozen=True)
class CocoDataset:
    """A COCO instances dataset: its name, annotation file and image folder (absolute)."""

    name: str
    json_file: str
    image_root: str

    def spec(self) -> str:
        """The ``NAME=ANNOTATIONS.json:IMAGE_DIR`` string it was parsed from (absolute paths)."""
        return f"{self.name}={self.json_file}:{self.image_root}"


def _split_files(rest: str) -> tuple[str, str]:
    """``ANNOTATIONS.json:IMAGE_DIR`` -> the two paths (a path may hold ':' elsewhere)."""
    at = rest.lower().find(".json:")
    if at >= 0:
        return rest[: at + 5], rest[at + 6 :]
    json_file, _, image_root = rest.rpartition(":")
    return json_file, image_root


def parse_coco_dataset(text: str, check_files: bool = True) -> CocoDataset:
    """Parse ``NAME=ANNOTATIONS.json:IMAGE_DIR``; paths become absolute (relative to the cwd).

    Raises `DatasetError` for a malformed string and, with ``check_files``, for an
    annotation file or image folder that does not exist.
    """
    name, _, rest = str(text).partition("=")
    json_file, image_root = _split_files(rest)
    name = name.strip()
    if not name or not json_file or not image_root:
        raise DatasetError(
            f"dataset {text!r} is not {FORMAT} (COCO instances json, then the folder its "
            f"file_names are relative to), e.g. {_EXAMPLE}"
        )
    json_path, image_path = Path(json_file).expanduser(), Path(image_root).expanduser()
    if check_files:
        if not json_path.is_file():
            raise DatasetError(f"dataset {name!r}: annotation file {json_path} does not exist; "
                               f"give {FORMAT}, e.g. {_EXAMPLE}")
        if not image_path.is_dir():
            raise DatasetError(f"dataset {name!r}: image folder {image_path} does not exist; "
                               f"give {FORMAT}, e.g. {_EXAMPLE}")
        check_coco_file(name, json_path)  # the JSON, every image and annotation
    return CocoDataset(name, os.path.abspath(json_path), os.path.abspath(image_path))


def _same_path(a: Any, b: Any) -> bool:
    return a is not None and b is not None and os.path.abspath(str(a)) == os.path.abspath(str(b))


def register_coco_dataset(
    name: str,
    json_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> bool:
    """``register_coco_instances`` that may be called again: True if it registered ``name``.

    The same name with the same files is already there: nothing to do (False). The same name
    with other files raises `DatasetError` (detectron2 cannot change a registered
    dataset in place).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        json_now, images_now = meta.get("json_file", None), meta.get("image_root", None)
        if _same_path(json_now, json_file) and _same_path(images_now, image_root):
            return False
        raise DatasetError(
            f"dataset {name!r} is already registered with other files (annotations "
            f"{json_now}, images {images_now}); give yours another name, or call "
            f"DatasetCatalog.remove({name!r}) and MetadataCatalog.remove({name!r}) first"
        )
    register_coco_instances(name, dict(metadata or {}), str(json_file), str(image_root))
    return True


# ----------------------------------------------------------------------------- configs
def _is_lazy(cfg) -> bool:
    return ConfigView.of(cfg).lazy


def add_dataset_config(cfg) -> None:
    """Add ``DATASETS.COCO_INSTANCES`` (an empty list) to a yacs config, if it lacks it."""
    if "COCO_INSTANCES" not in cfg.DATASETS:
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.DATASETS.COCO_INSTANCES = []
        if was_frozen:
            cfg.freeze()


def _entries(cfg) -> list[str]:
    if _is_lazy(cfg):
        train = cfg.get("train", None) or {}
        value = train.get("coco_instances", None) or []
    else:
        value = cfg.DATASETS.get("COCO_INSTANCES", None) or []
    if isinstance(value, str):
        value = [value]
    return [str(v) for v in value]


def config_datasets(cfg, check_files: bool = True) -> list[CocoDataset]:
    """The datasets a config lists in ``DATASETS.COCO_INSTANCES`` / ``train.coco_instances``."""
    found: dict[str, CocoDataset] = {}
    for text in _entries(cfg):
        ds = parse_coco_dataset(text, check_files=check_files)
        other = found.setdefault(ds.name, ds)
        if other != ds:
            key = LAZY_KEY if _is_lazy(cfg) else YACS_KEY
            raise DatasetError(f"dataset {ds.name!r} is given twice with different files in "
                               f"{key} ({other.spec()} and {ds.spec()}); keep one")
    return list(found.values())


def add_datasets_to_config(cfg, specs: Collection[str]) -> list[CocoDataset]:
    """Append ``--dataset`` strings to the config's list (absolute paths; duplicates once)."""
    if not specs:
        return config_datasets(cfg)
    new = [parse_coco_dataset(s).spec() for s in specs]
    merged = list(dict.fromkeys([*_entries(cfg), *new]))
    if _is_lazy(cfg):
        cfg.train.coco_instances = merged
    else:
        add_dataset_config(cfg)
        cfg.DATASETS.COCO_INSTANCES = merged
    return config_datasets(cfg)


def register_config_datasets(cfg) -> list[str]:
    """Register every dataset the config lists (idempotent); return their names."""
    datasets = config_datasets(cfg)
    for ds in datasets:
        register_coco_dataset(ds.name, ds.json_file, ds.image_root)
    return [ds.name for ds in datasets]


def _lazy_names(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(name, where) for every ``names=`` / ``dataset_name=`` argument in a LazyConfig."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key in ("names", "dataset_name"):
                values = [value] if isinstance(value, str) else value
                if isinstance(values, (list, tuple)):  # "${..}" points at a checked node
                    yield from ((v, where) for v in values
                                if isinstance(v, str) and not v.startswith("${"))
            else:
                yield from _lazy_names(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _lazy_names(value, f"{path}[{i}]")


def dataset_names_in_config(cfg, tests_only: bool = False) -> list[tuple[str, str]]:
    """(dataset name, config key) for the datasets a config trains or tests on (``tests_only``:
    tests on)."""
    if not _is_lazy(cfg):
        keys = ("TEST",) if tests_only else ("TRAIN", "TEST")
        found = [(n, f"DATASETS.{k}") for k in keys for n in cfg.DATASETS[k]]
        view = ConfigView.of(cfg)  # POSTHOC.SELECT_ON: a held-out set, evaluated
        if view.ema_value("POSTHOC.SELECT", False) and view.ema_value("POSTHOC.SELECT_ON", ""):
            found.append((view.ema_value("POSTHOC.SELECT_ON"), view.key("POSTHOC.SELECT_ON")))
        return found
    from omegaconf import DictConfig, OmegaConf

    container: Any = (OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig)
                      else cfg)
    names = _lazy_names(container.get("dataloader", {}), "dataloader")
    return [(n, where) for n, where in names
            if not tests_only or where.startswith(("dataloader.test", "dataloader.evaluator"))]


def _builtin(name: str) -> bool:
    """Whether detectron2 registered ``name`` itself (its files under $DETECTRON2_DATASETS)."""
    from detectron2.data import MetadataCatalog

    root = os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    meta = MetadataCatalog.get(name)
    for key in ("json_file", "image_root", "dirname", "image_dir", "gt_dir", "sem_seg_root"):
        value = meta.get(key, None)
        if isinstance(value, str) and os.path.abspath(value).startswith(root + os.sep):
            return True
    return False


def check_datasets_known(cfg, provided: Collection[str] = (), tests_only: bool = False) -> None:
    """Raise `DatasetError` for a dataset the config names (``tests_only``: tests on)
    that nobody provides.

    Known are the names registered in detectron2's ``DatasetCatalog``, those the config lists
    (``DATASETS.COCO_INSTANCES`` / ``train.coco_instances``) and ``provided`` (names a caller
    registers later, e.g. d2ema's embedded demo datasets).
    """
    from detectron2.data import DatasetCatalog

    registered = list(DatasetCatalog.list())
    listed = [ds.name for ds in config_datasets(cfg, check_files=False)]
    known = {*registered, *listed, *provided}
    for name, where in dataset_names_in_config(cfg, tests_only):
        if name in known:
            continue
        builtins = [n for n in registered if _builtin(n)]
        yours = [n for n in dict.fromkeys([*registered, *listed])
                 if n not in builtins and n not in provided]
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        demo = f"; d2ema's demo datasets: {', '.join(provided)}" if provided else ""
        key = LAZY_KEY if _is_lazy(cfg) else YACS_KEY
        raise DatasetError(
            f"unknown dataset {name!r} in {where}{hint}. Registered: yours: "
            f"{', '.join(yours) or 'none'}{demo}; detectron2's builtins ({len(builtins)}, files "
            f"under $DETECTRON2_DATASETS), e.g. {', '.join(builtins[:2]) or 'none'}. Add yours "
            f"(COCO format) with --dataset {name}=ANNOTATIONS.json:IMAGE_DIR, with the config "
            f"key {key}, or in code with d2ema.d2.register_coco_dataset (or detectron2's "
            "register_coco_instances)"
        )


def _missing_files(name: str) -> str | None:
    """The first file or folder a registered dataset's metadata names that is not there."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    for key in ("json_file", "image_root"):
        value = meta.get(key, None)
        if isinstance(value, str) and not os.path.exists(value):
            return value
    return None


def _names_advice(cfg, names: list[str]) -> str:
    """The overrides that point the config's training and test sets at ``names``."""
    train = [n for n in names if "train" in n.lower()] or names[:1]
    test = [n for n in names if n not in train]  # never the training set: its AP says little
    held_out = "" if test else (" (HELD_OUT: a set not trained on, added with --dataset "
                                "HELD_OUT=ANNOTATIONS.json:IMAGES)")
    test = test or ["HELD_OUT"]
    if _is_lazy(cfg):
        return (f"dataloader.train.dataset.names={','.join(train)} "
                f"dataloader.test.dataset.names={','.join(test)}{held_out}")
    as_tuple = lambda ns: "(" + "".join(f"'{n}'," for n in ns) + ")"  # noqa: E731
    return f'DATASETS.TRAIN "{as_tuple(train)}" DATASETS.TEST "{as_tuple(test)}"{held_out}'


def check_datasets_used(cfg, specs: Collection[str] = (), tests_only: bool = False) -> None:
    """Before training: raise `DatasetError` for a dataset the config names that is
    registered (one of detectron2's builtins, say ``coco_2017_train`` from a model-zoo
    ``_BASE_``) but whose files are not here, saying which override uses the ``--dataset``
    names (``specs``) instead; ``--dataset`` names the config does not use are warned about."""
    import logging

    from detectron2.data import DatasetCatalog

    given = [parse_coco_dataset(s, check_files=False).name for s in specs]
    used = dataset_names_in_config(cfg, tests_only)
    unused = [n for n in dict.fromkeys(given) if n not in {name for name, _ in used}]
    registered = set(DatasetCatalog.list()) - set(given)
    for name, where in used:
        missing = _missing_files(name) if name in registered else None
        if missing is None:
            continue
        fix = (f"name yours instead: {_names_advice(cfg, unused)}" if unused else
               f"register yours with --dataset NAME=ANNOTATIONS.json:IMAGE_DIR and name it in "
               f"{where}")
        raise DatasetError(
            f"the config's dataset {name!r} ({where}) is detectron2's builtin, whose file "
            f"{missing} is not here (set $DETECTRON2_DATASETS to where detectron2's datasets "
            f"are); {fix}")
    if unused:
        logging.getLogger(__name__).warning(
            "--dataset %s: the config does not use %s (it names %s); to use them: %s",
            ", ".join(unused), "it" if len(unused) == 1 else "them",
            ", ".join(dict.fromkeys(n for n, _ in used)) or "no dataset",
            _names_advice(cfg, unused))
