"""D2Go's whole EMA API through ``d2ema.compat``: every public name of D2Go's
``d2go/modeling/ema.py`` (``from d2ema import compat as model_ema``) and of
``d2go/utils/ema_state.py`` (``from d2ema.compat.ema_state import EMAState``, no detectron2),
each called; checkpoints in D2Go's format (a plain name -> tensor dict of every parameter and
buffer, in the model's dtypes) pass both ways.

The names were read from facebookresearch/d2go at commit
f4ac15674818ec3c78288eb9f700b0213005cc8b (2024-11-01). D2Go's own update is written out below as
the reference (``ema * decay + value * (1 - decay)``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

D2GO_COMMIT = "f4ac15674818ec3c78288eb9f700b0213005cc8b"
# d2go/modeling/ema.py: module-level public names, and the public methods of its classes
MODELING = ["EMAState", "EMAUpdater", "add_model_ema_configs", "may_build_model_ema",
            "may_get_ema_checkpointer", "get_model_ema_state", "apply_model_ema",
            "apply_model_ema_and_restore", "EMAHook"]
MODELING_STATE = ["FromModel", "save_from", "apply_to", "apply_and_restore", "get_ema_model",
                  "device", "to", "has_inited", "clear", "get_model_state_iterator",
                  "state_dict", "load_state_dict", "include_frozen", "include_buffer", "state",
                  "prefix_to_remove"]
MODELING_UPDATER = ["init_state", "update", "decay", "device", "state", "use_lerp",
                    "decay_warm_up_factor"]
MODELING_HOOK = ["before_train", "after_train", "before_step", "after_backward", "after_step"]
# d2go/utils/ema_state.py
UTILS = ["EMAState"]
UTILS_STATE = ["from_model", "load_from", "has_inited", "apply_to", "state_dict",
               "load_state_dict", "to", "update", "decay", "device", "state"]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _named(model) -> dict[str, torch.Tensor]:
    """What D2Go's states hold: named_parameters() then named_buffers()."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _step(model, n: int) -> None:
    with torch.no_grad():
        model[0].weight.mul_(1.1).add_(0.05 * n)
        model[1].running_mean.add_(0.2)
        model[1].num_batches_tracked.add_(1)


def test_every_name_is_there():
    from d2ema import compat as model_ema
    from d2ema.compat import ema_state

    missing = [n for n in MODELING if not hasattr(model_ema, n)]
    missing += [f"EMAState.{n}" for n in MODELING_STATE if not hasattr(model_ema.EMAState(), n)]
    updater = model_ema.EMAUpdater(model_ema.EMAState())
    missing += [f"EMAUpdater.{n}" for n in MODELING_UPDATER if not hasattr(updater, n)]
    missing += [f"EMAHook.{n}" for n in MODELING_HOOK if not hasattr(model_ema.EMAHook, n)]
    missing += [f"ema_state.{n}" for n in UTILS if not hasattr(ema_state, n)]
    missing += [f"ema_state.EMAState.{n}" for n in UTILS_STATE
                if not hasattr(ema_state.EMAState(), n)]
    assert not missing, missing
    assert set(MODELING) <= set(model_ema.__all__)


def test_utils_ema_state_needs_no_detectron2():
    code = ("import sys\nfrom d2ema.compat.ema_state import EMAState\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('detectron2', 'fvcore')]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_utils_ema_state_as_d2go_lightning_uses_it():
    from d2ema.compat.ema_state import EMAState
    from d2ema.errors import D2EMAError

    model = _model()
    state = EMAState.from_model(model, decay=0.9, device="cpu")
    assert state.has_inited() and state.decay == 0.9 and state.device == "cpu"
    ref = {k: v.detach().double().clone() for k, v in _named(model).items()}
    for n in range(1, 4):
        _step(model, n)
        state.update(model)
        for k, v in _named(model).items():  # D2Go's update; integer buffers copied (d2ema)
            ref[k] = ref[k] * 0.9 + v.detach().double() * 0.1 if v.is_floating_point() \
                else v.detach().double()
    saved = state.state_dict()
    assert list(saved) == list(_named(model))  # D2Go's names, in D2Go's order
    assert all(saved[k].dtype == v.dtype for k, v in _named(model).items())
    for k, v in saved.items():
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-7)
    # a D2Go checkpoint (plain dict), loaded before the state meets a model, then applied
    d2go_saved = {k: v.detach().clone() + 1 if v.is_floating_point() else v.detach().clone()
                  for k, v in _named(model).items()}
    other = EMAState(0.5)
    other.load_state_dict(d2go_saved)
    assert other.has_inited()
    other.apply_to(model)
    assert all(torch.equal(v, d2go_saved[k]) for k, v in _named(model).items())
    fresh = EMAState(0.99)
    fresh.load_from(model)
    assert fresh.to("cpu") is fresh and torch.equal(fresh.state["0.weight"], model[0].weight)
    with pytest.raises(D2EMAError, match="decay should be in"):
        EMAState(1.5)
    with pytest.raises(D2EMAError, match="load_from"):
        EMAState().apply_to(model)


def test_modeling_api_each_name_called(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg

    from d2ema import compat as model_ema

    cfg = get_cfg()
    model_ema.add_model_ema_configs(cfg)
    cfg.MODEL.DEVICE, cfg.MODEL_EMA.ENABLED, cfg.MODEL_EMA.DECAY = "cpu", True, 0.5
    model = _model()
    model_ema.may_build_model_ema(cfg, model)
    state = model_ema.get_model_ema_state(model)
    assert isinstance(state, model_ema.EMAState) and not state.has_inited()
    hook = model_ema.EMAHook(cfg, model)
    hook.before_train()
    hook.before_step()
    _step(model, 1)
    hook.after_backward()  # no update there
    assert state.ema is not None and state.ema.step == 0
    hook.after_step()
    hook.after_train()
    assert state.ema.step == 1
    trained = {k: v.detach().clone() for k, v in _named(model).items()}
    # EMAState's methods
    assert [n for n, _ in state.get_model_state_iterator(model)] == list(_named(model))
    assert state.device == torch.device("cpu") and state.to("cpu") is state
    with state.apply_and_restore(model) as old:
        assert isinstance(old, model_ema.EMAState)
        assert torch.equal(old.state_dict()["0.weight"], trained["0.weight"])
        assert torch.equal(model[0].weight, state.state_dict()["0.weight"])
        assert not torch.equal(model[0].weight, trained["0.weight"])
    assert all(torch.equal(v, trained[k]) for k, v in _named(model).items())
    copy = state.get_ema_model(model)
    assert torch.equal(copy[0].weight, state.state_dict()["0.weight"])
    snap = model_ema.EMAState.FromModel(model)
    assert torch.equal(snap.state_dict()["0.weight"], trained["0.weight"])
    other = model_ema.EMAState()
    other.save_from(copy)
    assert other.has_inited() and other.clear() is other and not other.has_inited()
    assert "0.weight" in repr(state)
    # module functions
    old = model_ema.apply_model_ema(model, save_current=True)
    assert torch.equal(model[0].weight, state.state_dict()["0.weight"])
    old.apply_to(model)
    assert torch.equal(model[0].weight, trained["0.weight"])
    with model_ema.apply_model_ema_and_restore(model):
        assert torch.equal(model[0].weight, state.state_dict()["0.weight"])
    assert torch.equal(model[0].weight, trained["0.weight"])
    updater = model_ema.EMAUpdater(model_ema.EMAState(), decay=0.5)
    updater.init_state(model)
    _step(model, 2)
    updater.update(model)
    expected = 0.5 * trained["0.weight"] + 0.5 * model[0].weight.detach()
    torch.testing.assert_close(updater.state.state_dict()["0.weight"], expected)
    # the checkpoint: ema_state is D2Go's plain dict; a D2Go checkpoint loads back
    extra = model_ema.may_get_ema_checkpointer(cfg, model)
    assert "ema_state" in extra
    DetectionCheckpointer(model, str(tmp_path), **extra).save("ckpt")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=True)["ema_state"]
    assert list(saved) == list(_named(model))
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    d2go = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "ema_state": {k: v + 1 if v.is_floating_point() else v for k, v in saved.items()}}
    torch.save(d2go, tmp_path / "d2go.pth")
    fresh = _model(3)
    model_ema.may_build_model_ema(cfg, fresh)
    DetectionCheckpointer(fresh, **model_ema.may_get_ema_checkpointer(cfg, fresh)).load(
        str(tmp_path / "d2go.pth"))
    model_ema.apply_model_ema(fresh)
    assert torch.equal(fresh[0].weight, d2go["ema_state"]["0.weight"])


def test_docs_block_d2go_ema_state():
    """docs/detectron2.md's block, run as written on a small model."""
    from _doc_blocks import doc_block

    model = _model()
    before = model[0].weight.detach().clone()
    ns = {"model": model}
    exec(compile(doc_block("d2go-ema-state"), "d2go-ema-state", "exec"), ns)
    assert torch.equal(model[0].weight, before)  # an update of unchanged weights: the same
    assert list(ns["ema_state"].state_dict()) == list(_named(model))
