"""A COCO instances file checked before training: the JSON, every image and every annotation.

detectron2's loader reads ``ANNOTATIONS.json`` when the first batch is built, after the model
is: a file that is not JSON, has no ``images`` or ``annotations``, a box that is a string, NaN
or negative, an unknown ``category_id`` or a ``file_name`` outside the image folder then costs a
traceback mid-start, or (negative and NaN boxes) trains silently on garbage.
`check_coco_file` reads the file once and raises one
`DatasetError` naming the file, the record and the fix.

Example::

    check_coco_file("my_train", "data/train.json")
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from d2ema.errors import DatasetError

__all__ = ['check_coco_file']


def _int(value: Any) -> bool:
    return type(value) is int


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _inside(file_name: Any) -> bool:
    if not isinstance(file_name, str) or not file_name.strip() or "\x00" in file_name:
        return False
    for path in (PurePosixPath(file_name), PureWindowsPath(file_name)):
        if path.is_absolute() or path.anchor or ".." in path.parts:
            return False
    return True


def check_coco_file(name: str, json_file: str | os.PathLike[str]) -> None:
    """Refuse a COCO instances file detectron2 would choke on or misread (see module doc)."""
    st = os.stat(json_file)
    _check(name, os.path.abspath(json_file), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)  # every process and every config read checks the same files
def _check(name: str, json_file: str, mtime: int, size: int) -> None:
    def bad(what: str, fix: str) -> DatasetError:
        return DatasetError(f"dataset {name!r}: {json_file}: {what}; {fix}")

    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise bad(f"cannot be read ({e.strerror or e})", "check the path and permissions") from e
    except (ValueError, RecursionError) as e:
        raise bad(f"is not valid JSON ({str(e)[:100]})",
                  "give a COCO instances file (images, annotations, categories)") from e
    if not isinstance(data, dict):
        raise bad(f"holds a {type(data).__name__}, not a COCO object",
                  "give a COCO instances file (images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise bad(f"has no list '{key}'", "a COCO instances file has images, annotations "
                      "and categories (lists)")
    if not data["images"]:
        raise bad("lists no images", "give a file with at least one image")
    categories = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _int(c.get("id")) or not isinstance(c.get("name"), str):
            raise bad(f"categories[{i}] = {str(c)[:80]} has no integer id and name",
                      'a category is {"id": 1, "name": "cat"}')
        categories.add(c["id"])
    images = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _int(im.get("id")):
            raise bad(f"images[{i}] = {str(im)[:80]} has no integer id",
                      'an image is {"id": 1, "file_name": "a.jpg", "height": H, "width": W}')
        if not _inside(im.get("file_name")):
            raise bad(f"images[{i}] (id {im['id']}) has file_name {im.get('file_name')!r}, "
                      "which is not a path inside the image folder",
                      "give file_name relative to IMAGE_DIR, without '..'")
        for key in ("height", "width"):
            if key in im and not (_int(im[key]) and im[key] > 0):
                raise bad(f"images[{i}] (id {im['id']}) has {key} {im[key]!r}",
                          f"{key} is the image's size in pixels, a whole number > 0")
        if im["id"] in images:  # pycocotools keeps one image per id: the other would be lost
            raise bad(f"images[{i}] has id {im['id']}, which an earlier image has",
                      "give every image its own id")
        images.add(im["id"])
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}]" + (f" (id {a.get('id')})" if isinstance(a, dict) else "")
        if not isinstance(a, dict):
            raise bad(f"{where} is a {type(a).__name__}", "an annotation is a JSON object")
        if not _int(a.get("image_id")) or a["image_id"] not in images:
            raise bad(f"{where} has image_id {a.get('image_id')!r}, which no image has",
                      "every annotation's image_id must be the id of an image in 'images'")
        if not _int(a.get("category_id")) or a["category_id"] not in categories:
            raise bad(f"{where} has category_id {a.get('category_id')!r}, which is not in "
                      f"categories (ids {sorted(categories)[:10]})",
                      "use a listed category id, or add the category")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(map(_number, box))):
            raise bad(f"{where} has bbox {box!r}", "a bbox is [x, y, width, height]: 4 finite "
                      "numbers")
        if min(box) < 0:
            raise bad(f"{where} has bbox {box!r} with a negative value",
                      "x, y, width and height are >= 0 (pixels, from the top-left corner)")
