"""Pieces shared by the demo-dataset generators: the sample record, backgrounds, box helpers.

Everything here is numpy/OpenCV only (no detectron2), so the generators run and are testable
without detectron2 installed. OpenCV is imported only when an image is drawn (`opencv`), so
``d2ema train`` on your own data, which imports this package for the demo datasets' names, runs
wherever detectron2 runs, OpenCV or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from d2ema.errors import DatasetError

__all__ = [
    "Sample",
    "box_from_mask",
    "contrasting_colour",
    "luma",
    "noisy_background",
    "opencv",
    "sample_rng",
]


def opencv() -> ModuleType:
    """OpenCV, imported when a demo image is drawn or written, with a fix when it is missing.

    Example: ``cv2 = opencv(); cv2.resize(...)``.
    """
    try:
        import cv2
    except ImportError as exc:
        raise DatasetError(
            f"the demo datasets need OpenCV ({exc}): pip install opencv-python-headless, or "
            "train on your own COCO data with --dataset NAME=ANN.json:IMAGES") from None
    return cv2


@dataclass
class Sample:
    """One generated image and its objects.

    ``boxes`` are integer pixel boxes ``(x, y, w, h)`` (XYWH_ABS), each the tight box of the
    object's *visible* pixels, which ``masks`` holds (one boolean HxW array per object).
    ``categories`` are 0-based class indexes. ``sources`` is optional per-object provenance
    (the index of the source digit for ``digits``; empty for ``shapes``).
    """

    image: np.ndarray  # HxWx3 uint8, RGB
    boxes: list[tuple[int, int, int, int]]
    categories: list[int]
    masks: list[np.ndarray]
    sources: list[int] = field(default_factory=list)


def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator for image ``index`` of a dataset, independent of the dataset's size.

    Seeding per image (rather than one stream for the whole dataset) means the first ``n``
    images of a dataset are the same whatever the number of images asked for.
    """
    return np.random.default_rng([int(seed), int(stream), int(index)])


def box_from_mask(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight XYWH box of the True pixels of ``mask`` (None when it has none).

    A pixel at column ``x`` covers ``[x, x + 1)``, so the box of columns ``x0..x1`` is
    ``x0, x1 - x0 + 1`` wide.
    """
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]), int(ys[0]), int(ys[-1])
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


def luma(rgb: np.ndarray) -> np.ndarray:
    """Perceived brightness (ITU-R BT.601) of RGB values on the last axis."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def contrasting_colour(
    rng: np.random.Generator, against: float, min_diff: float = 70.0
) -> np.ndarray:
    """A random RGB colour whose brightness differs from ``against`` by at least ``min_diff``.

    Keeps every object visible on its background, so that the boxes describe something a
    detector can actually see.
    """
    colour = rng.integers(0, 256, size=3)
    for _ in range(20):
        if abs(float(luma(colour)) - against) >= min_diff:
            return colour.astype(np.float32)
        colour = rng.integers(0, 256, size=3)
    # Fall back to the far end of the brightness range, keeping some hue.
    base = 20.0 if against > 127 else 235.0
    return np.clip(base + rng.normal(0, 15, size=3), 0, 255).astype(np.float32)


def noisy_background(rng: np.random.Generator, size: int, tint: bool = True) -> np.ndarray:
    """A textured float32 HxWx3 background in [0, 255].

    Sum of a random base colour, a linear gradient, smooth low-frequency noise (a coarse random
    grid upscaled bicubically) and fine per-pixel noise: cheap to draw yet varied enough that a
    detector cannot find objects from flat colour alone.
    """
    base = rng.uniform(40, 215, size=3) if tint else np.full(3, rng.uniform(40, 215))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    direction = rng.normal(size=2)
    gradient = (xx * direction[0] + yy * direction[1])[..., None]
    gradient = gradient * rng.uniform(-60, 60, size=3).astype(np.float32)
    coarse = int(rng.integers(3, 9))
    blobs = rng.normal(0, rng.uniform(10, 35), size=(coarse, coarse, 3)).astype(np.float32)
    cv2 = opencv()
    blobs = cv2.resize(blobs, (size, size), interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0, rng.uniform(3, 12), size=(size, size, 1)).astype(np.float32)
    image = base.astype(np.float32) + gradient + blobs + fine
    return np.clip(image, 0, 255)
