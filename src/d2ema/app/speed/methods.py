"""What `.update_speed` times: the models, and one `Method` per way to keep an EMA.

Each method averages the parameters and floating buffers of the same model (torch-ema:
parameters only, as it does):

* ``floor``: one ``lerp_`` over one contiguous fp32 buffer of the model's float size;
* d2ema as `EMATrainer` builds it (``flat=True``: built before the optimizer,
  the model's tensors re-pointed into one buffer) and plain ``EMA(model)`` (``flat=False``);
* ``seed loop``: the seed article's (and old D2Go's) ``ema.copy_(ema * d + w * (1 - d))``
  per tensor, walking ``named_parameters()`` and ``named_buffers()`` every step;
* ``foreach``: ``_foreach_mul_`` + ``_foreach_add_`` and ``_foreach_lerp_`` (what D2Go does
  now) over prebuilt tensor lists, i.e. their best case with no per-step Python walk;
* peers, where installed: timm ``ModelEmaV3``, ema-pytorch ``EMA``, torch-ema
  ``ExponentialMovingAverage`` and ``torch.optim.swa_utils.AveragedModel``.

Example::

    setup = build_methods(MODELS["tiny500"](), decay=0.9998)
    for m in setup.methods:
        m.step()
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn

import d2ema
from d2ema.app.speed.timing import Method

__all__ = [
    "DEFAULT",
    "FLAT",
    "MODELS",
    "MODEL_TITLES",
    "PEERS",
    "Setup",
    "build_methods",
    "describe",
    "float_state",
    "named_state",
]

# Peer libraries by distribution name (what `pip install` takes).
PEERS = ("timm", "ema-pytorch", "torch-ema")
# The two d2ema rows.
FLAT = "d2ema EMATrainer default (flat=True)"
DEFAULT = "d2ema EMA(model) (flat=False)"


def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50()


def _retinanet_r50_fpn() -> nn.Module:
    """detectron2's RetinaNet R50-FPN, built from code (random weights, no download)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.DEVICE = "cpu"  # moved to --device afterwards
    return build_model(cfg)


def _tiny500() -> nn.Module:
    """500 Linear(16, 16) layers: 1000 tiny tensors, where per-tensor overhead dominates."""
    return nn.Sequential(*(nn.Linear(16, 16) for _ in range(500)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": _resnet50,
    "retinanet_r50_fpn": _retinanet_r50_fpn,
    "tiny500": _tiny500,
}
MODEL_TITLES = {
    "resnet50": "torchvision ResNet-50",
    "retinanet_r50_fpn": "detectron2 RetinaNet R50-FPN",
    "tiny500": "500 × nn.Linear(16, 16)",
}


def named_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers, shared tensors once (what every method here tracks)."""
    seen: set[int] = set()
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


def float_state(model: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in named_state(model) if t.is_floating_point()]


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Move the weights off the averages once, so that no method lerps equal data."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for t in float_state(model):
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
        t.add_(noise, alpha=1e-3)


def describe(model: nn.Module) -> str:
    params = list(model.parameters())
    buffers = [b for _, b in model.named_buffers()]
    float_buffers = [b for b in buffers if b.is_floating_point()]
    nbytes = sum(t.numel() * t.element_size() for t in float_state(model))
    return (
        f"{len(params) + len(buffers)} tensors ({len(params)} parameters, "
        f"{len(float_buffers)} float buffers, {len(buffers) - len(float_buffers)} integer "
        f"buffers), {sum(p.numel() for p in params) / 1e6:.2f} M parameters, "
        f"{nbytes / 2**20:.1f} MiB of float state"
    )


def _floor(model: nn.Module, decay: float) -> Method:
    numel = sum(t.numel() for t in float_state(model))
    device = next(model.parameters()).device
    ema = torch.randn(numel, device=device)
    w = ema + 1e-3 * torch.randn(numel, device=device)
    return Method("floor: one lerp_ over a flat buffer", lambda: ema.lerp_(w, 1.0 - decay),
                  "memory-bandwidth floor")


def _d2ema(model: nn.Module, decay: float) -> tuple[Method, d2ema.EMA]:
    ema = d2ema.EMA(model, decay=decay, flat=False)
    cpu = next(model.parameters()).device.type == "cpu"
    note = "cat of small tensors + foreach lerp_" if cpu else "foreach lerp_"
    return Method(DEFAULT, lambda: ema.update(model), note), ema


def _d2ema_flat(model: nn.Module, decay: float) -> tuple[Method, d2ema.EMA, nn.Module]:
    own = copy.deepcopy(model)  # flat=True re-points the model's tensors: keep it private
    ema = d2ema.EMA(own, decay=decay, flat=True)
    method = Method(FLAT, lambda: ema.update(own), "one lerp_; own model copy")
    return method, ema, own


def _seed_loop(model: nn.Module, decay: float) -> Method:
    state = {name: t.detach().clone() for name, t in named_state(model)}

    @torch.no_grad()
    def step() -> None:
        for name, val in itertools.chain(model.named_parameters(), model.named_buffers()):
            ema_val = state[name]
            ema_val.copy_(ema_val * decay + val * (1.0 - decay))

    return Method("seed loop: copy_(e * d + w * (1 - d))", step, "walks named_* each step")


def _foreach_lists(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    weights = [t.detach() for t in float_state(model)]
    return [w.clone() for w in weights], weights


def _foreach_mul_add(model: nn.Module, decay: float) -> Method:
    averages, weights = _foreach_lists(model)

    @torch.no_grad()
    def step() -> None:
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, weights, alpha=1.0 - decay)

    return Method("foreach mul_ + add_", step, "prebuilt lists, float tensors")


def _foreach_lerp(model: nn.Module, decay: float) -> tuple[Method, list[torch.Tensor]]:
    averages, weights = _foreach_lists(model)

    @torch.no_grad()
    def step() -> None:
        torch._foreach_lerp_(averages, weights, 1.0 - decay)

    method = Method("foreach lerp_ (D2Go today)", step, "prebuilt lists, float tensors")
    return method, averages


def _timm(model: nn.Module, decay: float) -> Method:
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay)  # foreach=True is its default
    note = f"foreach={ema.foreach}; walks state_dict() each step (skips non-persistent buffers)"
    return Method("timm ModelEmaV3", lambda: ema.update(model), note)


def _ema_pytorch(model: nn.Module, decay: float, use_foreach: bool) -> Method:
    from ema_pytorch import EMA

    ema = EMA(
        model, beta=decay, update_after_step=0, update_every=1,
        include_online_model=False, use_foreach=use_foreach,
    )
    ema.update()  # its first update copies the weights; later ones average
    name = "ema-pytorch EMA" + (" (use_foreach=True)" if use_foreach else "")
    note = "per-tensor lerp_ (its default)" if not use_foreach else "opt-in foreach lerp"
    return Method(name, ema.update, note + "; warm-up decay schedule")


def _torch_ema(model: nn.Module, decay: float) -> Method:
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model.parameters(), decay=decay)
    return Method("torch-ema ExponentialMovingAverage", ema.update,
                  "**parameters only** (no buffers); per-tensor sub/mul/sub")


def _averaged_model(model: nn.Module, decay: float) -> Method:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)  # its first update copies the weights
    return Method("torch AveragedModel (EMA multi_avg_fn)", lambda: ema.update_parameters(model),
                  "use_buffers=True; groups tensors every step")


@dataclasses.dataclass
class Setup:
    """The methods built for one model, plus what the checks after timing need."""

    model: nn.Module
    methods: list[Method]
    missing: list[tuple[str, str]]  # (method, why it is absent)
    ema: d2ema.EMA
    ema_flat: d2ema.EMA
    flat_model: nn.Module
    foreach_averages: list[torch.Tensor]


def build_methods(model: nn.Module, decay: float, peers: bool = True) -> Setup:
    """Every method for ``model``; peers that cannot be imported are listed as missing
    (``peers=False``: all of them, without importing any)."""
    floor = _floor(model, decay)
    default, ema = _d2ema(model, decay)
    flat, ema_flat, flat_model = _d2ema_flat(model, decay)
    lerp, foreach_averages = _foreach_lerp(model, decay)
    mul_add = _foreach_mul_add(model, decay)
    methods = [floor, flat, default, _seed_loop(model, decay), mul_add, lerp]
    missing: list[tuple[str, str]] = []
    libraries: list[tuple[str, str, Callable[[], Method]]] = [
        ("timm ModelEmaV3", "timm", lambda: _timm(model, decay)),
        ("ema-pytorch EMA", "ema-pytorch", lambda: _ema_pytorch(model, decay, False)),
        ("ema-pytorch EMA (use_foreach=True)", "ema-pytorch",
         lambda: _ema_pytorch(model, decay, True)),
        ("torch-ema ExponentialMovingAverage", "torch-ema", lambda: _torch_ema(model, decay)),
        ("torch AveragedModel (EMA multi_avg_fn)", "torch", lambda: _averaged_model(model, decay)),
    ]
    for name, dist, build in libraries:
        if not peers:
            missing.append((name, "not timed (peers off)"))
            continue
        try:
            methods.append(build())
        except ImportError:
            missing.append((name, f"not installed (`pip install {dist}`)"))
    _perturb(model)
    _perturb(flat_model)
    return Setup(model, methods, missing, ema, ema_flat, flat_model, foreach_averages)

