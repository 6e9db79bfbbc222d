"""D2Go's / the seed's API where users rely on it outside a trainer (issue 8): an empty
``EMAState`` that loads a plain dict, ``EMAHook(cfg, model)`` driven by hand, and compat
checkpoints that carry ``ema_meta`` so a resume keeps its step counter and schedule."""

from __future__ import annotations

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg

from d2ema import compat as model_ema
from d2ema.errors import ConfigError, D2EMAError


def _cfg(**keys):
    cfg = get_cfg()
    model_ema.add_model_ema_configs(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL_EMA.ENABLED = True
    for k, v in keys.items():
        cfg.MODEL_EMA[k.upper()] = v
    return cfg


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _state(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_empty_state_loads_a_plain_dict_then_applies_it():
    model = _model(0)
    saved = {k: v.detach().clone() + (1.0 if v.is_floating_point() else 0)
             for k, v in _state(model).items()}
    state = model_ema.EMAState()
    state.load_state_dict(saved)
    assert state.has_inited()
    state.apply_to(model)  # D2Go: works on a state loaded before it met the model
    for name, value in _state(model).items():
        assert torch.equal(value, saved[name]), name
    fresh = _model(1)
    copy = model_ema.EMAState()
    copy.load_state_dict(saved)
    ema_model = copy.get_ema_model(fresh)
    assert ema_model is not fresh
    for name, value in _state(ema_model).items():
        assert torch.equal(value, saved[name]), name
    assert not torch.equal(fresh[0].weight, saved["0.weight"])  # the original is untouched


def test_loaded_state_that_does_not_fit_is_refused_and_kept():
    model = _model(0)
    state = model_ema.EMAState()
    state.load_state_dict({"0.weight": torch.zeros(7, 3)})
    before = model[0].weight.detach().clone()
    with pytest.raises(D2EMAError, match=r"0\.weight"):
        state.apply_to(model)
    assert torch.equal(model[0].weight, before)
    assert state.ema is None and state.has_inited()  # still the loaded state, not half-bound


def test_empty_state_without_anything_loaded_says_how_to_fill_it():
    with pytest.raises(RuntimeError, match=r"save_from.*load_state_dict"):
        model_ema.EMAState().apply_to(_model())


def test_hook_driven_by_hand_counts_its_own_steps():
    """D2Go users call the hook's methods from their own loop; there is no trainer."""
    cfg = _cfg(decay=0.5, decay_warm_up_factor=2.0)
    model = _model()
    model_ema.may_build_model_ema(cfg, model)
    hook = model_ema.EMAHook(cfg, model)
    hook.before_train()
    ref = {k: v.detach().double().clone() for k, v in _state(model).items()}
    for n in range(1, 5):
        with torch.no_grad():
            model[0].weight.mul_(1.1).add_(0.05)
            model[1].running_mean.add_(0.2)
        hook.after_step()
        d = min(0.5, (1 + n) / (2.0 + n))
        for k, v in _state(model).items():
            ref[k] = d * ref[k] + (1 - d) * v.detach().double() if v.is_floating_point() \
                else v.detach().double()
    ema = model_ema.get_model_ema_state(model).ema
    assert ema.step == 4
    for k, v in ema.tensors().items():
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-7)


def test_compat_checkpoint_carries_meta_and_resumes_the_step(tmp_path):
    cfg = _cfg(decay=0.9, decay_warm_up_factor=10.0)
    model = _model()
    model_ema.may_build_model_ema(cfg, model)
    hook = model_ema.EMAHook(cfg, model)
    hook.before_train()
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        hook.after_step()
    checkpointer = DetectionCheckpointer(
        model, str(tmp_path), **model_ema.may_get_ema_checkpointer(cfg, model)
    )
    checkpointer.save("ckpt")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert saved["ema_meta"]["step"] == 3
    assert saved["ema_meta"]["schedule"]["name"] == "tf"

    resumed = _model(5)
    model_ema.may_build_model_ema(cfg, resumed)
    DetectionCheckpointer(
        resumed, str(tmp_path), **model_ema.may_get_ema_checkpointer(cfg, resumed)
    ).load(str(tmp_path / "ckpt.pth"))
    hook2 = model_ema.EMAHook(cfg, resumed)
    hook2.before_train()  # binds the loaded state (tensors and step) to the model
    ema = model_ema.get_model_ema_state(resumed).ema
    assert ema.step == 3
    for k, v in saved["ema_state"].items():
        assert torch.equal(ema.tensors()[k], v), k


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_warm_up_factor_below_one_is_refused_everywhere(factor):
    """One rule for the yacs key and D2Go's EMAUpdater argument (it used to be an error in
    one and silently clamped in the other)."""
    with pytest.raises(ConfigError, match="DECAY_WARM_UP_FACTOR"):
        model_ema.may_build_model_ema(_cfg(decay_warm_up_factor=factor), _model())
    state = model_ema.EMAState.FromModel(_model())
    with pytest.raises(ConfigError, match="decay_warm_up_factor"):
        model_ema.EMAUpdater(state, decay=0.9, decay_warm_up_factor=factor)


def test_d2go_ema_hook_test_as_d2go_writes_it(tmp_path):
    """D2Go's test_ema_hook: the checkpointables' ``ema_state`` is the model's EMAState, whose
    ``apply_to`` puts the EMA into another model; with DECAY 0 the EMA is the new weights."""
    cfg = _cfg(decay=0.0)
    model = _model(0)
    model_ema.may_build_model_ema(cfg, model)
    assert hasattr(model, "ema_state")
    hook = model_ema.EMAHook(cfg, model)
    hook.before_train()
    hook.before_step()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    hook.after_step()
    hook.after_train()

    checkpointables = model_ema.may_get_ema_checkpointer(cfg, model)
    assert checkpointables["ema_state"] is model.ema_state  # D2Go's code relies on it
    assert set(checkpointables) == {"ema_state", "ema_meta"}
    out = _model(1)
    checkpointables["ema_state"].apply_to(out)
    for name, value in _state(out).items():
        assert torch.equal(value, _state(model)[name]), name

    # the checkpointer round trip: EMAState.FromModel, save, load into another model's state
    DetectionCheckpointer(model, str(tmp_path), **checkpointables).save("ckpt")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert saved["ema_meta"]["step"] == 1 and torch.equal(saved["ema_state"]["0.weight"],
                                                          torch.full((4, 3), 2.0))
    other = _model(2)
    model_ema.may_build_model_ema(cfg, other)
    loaded = model_ema.may_get_ema_checkpointer(cfg, other)
    DetectionCheckpointer(other, str(tmp_path), **loaded).load(str(tmp_path / "ckpt.pth"))
    target = _model(3)
    other.ema_state.apply_to(target)
    assert torch.equal(target[0].weight, torch.full((4, 3), 2.0))
    assert other.ema_state.bind(other).step == 1  # ema_meta applied with the tensors
    copy = model_ema.EMAState.FromModel(target)
    copy.load_state_dict(other.ema_state.state_dict())
    assert torch.equal(copy.state_dict()["0.weight"], target[0].weight)


def test_compat_mistakes_are_d2ema_errors_and_still_what_d2go_raised():
    """Each is a D2EMAError (one line from the command) and the builtin D2Go code catches."""
    from d2ema.errors import EMANotBuiltError, EMANotLoadedError, ReservedAttributeError

    model = _model()
    with pytest.raises(EMANotBuiltError, match="may_build_model_ema") as err:
        model_ema.get_model_ema_state(model)
    assert isinstance(err.value, AttributeError)
    with pytest.raises(EMANotBuiltError) as err:
        model_ema.EMAHook(_cfg(), model)
    assert isinstance(err.value, AttributeError)
    model_ema.may_build_model_ema(_cfg(), model)
    with pytest.raises(ReservedAttributeError, match="reserved") as err:
        model_ema.may_build_model_ema(_cfg(), model)
    assert isinstance(err.value, ValueError)
    disabled = _cfg()
    disabled.MODEL_EMA.ENABLED = False
    with pytest.raises(ConfigError, match=r"MODEL_EMA\.ENABLED"):
        model_ema.EMAHook(disabled, model)
    with pytest.raises(EMANotLoadedError) as err:
        model_ema.EMAState().apply_to(_model())
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, D2EMAError)
