"""``digits``: real handwritten digits (scikit-learn's 8x8 ``load_digits``) pasted on canvases.

The 1797 source digits ship with scikit-learn, so nothing is downloaded. They are split once,
per class and deterministically, into train (80%) and val (20%) pools, so a val image never
shows a digit that a train image used. Each image pastes 1-4 digits from its pool, upscaled
3x-6x with bilinear interpolation, in a colour that contrasts with a tinted, noisy background.
A digit's box is the tight box of its ink: the upscaled pixels whose intensity is at least
`INK_THRESHOLD`. Pasted digits never overlap (their boxes, plus a one-pixel gap, are
disjoint), so every box is exactly the visible ink.

Generation is deterministic: image ``i`` depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from d2ema.app.data.common import (
    Sample,
    box_from_mask,
    contrasting_colour,
    luma,
    noisy_background,
    opencv,
    sample_rng,
)

__all__ = [
    "CLASSES",
    "INK_THRESHOLD",
    "SPLITS",
    "VAL_FRACTION",
    "generate",
    "load_source",
    "render_image",
    "source_indexes",
]

CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
SPLITS = ("train", "val")
VAL_FRACTION = 0.2
INK_THRESHOLD = 0.3  # fraction of full ink (16 in the source data) that counts as a digit pixel
_SPLIT_SEED = 20240  # fixed: the train/val partition of the source digits never changes
_STREAM = {"train": 2, "val": 3}


@lru_cache(maxsize=1)
def load_source() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 source digits as float32 ink in [0, 1] (N x 8 x 8) and their labels (N,)."""
    from sklearn.datasets import load_digits  # local: only this generator needs scikit-learn

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    labels = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@lru_cache(maxsize=2)
def source_indexes(split: str) -> np.ndarray:
    """Indexes (sorted) of the source digits that ``split`` may use; train and val are disjoint.

    Stratified: each class is shuffled with a fixed seed and its last ``VAL_FRACTION`` goes to
    val, so both pools hold every digit in about the same proportions.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    _, labels = load_source()
    rng = np.random.default_rng(_SPLIT_SEED)
    chosen = []
    for digit in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_val = round(len(members) * VAL_FRACTION)
        chosen.append(members[len(members) - n_val :] if split == "val" else members[:-n_val])
    out = np.sort(np.concatenate(chosen))
    out.setflags(write=False)
    return out


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    """Whether ``box`` (XYWH) comes within one pixel of any of ``others``."""
    x, y, w, h = box
    return any(
        x < ox + ow + 1 and ox < x + w + 1 and y < oy + oh + 1 and oy < y + h + 1
        for ox, oy, ow, oh in others
    )


def render_image(
    rng: np.random.Generator, pool: np.ndarray, size: int = 128, max_objects: int = 4
) -> Sample:
    """Paste 1..``max_objects`` digits drawn from the source indexes ``pool`` onto a canvas."""
    images, labels = load_source()
    background = noisy_background(rng, size)
    image = background.copy()
    n_objects = int(rng.integers(1, max_objects + 1))
    boxes: list[tuple[int, int, int, int]] = []
    masks: list[np.ndarray] = []
    categories: list[int] = []
    sources: list[int] = []
    cv2 = opencv()
    for _ in range(n_objects):
        source = int(pool[rng.integers(len(pool))])
        scale = float(rng.uniform(3.0, 6.0))
        side = round(8 * scale)
        ink = cv2.resize(images[source], (side, side), interpolation=cv2.INTER_LINEAR)
        ink = ink.clip(0.0, 1.0)
        glyph = box_from_mask(ink >= INK_THRESHOLD)
        if glyph is None:  # pragma: no cover - every source digit has ink
            continue
        gx, gy, gw, gh = glyph
        for _attempt in range(30):
            x = int(rng.integers(0, size - side + 1))
            y = int(rng.integers(0, size - side + 1))
            box = (x + gx, y + gy, gw, gh)
            if not _overlaps(box, boxes):
                break
        else:
            continue  # no free spot: keep the digits already placed
        region = (slice(y, y + side), slice(x, x + side))
        under = float(luma(background[region][ink >= INK_THRESHOLD]).mean())
        colour = contrasting_colour(rng, under, min_diff=80.0)
        alpha = ink[..., None]
        image[region] = image[region] * (1.0 - alpha) + colour * alpha
        mask = np.zeros((size, size), dtype=bool)
        mask[region] = ink >= INK_THRESHOLD
        boxes.append(box)
        masks.append(mask)
        categories.append(int(labels[source]))
        sources.append(source)
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Sample(image=out, boxes=boxes, categories=categories, masks=masks, sources=sources)


def generate(split: str, num_images: int, seed: int, size: int = 128) -> Iterator[Sample]:
    """Yield ``num_images`` samples of ``split``; image ``i`` depends only on its seed and index."""
    pool = source_indexes(split)
    for index in range(num_images):
        yield render_image(sample_rng(seed, _STREAM[split], index), pool, size)
