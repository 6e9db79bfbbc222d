"""Dataset specs, the on-disk cache (PNG images + COCO json) and detectron2 registration.

Each dataset is generated once into ``<cache root>/<name>-<key>/`` where ``<key>`` hashes every
generation parameter (and `GENERATOR_VERSION`), so changing a size or seed gives a new
folder instead of a stale one. A dataset is written into a temporary sibling folder and renamed
into place only when complete, so an interrupted run never leaves a half-written cache, and two
processes generating the same dataset at once both end up using one complete copy.

The cache root is ``root`` when given, else ``$D2EMA_CACHE/datasets``, else
``$XDG_CACHE_HOME/d2ema/datasets`` (``~/.cache/d2ema/datasets``).

Only `register_datasets` imports detectron2, so generation works without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from d2ema.app.data import digits, shapes
from d2ema.app.data.common import Sample, opencv
from d2ema.d2.config.view import ConfigView
from d2ema.errors import D2EMAError, DatasetError

__all__ = [
    "DATASETS",
    "ENV_CACHE",
    "GENERATOR_VERSION",
    "DatasetFiles",
    "DatasetSpec",
    "UnknownDatasetError",
    "cache_root",
    "dataset_names",
    "ensure_dataset",
    "get_dataset_spec",
    "register_datasets",
    "register_for_config",
    "samples",
]

ENV_CACHE = "D2EMA_CACHE"
GENERATOR_VERSION = 1  # bump when a generator's output changes, to invalidate old caches
ANNOTATIONS = "annotations.json"
IMAGES = "images"


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that determines a generated dataset."""

    name: str
    family: str  # "shapes" or "digits"
    split: str  # "train" or "val"
    num_images: int
    seed: int
    image_size: int = 128

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in contiguous-id order (category ``k`` is ``classes[k]``)."""
        return shapes.CLASSES if self.family == "shapes" else digits.CLASSES

    def cache_key(self) -> str:
        """Short hash of the generation parameters (not the name), naming the cache folder."""
        params = {k: v for k, v in asdict(self).items() if k != "name"}
        params["version"] = GENERATOR_VERSION
        blob = json.dumps(params, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("shapes_train", "shapes", "train", num_images=600, seed=1),
        DatasetSpec("shapes_val", "shapes", "val", num_images=120, seed=2),
        DatasetSpec("digits_train", "digits", "train", num_images=600, seed=3),
        DatasetSpec("digits_val", "digits", "val", num_images=120, seed=4),
    )
}


class UnknownDatasetError(D2EMAError, KeyError, ValueError):
    """Raised for a dataset name that is not in `DATASETS` (message lists known names)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class DatasetFiles:
    """Where a generated dataset lives."""

    directory: Path
    json_file: Path
    image_root: Path


def dataset_names() -> list[str]:
    """Names of the demo datasets, in registration order."""
    return list(DATASETS)


def get_dataset_spec(name: str, num_images: int | None = None) -> DatasetSpec:
    """The spec of dataset ``name``, optionally with another number of images.

    Raises `UnknownDatasetError` (a ``KeyError`` and a ``ValueError``) for an unknown name.
    """
    try:
        spec = DATASETS[name]
    except KeyError:
        known = ", ".join(DATASETS)
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {known}") from None
    if num_images is not None:
        if int(num_images) < 1:
            raise DatasetError(f"dataset {name!r}: num_images must be >= 1, got {num_images}")
        spec = replace(spec, num_images=int(num_images))
    return spec


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding all generated datasets (see the module docstring for the order)."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "d2ema" / "datasets"


def samples(spec: DatasetSpec) -> Iterator[Sample]:
    """Generate the samples of ``spec`` in memory (no cache involved)."""
    if spec.family == "shapes":
        return shapes.generate(spec.num_images, spec.seed, spec.image_size)
    if spec.family == "digits":
        return digits.generate(spec.split, spec.num_images, spec.seed, spec.image_size)
    raise ValueError(f"unknown dataset family {spec.family!r}")


def _coco_dict(spec: DatasetSpec, records: Iterable[tuple[str, Sample]]) -> dict:
    """COCO detection json for ``records`` of (file name, sample); category ids are 1..K."""
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, (file_name, sample) in enumerate(records, start=1):
        height, width = sample.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for k, (box, category) in enumerate(zip(sample.boxes, sample.categories)):
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category + 1,
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),  # box area, as detectron2's own converter uses
                "iscrowd": 0,
            }
            if sample.sources:
                ann["d2ema_source"] = sample.sources[k]
            annotations.append(ann)
    return {
        "info": {
            "description": f"d2ema demo dataset {spec.name}",
            "version": str(GENERATOR_VERSION),
            "d2ema_spec": asdict(spec),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": spec.family}
            for k, name in enumerate(spec.classes)
        ],
    }


def _write(spec: DatasetSpec, directory: Path) -> None:
    """Write the images (PNG) and the COCO json of ``spec`` into the new folder ``directory``."""
    image_dir = directory / IMAGES
    image_dir.mkdir(parents=True)
    cv2 = opencv()
    records = []
    for index, sample in enumerate(samples(spec)):
        file_name = f"{index:06d}.png"
        if not cv2.imwrite(str(image_dir / file_name), sample.image[..., ::-1]):  # RGB -> BGR
            raise DatasetError(f"could not write {image_dir / file_name}: free disk space, or "
                               "point D2EMA_CACHE to a writable folder")
        records.append((file_name, sample))
    with open(directory / ANNOTATIONS, "w") as f:
        json.dump(_coco_dict(spec, records), f)


def _remove_stale_temps(base: Path, stem: str, max_age_s: float = 3600.0) -> None:
    """Delete temporary folders of ``stem`` left by generations killed over an hour ago."""
    now = time.time()
    for path in base.glob(f".tmp-{stem}-*"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # another process removed it meanwhile
            pass


def ensure_dataset(spec: DatasetSpec, root: str | os.PathLike[str] | None = None) -> DatasetFiles:
    """Generate ``spec`` into the cache unless it is already there; return its paths."""
    base = cache_root(root)
    directory = base / f"{spec.name}-{spec.cache_key()}"
    files = DatasetFiles(directory, directory / ANNOTATIONS, directory / IMAGES)
    if files.json_file.is_file():
        return files
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(base, directory.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=base))
    try:
        _write(spec, tmp / "data")
        try:
            os.rename(tmp / "data", directory)
        except OSError:
            if not files.json_file.is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def register_datasets(
    root: str | os.PathLike[str] | None = None,
    sizes: Mapping[str, int] | None = None,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Generate (if needed) and register the demo datasets with detectron2; return their names.

    ``sizes`` maps dataset names to numbers of images (defaults: `DATASETS`); ``names``
    limits registration to some datasets (default: all). Calling again with the same arguments
    is a no-op. Calling with other sizes or another root re-registers the affected names
    (detectron2's metadata cannot be changed in place), so the latest call wins.

    Each dataset is registered with ``register_coco_instances``; its metadata also gets
    ``thing_classes``, ``thing_dataset_id_to_contiguous_id`` (json ids 1..K -> 0..K-1) and
    ``evaluator_type="coco"`` up front, so ``COCOEvaluator(name, use_fast_impl=False)`` works
    even before the dataset's dicts are loaded.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    sizes = dict(sizes or {})
    chosen = list(DATASETS) if names is None else list(names)
    for name in list(sizes) + chosen:
        get_dataset_spec(name)  # fail early, before any generation, on an unknown name
    registered = []
    for name in chosen:
        spec = get_dataset_spec(name, sizes.get(name))
        files = ensure_dataset(spec, root)
        if name in DatasetCatalog.list():
            if getattr(MetadataCatalog.get(name), "json_file", None) == str(files.json_file):
                registered.append(name)
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, str(files.json_file), str(files.image_root))
        MetadataCatalog.get(name).set(
            thing_classes=list(spec.classes),
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(spec.classes))},
            evaluator_type="coco",
            d2ema_num_images=spec.num_images,
        )
        registered.append(name)
    return registered


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict) or hasattr(node, "items"):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
        for value in node:
            yield from _strings(value)


def datasets_in_config(cfg) -> list[str]:
    """Names of the embedded datasets a yacs config (``DATASETS``) or a LazyConfig mentions."""
    view = ConfigView.of(cfg)
    if not view.lazy:
        names = [*view.train_sets, *view.test_sets, view.ema_value("POSTHOC.SELECT_ON", "")]
    else:
        from omegaconf import OmegaConf

        names = list(_strings(OmegaConf.to_container(cfg, resolve=False)))
    return [n for n in dict.fromkeys(names) if n in DATASETS]


def register_for_config(cfg) -> list[str]:
    """Generate and register the embedded datasets ``cfg`` names that detectron2 lacks."""
    from detectron2.data import DatasetCatalog

    missing = [n for n in datasets_in_config(cfg) if n not in DatasetCatalog.list()]
    if missing:
        register_datasets(names=missing)
    return missing
