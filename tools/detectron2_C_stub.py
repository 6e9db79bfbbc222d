"""Stand-in for detectron2's compiled extension ``detectron2._C``.

Installed by ``tools/install_detectron2.py`` because the ``pb1-detectron2==0.6`` sdist ships
no C++ sources. Standard Faster R-CNN, RetinaNet and Mask R-CNN never call a compiled op;
rotated boxes, deformable convolution and the fast COCO evaluator do. Calling any of them
raises an error that names the op and the way out, instead of failing at import time.
"""

_HELP = (
    "detectron2._C.{name} is a compiled op, and this detectron2 was installed without its "
    "C++ extension (d2ema's installer: the v0.6 sdist has no C++ sources). Rotated boxes, "
    "deformable convolution and COCOEvaluator(use_fast_impl=True) need it. Use "
    "use_fast_impl=False for COCO evaluation, or install a detectron2 built with its "
    "extension; d2ema's installer leaves such an install alone."
)

D2EMA_STUB = True


def _register_torch_ops() -> None:
    """``nms_rotated`` is called as ``torch.ops.detectron2.nms_rotated``: define it to raise too."""
    import torch

    try:
        lib = torch.library.Library("detectron2", "DEF")
        lib.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # a real extension (or an earlier import) defined it
        return

    def nms_rotated(boxes, scores, iou_threshold):
        raise MissingCompiledOp(_HELP.format(name="nms_rotated"))

    lib.impl("nms_rotated", nms_rotated, "CompositeExplicitAutograd")
    globals()["_LIBRARY"] = lib  # the registration lives as long as the library object


def get_compiler_version() -> str:
    return "none (detectron2 installed without its C++ extension)"


def get_cuda_version() -> str:
    return "none (detectron2 installed without its C++ extension)"


def has_cuda() -> bool:
    return False


class MissingCompiledOp(RuntimeError):
    """Raised when a compiled detectron2 op is called."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise MissingCompiledOp(_HELP.format(name=name))

    missing.__name__ = name
    return missing


_register_torch_ops()
