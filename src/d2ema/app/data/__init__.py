"""Embedded demo datasets for detectron2: ``shapes`` (synthetic) and ``digits`` (scikit-learn).

Both need no download. `register_datasets` generates them once into a cache folder (PNG
images + COCO json) and registers ``shapes_train``, ``shapes_val``, ``digits_train`` and
``digits_val`` in detectron2's ``DatasetCatalog``/``MetadataCatalog``, COCO style, so that
``COCOEvaluator(name, output_dir=..., use_fast_impl=False)`` scores them.

Importing this package does not import detectron2; only `register_datasets` does.
"""

from d2ema.app.data.registry import (
    DATASETS,
    ENV_CACHE,
    DatasetFiles,
    DatasetSpec,
    UnknownDatasetError,
    cache_root,
    dataset_names,
    ensure_dataset,
    get_dataset_spec,
    register_datasets,
    register_for_config,
    samples,
)

__all__ = [
    "DATASETS",
    "ENV_CACHE",
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
