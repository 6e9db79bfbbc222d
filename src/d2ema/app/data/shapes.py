"""``shapes``: synthetic filled shapes on textured backgrounds, with exact boxes.

Each image has 1-4 objects from `CLASSES`, drawn with random size, rotation and colour
on a noisy gradient background. Objects may overlap (later ones on top), but a placement is
rejected when it would hide more than `MAX_HIDDEN` of an earlier object, so every
object stays clearly visible. Each box is the tight box of the object's visible pixels,
computed from the very masks that were painted, so it is exact to the pixel.

Generation is deterministic: image ``i`` depends only on ``(seed, i)`` (see
`sample_rng`).
"""

from __future__ import annotations

from collections.abc import Iterator

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

__all__ = ["CLASSES", "MAX_HIDDEN", "generate", "render_image"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
MAX_HIDDEN = 0.35  # most of an object's area that later objects may cover
_STREAM = 1  # separates this generator's random streams from the other generators'
_SHIFT = 4  # fillPoly sub-pixel bits: vertices are placed to 1/16 px


def _polygon(kind: str, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Vertices (N x 2, centred on 0) of a polygonal shape whose points lie within ``radius``."""
    theta = rng.uniform(0, 2 * np.pi)
    if kind == "square":
        angles = theta + np.arange(4) * (np.pi / 2)
        radii = np.full(4, radius)
    elif kind == "triangle":
        angles = theta + np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.2, 0.2, size=3)
        radii = radius * rng.uniform(0.85, 1.0, size=3)
    elif kind == "star":
        angles = theta + np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.4, 0.5))
    elif kind == "cross":
        w = rng.uniform(0.25, 0.35)
        arm = 1.0 / np.hypot(1.0, w)  # so that the outer corners lie on the unit circle
        w *= arm
        unit = np.array(
            [(w, arm), (w, w), (arm, w), (arm, -w), (w, -w), (w, -arm),
             (-w, -arm), (-w, -w), (-arm, -w), (-arm, w), (-w, w), (-w, arm)]
        )  # fmt: skip
        c, s = np.cos(theta), np.sin(theta)
        return radius * unit @ np.array([[c, s], [-s, c]])
    else:  # pragma: no cover - guarded by CLASSES
        raise ValueError(f"unknown shape {kind!r}")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean mask of one shape of class ``kind`` placed wholly inside a ``size`` image."""
    radius = float(rng.uniform(0.07, 0.21) * size)
    margin = radius + 1.0
    centre = rng.uniform(margin, size - 1 - margin, size=2)
    mask = np.zeros((size, size), dtype=np.uint8)
    cv2 = opencv()
    if kind == "circle":
        scale = 1 << _SHIFT
        cx, cy = (round(float(v) * scale) for v in centre)
        cv2.circle(mask, (cx, cy), round(radius * scale), 1, -1, cv2.LINE_8, _SHIFT)
    else:
        points = (_polygon(kind, rng, radius) + centre) * (1 << _SHIFT)
        points = np.round(points).astype(np.int32).reshape(-1, 1, 2)  # type: ignore[assignment]
        cv2.fillPoly(mask, [points], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


def render_image(rng: np.random.Generator, size: int = 128, max_objects: int = 4) -> Sample:
    """Draw one image with 1..``max_objects`` shapes; return it with exact boxes and masks."""
    background = noisy_background(rng, size)
    image = background.copy()
    n_objects = int(rng.integers(1, max_objects + 1))
    visible: list[np.ndarray] = []
    areas: list[int] = []
    categories: list[int] = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(n_objects):
        for _attempt in range(30):
            category = int(rng.integers(len(CLASSES)))
            mask = _shape_mask(CLASSES[category], rng, size)
            if all((v & ~mask).sum() >= (1 - MAX_HIDDEN) * a for v, a in zip(visible, areas)):
                break
        else:
            continue  # no room for one more object: keep the ones already placed
        under = float(luma(background[mask]).mean())
        colour = contrasting_colour(rng, under)
        # Gentle linear shading plus grain, so shapes are not perfectly flat patches.
        tilt = rng.normal(0, 0.15, size=2)
        shade = (xx - xx[mask].mean()) * tilt[0] + (yy - yy[mask].mean()) * tilt[1]
        grain = rng.normal(0, 4, size=(int(mask.sum()), 3))
        image[mask] = colour + shade[mask][:, None] + grain
        visible = [v & ~mask for v in visible] + [mask]
        areas.append(int(mask.sum()))
        categories.append(category)
    boxes = [box_from_mask(v) for v in visible]
    assert all(b is not None for b in boxes)  # guaranteed by the MAX_HIDDEN check
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Sample(image=out, boxes=boxes, categories=categories, masks=visible)  # type: ignore[arg-type]


def generate(num_images: int, seed: int, size: int = 128) -> Iterator[Sample]:
    """Yield ``num_images`` samples; image ``i`` depends only on ``(seed, i, size)``."""
    for index in range(num_images):
        yield render_image(sample_rng(seed, _STREAM, index), size)
