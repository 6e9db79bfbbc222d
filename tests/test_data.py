"""Tests of the embedded demo datasets (``d2ema.app.data``): generators, cache, registration."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from d2ema.app.data import (
    DATASETS,
    UnknownDatasetError,
    cache_root,
    dataset_names,
    digits,
    ensure_dataset,
    get_dataset_spec,
    samples,
    shapes,
)
from d2ema.app.data.common import noisy_background

NAMES = ["shapes_train", "shapes_val", "digits_train", "digits_val"]


def _small(name: str, n: int = 12):
    return get_dataset_spec(name, n)


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image)
        assert x.boxes == y.boxes
        assert x.categories == y.categories
        assert x.sources == y.sources


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", NAMES)
def test_generation_is_deterministic(name):
    spec = _small(name, 10)
    first, second = list(samples(spec)), list(samples(spec))
    _assert_same(first, second)
    # Image i depends only on (seed, i): a longer dataset starts with the same images.
    _assert_same(first[:5], list(samples(get_dataset_spec(name, 5))))


def test_seeds_and_splits_differ():
    a = next(shapes.generate(1, seed=1))
    b = next(shapes.generate(1, seed=2))
    assert not np.array_equal(a.image, b.image)
    train = next(iter(samples(_small("digits_train", 1))))
    val = next(iter(samples(_small("digits_val", 1))))
    assert not np.array_equal(train.image, val.image)


@pytest.mark.parametrize("name", ["shapes_val", "digits_val"])
def test_boxes_are_exact_tight_boxes_of_visible_pixels(name):
    for sample in samples(_small(name, 20)):
        height, width = sample.image.shape[:2]
        assert sample.image.dtype == np.uint8 and sample.image.shape == (128, 128, 3)
        assert 1 <= len(sample.boxes) <= 4
        assert len(sample.boxes) == len(sample.categories) == len(sample.masks)
        union = np.zeros((height, width), dtype=int)
        for (x, y, w, h), mask in zip(sample.boxes, sample.masks):
            assert w >= 3 and h >= 3
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
            inside = mask[y : y + h, x : x + w]
            assert inside.sum() == mask.sum() > 0  # the box holds every pixel of the object
            # ... and is tight: each border row and column touches the object.
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            union += mask
        assert union.max() == 1  # visible masks never share a pixel


def test_shapes_are_painted_where_masks_say():
    """The object pixels differ from the background the generator drew under them."""
    for index in range(10):
        rng_a = np.random.default_rng([7, 1, index])
        rng_b = np.random.default_rng([7, 1, index])
        sample = shapes.render_image(rng_a)
        background = noisy_background(rng_b, 128)  # same first draws as the generator's
        changed = np.abs(sample.image.astype(float) - background).max(axis=2) > 0.51
        objects = np.logical_or.reduce(sample.masks)
        assert not changed[~objects].any()
        assert changed[objects].mean() > 0.99


@pytest.mark.parametrize(("name", "classes"), [("shapes_train", shapes.CLASSES),
                                               ("digits_train", digits.CLASSES)])  # fmt: skip
def test_all_classes_occur(name, classes):
    seen = {c for s in samples(_small(name, 60)) for c in s.categories}
    assert seen == set(range(len(classes)))
    assert DATASETS[name].classes == classes
    assert {"circle", "square", "triangle"} <= set(shapes.CLASSES)


def test_digit_sources_are_disjoint_between_train_and_val():
    train, val = digits.source_indexes("train"), digits.source_indexes("val")
    assert len(set(train) & set(val)) == 0
    assert len(train) + len(val) == 1797 == len(digits.load_source()[0])
    assert 0.18 < len(val) / 1797 < 0.22
    labels = digits.load_source()[1]
    assert set(labels[val]) == set(range(10))
    for split, pool in (("train", train), ("val", val)):
        used = {s for sample in digits.generate(split, 20, seed=5) for s in sample.sources}
        assert used and used <= set(pool)
    with pytest.raises(ValueError):
        digits.source_indexes("test")


def test_digit_labels_match_sources():
    labels = digits.load_source()[1]
    for sample in samples(_small("digits_val", 10)):
        assert sample.categories == [int(labels[s]) for s in sample.sources]


# ----------------------------------------------------------------------------- specs and cache


def test_dataset_names_and_unknown_name():
    assert dataset_names() == NAMES == list(DATASETS)
    assert get_dataset_spec("shapes_val").num_images == DATASETS["shapes_val"].num_images
    with pytest.raises(KeyError) as info:
        get_dataset_spec("coco_2017_train_typo")
    assert isinstance(info.value, ValueError) and isinstance(info.value, UnknownDatasetError)
    message = str(info.value)
    assert "coco_2017_train_typo" in message and all(n in message for n in NAMES)
    with pytest.raises(ValueError):
        get_dataset_spec("shapes_val", 0)


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("D2EMA_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" / "datasets"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("D2EMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "d2ema" / "datasets"


def test_cache_writes_png_and_coco_json_once(tmp_path):
    spec = _small("digits_val", 8)
    files = ensure_dataset(spec, tmp_path)
    assert files.directory.parent == tmp_path
    assert files.directory.name.startswith("digits_val-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.directory.name]  # no temp left
    coco = json.loads(files.json_file.read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert len(coco["images"]) == 8
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
        assert ann["iscrowd"] == 0 and ann["area"] == ann["bbox"][2] * ann["bbox"][3]
        assert ann["d2ema_source"] in set(digits.source_indexes("val"))
    for record, sample in zip(coco["images"], samples(spec)):
        png = cv2.imread(str(files.image_root / record["file_name"]), cv2.IMREAD_COLOR)
        assert np.array_equal(png[..., ::-1], sample.image)  # lossless, RGB order kept
        anns = by_image[record["id"]]
        assert [tuple(int(v) for v in a["bbox"]) for a in anns] == sample.boxes
        assert [a["category_id"] - 1 for a in anns] == sample.categories

    # A second call reuses the cache; other parameters get another folder.
    mtime = files.json_file.stat().st_mtime_ns
    assert ensure_dataset(spec, tmp_path) == files
    assert files.json_file.stat().st_mtime_ns == mtime
    other = ensure_dataset(_small("digits_val", 9), tmp_path)
    assert other.directory != files.directory


def test_cache_is_byte_identical_across_roots(tmp_path):
    spec = _small("shapes_val", 6)
    a, b = ensure_dataset(spec, tmp_path / "a"), ensure_dataset(spec, tmp_path / "b")
    assert a.json_file.read_bytes() == b.json_file.read_bytes()
    for path in sorted(a.image_root.iterdir()):
        assert path.read_bytes() == (b.image_root / path.name).read_bytes()


def test_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    from d2ema.app.data import registry

    spec = _small("shapes_val", 4)
    real = registry.samples

    def interrupted(spec):
        it = real(spec)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "samples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(spec, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half dataset nor a temp folder
    monkeypatch.setattr(registry, "samples", real)
    files = ensure_dataset(spec, tmp_path)
    assert len(list(files.image_root.iterdir())) == 4


# ----------------------------------------------------------------------------- detectron2


@pytest.fixture
def d2_registered(tmp_path):
    """Register small versions of the val datasets; unregister them afterwards."""
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2ema.app.data import register_datasets

    sizes = {"shapes_val": 12, "digits_val": 10}
    names = register_datasets(tmp_path, sizes=sizes, names=list(sizes))
    yield names, sizes, tmp_path
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_register_is_idempotent_and_gives_standard_dicts(d2_registered):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    from d2ema.app.data import register_datasets

    names, sizes, root = d2_registered
    assert names == ["shapes_val", "digits_val"]
    json_file = MetadataCatalog.get("shapes_val").json_file
    assert register_datasets(root, sizes=sizes, names=names) == names  # no-op, no error
    assert MetadataCatalog.get("shapes_val").json_file == json_file
    with pytest.raises(KeyError):
        register_datasets(root, sizes={"nope": 3})

    for name in names:
        spec = get_dataset_spec(name, sizes[name])
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(spec.classes)
        assert meta.evaluator_type == "coco"
        id_map = {k + 1: k for k in range(len(spec.classes))}
        assert meta.thing_dataset_id_to_contiguous_id == id_map
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == sizes[name]
        expected = list(samples(spec))
        for record, sample in zip(dicts, expected):
            assert {"file_name", "image_id", "height", "width", "annotations"} <= set(record)
            assert (record["height"], record["width"]) == (128, 128)
            assert record["file_name"].endswith(".png")
            anns = record["annotations"]
            assert [a["bbox_mode"] for a in anns] == [BoxMode.XYWH_ABS] * len(anns)
            assert [tuple(int(v) for v in a["bbox"]) for a in anns] == sample.boxes
            assert [a["category_id"] for a in anns] == sample.categories
            assert all(a["iscrowd"] == 0 for a in anns)
        # metadata is unchanged by loading the dicts (same values as set up front)
        assert meta.thing_classes == list(spec.classes)

    # Other sizes re-register the name rather than failing on detectron2's frozen metadata.
    register_datasets(root, sizes={"shapes_val": 5}, names=["shapes_val"])
    assert len(DatasetCatalog.get("shapes_val")) == 5


def _predictions(dicts, class_shift: int = 0, num_classes: int = 1):
    import torch
    from detectron2.structures import Boxes, BoxMode, Instances

    inputs, outputs = [], []
    for record in dicts:
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in record["annotations"]]  # fmt: skip
        classes = [(a["category_id"] + class_shift) % num_classes for a in record["annotations"]]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inputs.append({"image_id": record["image_id"], "file_name": record["file_name"]})
        outputs.append({"instances": instances})
    return inputs, outputs


@pytest.mark.parametrize("name", ["shapes_val", "digits_val"])
def test_coco_evaluator_scores_ground_truth_as_perfect(d2_registered, tmp_path, name):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    dicts = DatasetCatalog.get(name)
    k = len(MetadataCatalog.get(name).thing_classes)

    def score(class_shift: int) -> dict:
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path / f"eval{class_shift}"),
                                  use_fast_impl=False)  # fmt: skip
        evaluator.reset()
        inputs, outputs = _predictions(dicts, class_shift, k)
        evaluator.process(inputs, outputs)
        return evaluator.evaluate()["bbox"]

    perfect = score(0)
    assert perfect["AP"] > 99.9 and perfect["AP50"] > 99.9
    wrong_class = score(1)  # right boxes, every class wrong: checks the category-id mapping
    assert wrong_class["AP"] < 1.0
