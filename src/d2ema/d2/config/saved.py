"""A run folder's saved ``config.yaml``: read as data, never as code, and written plain for
detectron2 without d2ema.

**Read as data.** detectron2 treats the config file a user writes as code: a YAML config (or its
``_BASE_``) may hold ``!!python/object/apply:eval`` values and a LazyConfig ``.py`` runs when it is
loaded; d2ema keeps that. The ``config.yaml`` that ``default_setup`` saves into a run's OUTPUT_DIR
is another matter: commands that read a run folder (``d2ema posthoc RUN --eval``, ``d2ema train
--config-file RUN/config.yaml --resume``) must not let whoever could edit that folder run code.

A config is *a run's saved config* when it is named ``config.yaml`` and its folder holds what a
training writes there (``last_checkpoint``, ``model_*.pth``, ``ema_snapshots/``,
``metrics.json``, ``log.txt``): what d2ema itself writes, found without reading the config. Such
a file is read by one function, `read_saved_config`, whatever the command: a regular file
of bounded size, YAML of bounded depth whose aliases are counted (an alias bomb is refused before
anything is expanded), Python tags only for what ``LazyConfig.save`` writes (``!!python/tuple``;
``!!python/name:`` and ``functools.partial`` of a class or function; detectron2's data classes
such as ``ShapeSpec``), no ``_BASE_`` (a saved config is complete). Every ``!!python/name:`` and
``_target_`` is resolved to the object without calling it and admitted only if that object is
*defined* in the libraries a training config builds from (detectron2's model, data, solver and
evaluation parts, ``torch.nn``, ``torch.optim``, fvcore's schedulers, d2ema's model configs and
datasets): ``detectron2.data.datasets.coco.os.system`` passes through the module ``os`` and is
refused. A saved LazyConfig is then built from that data (`load_saved_lazy`), so
detectron2's own loader (``yaml.unsafe_load``) never reads it.

For example::

    if is_run_config(path):
        check_saved_config(path)       # UsageError for a Python tag; nothing executed

**Written plain.** A d2ema run's ``OUTPUT_DIR/config.yaml`` holds ``MODEL_EMA`` (and
``DATASETS.COCO_INSTANCES`` when ``--dataset`` was used), which plain detectron2 refuses
("Non-existent config key"); that file stays as it is, for d2ema to resume from.
`write_plain_config` writes a copy without d2ema's keys whose ``MODEL.WEIGHTS`` is the
exported file, so that ``get_cfg()`` + ``merge_from_file`` (or ``tools/train_net.py --eval-only``)
runs the EMA weights with no d2ema installed. A LazyConfig's saved ``config.yaml`` loses
``train.model_ema`` / ``train.coco_instances`` and gets ``train.init_checkpoint``.

Example::

    config = find_run_config("output/model_final.pth")     # output/config.yaml, if any
    write_plain_config(config, "model_ema.yaml", weights="model_ema.pth")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from d2ema.errors import D2EMAError, ExportError, UsageError
from d2ema.io.atomic import atomic_write_text
from d2ema.io.confined import escapes, read_regular

__all__ = [
    "check_saved_config",
    "find_run_config",
    "is_run_config",
    "load_saved_lazy",
    "plain_config_path",
    "plain_config_text",
    "plain_output_dir",
    "read_saved_config",
    "write_plain_config",
]


_RUN_FILES = ("last_checkpoint", "ema_snapshots", "metrics.json", "log.txt")


_PACKAGES = ("detectron2.modeling", "detectron2.layers", "detectron2.data",
             "detectron2.evaluation", "detectron2.solver", "detectron2.structures",
             "torch.nn", "torch.optim", "fvcore.common.param_scheduler",
             "d2ema.app.model_configs", "d2ema.d2.data.datasets", "torchvision.transforms")
"""Where a saved config's ``_target_`` / ``!!python/name`` objects may be *defined*."""

_DATA_CLASSES = ("detectron2.layers.shape_spec.ShapeSpec",)
"""detectron2's data classes ``LazyConfig.save`` writes as Python objects, rebuilt from plain
field values (``!!python/object/new:`` for v0.6's namedtuple, ``!!python/object:`` for the
dataclass of detectron2 main)."""

_MAX_BYTES = 4 << 20
_MAX_DEPTH = 64
_MAX_NODES = 100_000


_EXCLUDED = ("detectron2.data.datasets",)
"""Parts of `_PACKAGES` that build nothing a config needs and act on the world when
called: ``register_*`` change the process's dataset catalog, ``convert_to_coco_json`` writes a
file wherever it is told (a run's config.yaml would write outside the run)."""


def _allowed(name: str) -> bool:
    def under(p: str) -> bool:
        return name == p or name.startswith(p + ".")
    return any(map(under, _PACKAGES)) and not any(map(under, _EXCLUDED))


class _NotAllowed(D2EMAError):
    """Why `_resolve` refuses a dotted path; the caller words it with the file and the key."""


def _resolve(path: object) -> object:
    """The object a dotted ``path`` names, found without calling anything it names: modules are
    imported only inside `_PACKAGES` (and their parents), attributes walked after that.
    Raises `_NotAllowed` (the reason) for a path through a module outside the list, a private
    or dunder step, or an object not defined in the list (``detectron2.data.datasets.coco.os.
    system`` is ``os.system``: refused)."""
    import importlib
    import inspect

    if not isinstance(path, str) or not path or not all(p.isidentifier() for p in
                                                        path.split(".")):
        raise _NotAllowed("is not a dotted name")
    parts = path.split(".")
    obj: object = None
    i = 0
    while i < len(parts):
        name = ".".join(parts[:i + 1])
        if _allowed(name):
            try:
                obj = importlib.import_module(name)
            except ImportError:
                if obj is None:
                    raise _NotAllowed("cannot be imported") from None
                break
        elif any(p.startswith(name + ".") for p in _PACKAGES):
            pass  # a parent of an allowed package (torch, detectron2): imported with it
        else:
            break
        i += 1
    if obj is None:
        raise _NotAllowed("is outside the allowed packages")
    for part in parts[i:]:
        if part.startswith("__"):
            raise _NotAllowed(f"walks the special attribute {part!r}")
        try:
            obj = inspect.getattr_static(obj, part) if not inspect.ismodule(obj) else getattr(
                obj, part)
        except AttributeError:
            raise _NotAllowed("does not exist") from None
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if inspect.ismodule(obj) and not _allowed(obj.__name__):
            raise _NotAllowed(f"passes through the module {obj.__name__}, outside the allowed "
                             "packages")
    if inspect.ismodule(obj) or not callable(obj):
        raise _NotAllowed("is not a class or function")
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not _allowed(module):
        raise _NotAllowed(f"is defined in {module}, outside the allowed packages")
    return obj


class _Loader(yaml.SafeLoader):
    """Safe YAML plus ``!!python/tuple``, which ``LazyConfig.save`` writes for tuples."""


_Loader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node)
)


class _Saved(_Loader):
    """`_Loader` plus what ``LazyConfig.save`` writes for the objects of a training
    config: classes and functions (``!!python/name:``), ``functools.partial`` of them, and
    detectron2's data classes; each admitted only as the object `_resolve` finds."""


class _Refused(yaml.YAMLError):
    def __init__(self, what: str, why: str):
        super().__init__(f"{what} {why}")


def _name(loader, suffix: str, node):
    try:
        return _resolve(suffix)
    except _NotAllowed as e:
        raise _Refused(f"the Python YAML tag python/name:{suffix}", str(e)) from None


def _partial(loader, node):
    import functools

    fields = (loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
              else {"args": loader.construct_sequence(node, deep=True)})
    args, state = fields.get("args") or [], fields.get("state")
    if not args or not callable(args[0]) or isinstance(args[0], str):
        raise _Refused("the Python YAML tag python/object/apply:functools.partial",
                       "does not name an allowed class or function")
    made = functools.partial(*args)
    if state is not None:
        func, pargs, keywords, extra = (list(state) + [None] * 4)[:4]
        if func is not args[0] or extra:
            raise _Refused("the Python YAML tag python/object/apply:functools.partial",
                           "has a state that is not its own")
        made = functools.partial(func, *(pargs or ()), **(keywords or {}))
    return made


def _data_class(loader, suffix: str, node):
    what = f"the Python YAML tag python/object:{suffix}"
    if suffix not in _DATA_CLASSES:
        raise _Refused(what, "is not one of detectron2's data classes that a saved config "
                             f"holds ({', '.join(_DATA_CLASSES)})")
    cls = _resolve(suffix)
    if isinstance(node, yaml.MappingNode):
        fields = loader.construct_mapping(node, deep=True)
        if set(fields) <= {"args", "state", "kwds", "listitems", "dictitems"} and "args" in \
                fields:
            args, kwargs = fields.get("args") or [], fields.get("kwds") or {}
        else:
            args, kwargs = [], fields
    else:
        args, kwargs = loader.construct_sequence(node, deep=True), {}
    values = list(args) + list(kwargs.values())
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
        raise _Refused(what, "has fields that are not whole numbers")
    try:
        return cls(*args, **kwargs)  # type: ignore[operator]
    except TypeError as e:
        raise _Refused(what, f"has fields it does not take ({e})") from None


_Saved.add_multi_constructor("tag:yaml.org,2002:python/name:", _name)
_Saved.add_constructor("tag:yaml.org,2002:python/object/apply:functools.partial", _partial)
_Saved.add_multi_constructor("tag:yaml.org,2002:python/object/new:", _data_class)
_Saved.add_multi_constructor("tag:yaml.org,2002:python/object:", _data_class)


def _bounded(text: str) -> None:
    """Refuse YAML nested deeper than `_MAX_DEPTH`, or whose aliases expand it past
    `_MAX_NODES` nodes (an alias bomb), from its events: no recursion, no expansion."""
    depth, anchors = 0, {}
    sizes: list[tuple[str | None, list[int]]] = [(None, [0])]  # open collections: anchor, size
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > _MAX_DEPTH:
                raise _Refused("the YAML", f"is nested more than {_MAX_DEPTH} levels deep")
            sizes.append((event.anchor, [1]))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            anchor, (size,) = sizes.pop()
            if anchor is not None:
                anchors[anchor] = size
            sizes[-1][1][0] += size
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchors[event.anchor] = 1
            sizes[-1][1][0] += 1
        elif isinstance(event, yaml.AliasEvent):
            sizes[-1][1][0] += anchors.get(event.anchor, 1)
        if sum(s for _, (s,) in sizes) > _MAX_NODES:
            raise _Refused("the YAML", f"expands to more than {_MAX_NODES} values (aliases)")


_FIX = ("a run's saved config.yaml is read as data; restore it, or pass the config file you "
        "trained with (your own .yaml or LazyConfig .py)")


def is_run_config(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the ``config.yaml`` a training saved into its OUTPUT_DIR."""
    path = Path(path)
    if path.name != "config.yaml":
        return False
    folder = path.parent
    return any((folder / n).exists() for n in _RUN_FILES) or any(folder.glob("model_*.pth"))


def _targets(node: Any, where: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield where or "(top)", value
            else:
                yield from _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def _parse(path: str | os.PathLike[str], error: type[D2EMAError], fix: str) -> dict[str, Any]:
    raw = read_regular(path, _MAX_BYTES, "saved config", fix, error)
    try:
        text = raw.decode("utf-8")
        _bounded(text)
        data = yaml.load(text, Loader=_Saved)
    except _Refused as e:
        raise error(f"{path}: {e}, and is not read as data; {fix}") from None
    except yaml.constructor.ConstructorError as e:
        tag = str(e.problem or e).replace("could not determine a constructor for the tag ", "")
        raise error(f"{path} holds the Python YAML tag {tag}, which would run code; "
                    f"{fix}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"cannot read {path} as plain YAML ({type(e).__name__}); {fix}") from None
    except ValueError as e:  # a scalar YAML cannot build: an integer of over 4300 digits
        raise error(f"cannot read {path} as plain YAML (a value it cannot build: "
                    f"{str(e).split(':')[0][:80]}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a YAML mapping; {fix}")
    return data


def read_saved_config(path: str | os.PathLike[str], error: type[D2EMAError] = UsageError,
                      fix: str = _FIX) -> dict[str, Any]:
    """A run's saved config as data, checked whole: the one reader of a run's ``config.yaml``.

    A regular file of at most 4 MiB; YAML nested at most 64 deep whose aliases expand to at
    most 100,000 values; Python tags only for the objects ``LazyConfig.save`` writes, each
    resolved to the object and admitted only if defined in the allowed packages (nothing is
    called but the constructors of detectron2's data classes such as ``ShapeSpec``, with whole
    numbers); no ``_BASE_``; every ``_target_`` resolved the same way. Raises ``error`` (one
    line naming the file, what is wrong and ``fix``)."""
    data = _parse(path, error, fix)
    if "_BASE_" in data:
        raise error(f"{path} has a _BASE_ ({data['_BASE_']!r}), which a saved config never "
                    f"has; {fix}")
    for where, target in _targets(data):
        if callable(target) and not isinstance(target, str):
            continue  # an object: admitted by its tag
        try:
            _resolve(target)
        except _NotAllowed as e:
            raise error(f"{path}: {where}._target_ = {target!r} {e}: only classes and "
                        "functions defined in detectron2's model/data/solver/evaluation, "
                        "torch.nn/optim, fvcore's schedulers or d2ema's model configs are "
                        f"built from a saved config; {fix}") from None
    return data


def check_saved_config(path: str | os.PathLike[str]) -> None:
    """Refuse a run's saved config that would run code when loaded; see the module doc."""
    read_saved_config(path)


def load_saved_lazy(path: str | os.PathLike[str]):
    """A run's saved LazyConfig ``config.yaml`` as detectron2's ``LazyConfig.load`` returns it,
    built from `read_saved_config`'s data: detectron2's loader (``yaml.unsafe_load``) never
    reads it. Example::

        cfg = load_saved_lazy("output/config.yaml")     # resumes without the .py
    """
    from omegaconf import OmegaConf

    return OmegaConf.create(read_saved_config(path), flags={"allow_objects": True})


RUN_CONFIG = "config.yaml"


def find_run_config(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The ``config.yaml`` detectron2 wrote beside a run's checkpoints, if there is one."""
    path = Path(checkpoint).parent / RUN_CONFIG
    if path.is_file() and escapes(path.parent, path):  # read as data, and only from the run
        raise ExportError(f"{path} is a symbolic link to {os.path.realpath(path)}, outside the "
                          "run's folder; pass the run's config with --config")
    return path if path.is_file() else None


def plain_config_path(weights: str | os.PathLike[str]) -> Path:
    """Where the config of exported ``weights`` goes: the same name, ending in ``.yaml``."""
    weights = Path(weights)
    path = weights.with_suffix(".yaml")
    return path if path != weights else weights.with_name(weights.name + ".config.yaml")


def plain_output_dir(weights: str | os.PathLike[str]) -> str:
    """The output folder of the plain config: beside the export, never the run's folder
    (detectron2's ``default_setup`` would replace the run's ``config.yaml``)."""
    weights = Path(weights)
    return str(weights.with_name(weights.stem + "_output"))


def _strip(data: dict[str, Any], weights: str) -> dict[str, Any]:
    if "MODEL" in data or "MODEL_EMA" in data:  # yacs
        data.pop("MODEL_EMA", None)
        if isinstance(data.get("DATASETS"), dict):
            data["DATASETS"].pop("COCO_INSTANCES", None)
        data.setdefault("MODEL", {})["WEIGHTS"] = weights
        data["OUTPUT_DIR"] = plain_output_dir(weights)
    elif isinstance(data.get("train"), dict):  # LazyConfig
        for key in ("model_ema", "coco_instances"):
            data["train"].pop(key, None)
        data["train"]["init_checkpoint"] = weights
        data["train"]["output_dir"] = plain_output_dir(weights)
    else:
        raise ExportError("is neither a detectron2 yacs config (MODEL, ...) nor a LazyConfig "
                          "(model, train, ...)")
    return data


def plain_config_text(config: str | os.PathLike[str], weights: str) -> str:
    """``config`` without d2ema's keys, its weights set to ``weights``, as YAML text.

    Raises `ExportError` for a config that cannot be read (a Python tag included: a
    run's config is read as data).
    """
    config = Path(config)
    data = _parse(config, ExportError, "a run's config is read as data: pass --config with the "
                  "run's YAML config")
    try:
        data = _strip(data, weights)
    except ExportError as e:
        raise ExportError(f"config {config} {e}") from None
    return yaml.dump(data, sort_keys=False, default_flow_style=None, width=100)


def write_plain_config(
    config: str | os.PathLike[str], output: str | os.PathLike[str], weights: str
) -> Path:
    """Write ``output``: `plain_config_text` of ``config``.

    Raises `ExportError` for a config that cannot be read or written.
    """
    output = Path(output)
    text = plain_config_text(config, weights)
    try:
        atomic_write_text(text, output)
    except OSError as e:
        raise ExportError(f"cannot write {output}: {e.strerror or e}") from e
    return output
