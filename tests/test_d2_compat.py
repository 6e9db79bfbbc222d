"""The seed article's, D2Go's and detrex's EMA API, used as their code uses it, via d2ema.compat."""

from __future__ import annotations

import itertools
import logging
import math
import weakref

import pytest
import torch
from _d2_helpers import ReferenceEMA, assert_matches_reference, make_cfg, register_tiny
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, create_ddp_model, hooks
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from d2ema import EMA
from d2ema import compat as model_ema  # the only line that changes in the seed's code
from d2ema.d2 import ConfigError, lazy_model_ema_defaults


@pytest.fixture(scope="module", autouse=True)
def tiny_data(tmp_path_factory):
    register_tiny(tmp_path_factory.mktemp("cache"))


class SeedTrainer(DefaultTrainer):
    """The seed article's trainer (github.com/xiaohu2015/detectron2_ema), as written there."""

    def __init__(self, cfg):
        super(DefaultTrainer, self).__init__()
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        kwargs = {"trainer": weakref.proxy(self)}
        kwargs.update(model_ema.may_get_ema_checkpointer(cfg, model))
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, **kwargs)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        model_ema.may_build_model_ema(cfg, model)
        return model

    def build_hooks(self):
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0
        ret = [
            hooks.IterationTimer(),
            model_ema.EMAHook(self.cfg, self.model) if cfg.MODEL_EMA.ENABLED else None,
            hooks.LRScheduler(),
        ]
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self._last_eval_results = self.do_test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        return ret

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        return COCOEvaluator(dataset_name, output_dir=cfg.OUTPUT_DIR, use_fast_impl=False)

    @classmethod
    def do_test(cls, cfg, model, evaluators=None):
        if cfg.MODEL_EMA.ENABLED:
            with model_ema.apply_model_ema_and_restore(model):
                results = cls.test(cfg, model, evaluators=evaluators)
        else:
            results = cls.test(cfg, model, evaluators=evaluators)
        return results


def tracked(model):
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def test_seed_trainer_trains_checkpoints_and_evaluates(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=3, evaluate=True, decay=0.7)
    cfg.MODEL_EMA.DECAY_WARM_UP_FACTOR = 2.0  # D2Go's tf warm-up
    cfg.TEST.EVAL_PERIOD = 3
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    trainer = SeedTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert isinstance(trainer.model.ema_state, model_ema.EMAState)
    ref = ReferenceEMA(trainer.model, lambda n: min(0.7, (1 + n) / (2.0 + n)))
    trainer.register_hooks([ref])
    trainer.train()
    state = model_ema.get_model_ema_state(trainer.model)
    assert state.has_inited()
    assert_matches_reference(state.ema, ref.ref)
    assert "AP" in trainer._last_eval_results["bbox"]
    # the checkpoint holds the plain name->tensor dict the seed and D2Go write
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert set(ckpt["ema_state"]) == set(tracked(trainer.model))
    assert all(torch.equal(ckpt["ema_state"][k], v) for k, v in state.state_dict().items())


def test_d2go_checkpoint_loads_before_the_hook_binds_it(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=1, decay=0.5)
    donor = build_model(cfg)
    theirs = {
        k: v.detach() * 1.01 if v.is_floating_point() else v.clone()
        for k, v in tracked(donor).items()
    }
    torch.save({"model": donor.state_dict(), "ema_state": theirs}, tmp_path / "d2go.pth")
    trainer = SeedTrainer(cfg)
    trainer.checkpointer.load(str(tmp_path / "d2go.pth"))
    state = trainer.model.ema_state
    assert state.has_inited() and state.ema is None  # loaded, waiting for its model
    ref = ReferenceEMA(
        trainer.model, lambda n: 0.5, start_from={k: v.double() for k, v in theirs.items()}
    )
    trainer.register_hooks([ref])
    trainer.train()
    assert_matches_reference(state.ema, ref.ref)


def test_our_ema_state_loads_in_the_seed_code(tmp_path):
    """The seed's own EMAState.load_state_dict + apply_to, run on our checkpoint."""
    cfg = make_cfg("retinanet", tmp_path, max_iter=1)
    model = build_model(cfg)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    ema.update(model)
    saved = ema.state_dict()["ema_state"]
    fresh = build_model(cfg)
    with torch.no_grad():  # the seed's apply_to, verbatim in substance
        for name, val in itertools.chain(fresh.named_parameters(), fresh.named_buffers()):
            assert name in saved
            val.copy_(saved[name])
    for name, value in tracked(fresh).items():
        assert torch.equal(value, saved[name].to(value.dtype)), name


def test_ema_state_api(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = model_ema.EMAState.FromModel(model)
    assert state.has_inited() and state.device == torch.device("cpu")
    assert set(state.state_dict()) == set(tracked(model))
    assert "0.weight" in repr(state)
    updater = model_ema.EMAUpdater(state, decay=0.9, decay_warm_up_factor=3)
    expected = {k: v.detach().clone().double() for k, v in tracked(model).items()}
    for n in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(0.1 * n)
        updater.update(model)
        d = min(0.9, (1 + n) / (3 + n))
        for k, v in tracked(model).items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v.detach().double()
            else:
                expected[k] = v.double()
    assert_matches_reference(state.ema, expected)
    ema_model = state.get_ema_model(model)
    assert torch.allclose(ema_model[0].weight.double(), expected["0.weight"])
    old = model_ema.apply_model_ema(model, state, save_current=True)
    assert torch.allclose(model[0].weight.double(), expected["0.weight"])
    assert not torch.equal(old.state_dict()["0.weight"], model[0].weight)
    assert state.clear() is state and not state.has_inited()
    with pytest.raises(RuntimeError, match="EMAState is empty"):
        state.apply_to(model)


def test_apply_model_ema_and_restore_restores_after_error():
    model = torch.nn.Linear(3, 3)
    model.ema_state = model_ema.EMAState.FromModel(model)
    averaged = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = model.weight.detach().clone()
    with pytest.raises(KeyError), model_ema.apply_model_ema_and_restore(model):
        assert torch.equal(model.weight, averaged)
        raise KeyError("evaluation failed")
    assert torch.equal(model.weight, trained)


def lazy_cfg(tmp_path, **model_ema_keys):
    train = {
        "device": "cpu",
        "output_dir": str(tmp_path),
        "model_ema": {
            "enabled": True,
            "decay": 0.5,
            "device": "",
            "use_ema_weights_for_eval_only": False,
            **model_ema_keys,
        },
    }
    return OmegaConf.create({"train": train})


def test_lazyconfig_detrex_keys(tmp_path):
    cfg = lazy_cfg(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model_ema.may_build_model_ema(cfg, model)
    extra = model_ema.may_get_ema_checkpointer(cfg, model)
    assert set(extra) == {"ema_state", "ema_meta"}  # issue 8: compat checkpoints carry ema_meta
    hook = model_ema.EMAHook(cfg, model)
    hook.before_train()
    assert isinstance(hook.ema, EMA) and hook.ema.decay_at(1) == 0.5
    # every key of ours is accepted under train.model_ema; a typo is named
    model_ema.may_build_model_ema(
        lazy_cfg(tmp_path, **lazy_model_ema_defaults()), torch.nn.Linear(2, 2)
    )
    with pytest.raises(ConfigError, match=r"train.model_ema has unknown keys \['decy'\]"):
        model_ema.may_build_model_ema(lazy_cfg(tmp_path, decy=0.9), torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"train.model_ema.decay = 2"):
        model_ema.may_build_model_ema(lazy_cfg(tmp_path, decay=2), torch.nn.Linear(2, 2))


def test_yolov5_schedule_via_lazyconfig(tmp_path):
    cfg = lazy_cfg(tmp_path, decay=0.9999, schedule="yolov5", tau=2000.0)
    model = torch.nn.Linear(2, 2)
    model_ema.may_build_model_ema(cfg, model)
    hook = model_ema.EMAHook(cfg, model)
    hook.before_train()
    assert math.isclose(hook.ema.decay_at(2000), 0.9999 * (1 - math.exp(-1)))


def test_unknown_schedule_in_yacs(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, schedule="linear")
    with pytest.raises(ConfigError, match=r"MODEL_EMA.SCHEDULE = 'linear' is unknown"):
        SeedTrainer(cfg)
