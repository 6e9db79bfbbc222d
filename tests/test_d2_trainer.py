"""EMATrainer against real detectron2 v0.6 on the CPU: EMA exactness, checkpoints, exact resume,
evaluation of raw and EMA weights, and safety when evaluation fails."""

from __future__ import annotations

import logging

import pytest
import torch
from _d2_helpers import (
    ReferenceEMA,
    Trainer,
    assert_matches_reference,
    make_cfg,
    register_tiny,
    tracked_state,
    yolov5,
)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, hooks

from d2ema.d2 import ConfigError, EMAUpdateHook, get_model_ema


@pytest.fixture(scope="module", autouse=True)
def tiny_data(tmp_path_factory):
    register_tiny(tmp_path_factory.mktemp("cache"))


def train(cfg, resume=False, extra_hooks=()):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.register_hooks(list(extra_hooks))
    return trainer


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_ema_matches_reference_after_each_step(arch, tmp_path):
    cfg = make_cfg(arch, tmp_path, max_iter=3, decay=0.8, schedule="yolov5", tau=2.0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    ref = ReferenceEMA(trainer.model, yolov5(0.8, 2.0))
    trainer.register_hooks([ref])
    trainer.train()
    ema = get_model_ema(trainer.model)
    assert ema.step == 3 and [s for s, _ in ref.history] == [1, 2, 3]
    assert_matches_reference(ema, ref.ref)
    # the EMA really differs from the raw weights (it is not a copy)
    raw = tracked_state(trainer.model)
    assert any(not torch.equal(raw[n], t) for n, t in ema.tensors().items())
    # the hook runs right after the timer, before checkpoint and evaluation hooks
    kinds = [type(h) for h in trainer._hooks]
    assert kinds.index(EMAUpdateHook) == kinds.index(hooks.IterationTimer) + 1
    assert kinds.index(EMAUpdateHook) < kinds.index(hooks.PeriodicCheckpointer)


def test_resume_is_exact_with_warmup_schedule(tmp_path):
    decay, tau = 0.9, 3.0
    cfg = make_cfg("retinanet", tmp_path, max_iter=3, decay=decay, schedule="yolov5", tau=tau)
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    first = train(cfg)
    first.train()
    saved = {k: v.clone() for k, v in get_model_ema(first.model).tensors().items()}
    momentum = {
        k: v["momentum_buffer"].clone() for k, v in first.optimizer.state_dict()["state"].items()
    }
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert set(ckpt["ema_state"]) == set(saved)
    assert ckpt["ema_meta"]["step"] == 3 and ckpt["ema_meta"]["schedule"]["name"] == "yolov5"

    cfg2 = cfg.clone()
    cfg2.defrost()
    cfg2.SOLVER.MAX_ITER = 6
    second = Trainer(cfg2)
    second.resume_or_load(resume=True)
    ema = get_model_ema(second.model)
    assert second.start_iter == 3 and ema.step == 3
    for name, value in ema.tensors().items():  # bit-identical right after loading
        assert torch.equal(value, saved[name]), name
    # SGD momentum came back too (detectron2 v0.6's DefaultTrainer alone does not save it)
    restored = second.optimizer.state_dict()["state"]
    assert restored and all(
        torch.equal(restored[k]["momentum_buffer"], v) for k, v in momentum.items()
    )
    ref = ReferenceEMA(
        second.model, yolov5(decay, tau), start_from={k: v.double() for k, v in saved.items()}
    )
    second.register_hooks([ref])
    second.train()
    assert [s for s, _ in ref.history] == [4, 5, 6]  # the ramp continues from step 4
    assert_matches_reference(ema, ref.ref)


class Boom(RuntimeError):
    pass


def test_exception_in_evaluation_restores_raw_weights(tmp_path, monkeypatch):
    cfg = make_cfg("retinanet", tmp_path, max_iter=3, evaluate=True, decay=0.5)
    trainer = train(cfg)
    model = trainer.model
    ref = ReferenceEMA(model, lambda n: 0.5)
    seen = {}

    def failing_inference(model, data_loader, evaluator):
        raise Boom("evaluator crashed")

    class EvaluateAndFail(HookBase):
        def after_step(self):
            if self.trainer.iter != 1:
                return
            before = {k: v.clone() for k, v in tracked_state(model).items()}
            ema = get_model_ema(model)
            seen["ema_differs"] = any(
                not torch.equal(before[k], v) for k, v in ema.tensors().items()
            )
            with monkeypatch.context() as m:
                m.setattr("detectron2.engine.defaults.inference_on_dataset", failing_inference)
                with pytest.raises(Boom):
                    Trainer.test(cfg, model)
            seen["restored"] = all(
                torch.equal(v, before[k]) for k, v in tracked_state(model).items()
            )

    trainer.register_hooks([ref, EvaluateAndFail()])
    trainer.train()  # training goes on after the failed evaluation
    assert seen == {"ema_differs": True, "restored": True}
    assert_matches_reference(get_model_ema(model), ref.ref)


def test_evaluates_raw_and_ema_and_writes_both_curves(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=2, evaluate=True, decay=0.5)
    cfg.TEST.EVAL_PERIOD = 2
    trainer = train(cfg)
    trainer.train()
    results = trainer._last_eval_results
    assert set(results) == {"bbox", "ema/bbox"}
    assert "AP" in results["bbox"] and "AP" in results["ema/bbox"]
    scalars = trainer.storage.latest()
    assert "bbox/AP" in scalars and "ema/bbox/AP" in scalars


def test_eval_both_off_evaluates_only_ema(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=1, evaluate=True, eval_both=False)
    trainer = train(cfg)
    trainer.train()
    assert set(Trainer.test(cfg, trainer.model)) == {"ema/bbox"}


def test_checkpoint_without_ema_starts_from_loaded_weights(tmp_path, caplog):
    cfg = make_cfg("retinanet", tmp_path, max_iter=1)
    donor = Trainer(cfg)
    with torch.no_grad():
        for p in donor.model.parameters():
            p.mul_(1.01)
    # a checkpoint to resume from, written without EMA (plain detectron2)
    DetectionCheckpointer(donor.model, str(tmp_path), trainer=donor).save("plain")
    loaded = {k: v.clone() for k, v in tracked_state(donor.model).items()}
    with caplog.at_level(logging.WARNING):
        trainer = train(cfg, resume=True)
    assert sum("has no EMA" in r.getMessage() for r in caplog.records) == 1
    seen = {}

    class Check(HookBase):
        def before_train(self):  # runs after EMAUpdateHook.before_train, before any step
            ema = get_model_ema(self.trainer.model).tensors()
            seen["ema_is_loaded"] = all(torch.equal(ema[k], v) for k, v in loaded.items())

    trainer.register_hooks([Check()])
    trainer.train()
    assert seen == {"ema_is_loaded": True}


def test_mismatched_ema_checkpoint_fails_and_leaves_model_untouched(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=1)
    trainer = Trainer(cfg)
    ckpt = {
        "model": {k: v + 1 for k, v in trainer.model.state_dict().items()},
        "ema_state": {"backbone.nonexistent": torch.zeros(3)},
    }
    torch.save(ckpt, tmp_path / "bad.pth")
    before = {k: v.clone() for k, v in tracked_state(trainer.model).items()}
    ema_before = {k: v.clone() for k, v in get_model_ema(trainer.model).tensors().items()}
    with pytest.raises(ValueError, match="missing in the checkpoint") as err:
        trainer.checkpointer.load(str(tmp_path / "bad.pth"))
    assert "backbone.nonexistent" in str(err.value)
    for name, value in tracked_state(trainer.model).items():
        assert torch.equal(value, before[name]), name
    for name, value in get_model_ema(trainer.model).tensors().items():
        assert torch.equal(value, ema_before[name]), name


def test_d2go_style_checkpoint_loads(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=1)
    trainer = Trainer(cfg)
    d2go_ema = {
        k: v.clone() + 0.25
        for k, v in tracked_state(trainer.model).items()
        if v.is_floating_point()
    }
    d2go_ema.update(
        {k: v.clone() for k, v in tracked_state(trainer.model).items() if not v.is_floating_point()}
    )
    torch.save({"model": trainer.model.state_dict(), "ema_state": d2go_ema}, tmp_path / "d2go.pth")
    trainer.checkpointer.load(str(tmp_path / "d2go.pth"))
    assert trainer.checkpointer.ema_loaded
    for name, value in get_model_ema(trainer.model).tensors().items():
        assert torch.equal(value, d2go_ema[name].to(value.dtype)), name


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("DECAY", 1.5, r"MODEL_EMA.DECAY = 1.5 must be a number in \[0.0, 1.0\]"),
        ("SCHEDULE", "cosine", r"MODEL_EMA.SCHEDULE = 'cosine' is unknown"),
        ("UPDATE_EVERY", 0, r"MODEL_EMA.UPDATE_EVERY = 0 must be an integer"),
        ("START_ITER", -1, r"MODEL_EMA.START_ITER = -1"),
        ("DEVICE", "cuda:7", r"MODEL_EMA.DEVICE = 'cuda:7' does not exist"),
        ("DEVICE", "gpu", r"MODEL_EMA.DEVICE = 'gpu' is not a device"),
        ("MASTER_DTYPE", "float8", r"MODEL_EMA.MASTER_DTYPE = 'float8'"),
        ("TAU", -3.0, r"MODEL_EMA.TAU = -3.0 must be a number in \(0.0, inf\)"),
    ],
)
def test_invalid_config_fails_when_trainer_is_built(tmp_path, key, value, message):
    schedule = {"TAU": {"schedule": "yolov5"}}.get(key, {})
    cfg = make_cfg("retinanet", tmp_path, **schedule)
    cfg.MODEL_EMA[key] = value
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg)
