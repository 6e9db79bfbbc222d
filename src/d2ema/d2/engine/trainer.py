"""``EMATrainer``: detectron2's ``DefaultTrainer`` with EMA, and the mixin for custom trainers.

What the mixin changes, each in the method that owns it:

* ``build_model`` attaches the EMA (``model.ema_state``) when ``MODEL_EMA.ENABLED``, before
  the optimizer and DDP exist, so it uses flat mode unless ``MODEL_EMA.FLAT`` is False;
* ``build_hooks`` makes the checkpointer an `EMACheckpointer` (EMA saved with every
  checkpoint, checked before anything loads) and adds `EMAUpdateHook` right after the timer,
  so checkpoints and evaluations of an iteration see that iteration's EMA; without EMA, the
  checkpointer refuses to resume from a checkpoint that has one (``DISCARD_ON_RESUME``). Either
  way checkpoints are written atomically and a resume falls back to the newest complete
  checkpoint (`AtomicCheckpointer`);
* ``build_evaluator`` has a default (COCO for COCO-style datasets), which v0.6 lacks;
* ``test`` evaluates the raw weights (``bbox``) and the EMA weights (``ema/bbox``); detectron2's
  ``EvalHook`` writes both to EventStorage, so TensorBoard draws the two curves. With
  ``TEST.PRECISE_BN.ENABLED`` BN statistics are recomputed for the EMA weights too;
* ``state_dict`` / ``load_state_dict`` carry the optimizer state on detectron2 v0.6 as well (main
  already does), so a resumed run keeps its SGD momentum;
* ``train`` ends, with ``MODEL_EMA.POSTHOC.SELECT``, by choosing the EMA length on held-out data
  and writing it as ``model_final_posthoc.pth`` (`d2ema.d2.evaluation.select`);
* ``resume_or_load`` warns once when the checkpoint it resumes from has no EMA; the EMA then
  restarts from the loaded weights, as it does for a new training from ``MODEL.WEIGHTS`` (whose
  EMA, if any, fvcore does not load: only a resume loads the whole training state).

`check_trainer_bases` refuses ``class Trainer(DefaultTrainer, EMATrainerMixin)`` when
the class is defined: ``DefaultTrainer``'s methods would come first and train with no EMA.

Example::

    cfg = get_cfg(); add_model_ema_configs(cfg); cfg.MODEL_EMA.ENABLED = True
    trainer = EMATrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from detectron2.engine import DefaultTrainer, HookBase, hooks
from torch import nn

from d2ema.d2.checkpoint.checkpointers import (
    EMACheckpointer,
    NoEMACheckpointer,
)
from d2ema.d2.config import settings as config_settings
from d2ema.d2.config.keys import core_words_named
from d2ema.d2.config.settings import EMASettings
from d2ema.d2.engine.build import build_model_ema, settings_given
from d2ema.d2.engine.hooks import EMAUpdateHook
from d2ema.d2.evaluation.evaluator import (
    EMA_PREFIX,
    adapt_evaluator,
    build_evaluator,
    evaluate_with_ema,
    precise_bn,
)
from d2ema.d2.evaluation.select import select_after_training
from d2ema.d2.family import get_extra_emas, get_model_ema, get_settings
from d2ema.ema import EMA
from d2ema.errors import TrainerError

__all__ = ['EMATrainer', 'EMATrainerMixin', 'check_trainer_bases']


def check_trainer_bases(cls: type, mixin: type) -> None:
    """Refuse a class whose bases put a detectron2 trainer before ``mixin`` in the MRO."""
    from detectron2.engine import TrainerBase

    mro = cls.__mro__
    for base in mro[: mro.index(mixin)]:
        if issubclass(base, TrainerBase) and not issubclass(base, mixin):
            bases = [b.__name__ for b in cls.__bases__]
            order = [mixin.__name__, *(b for b in bases if b != mixin.__name__)]
            raise TrainerError(
                f"class {cls.__name__}({', '.join(bases)}): {base.__name__} comes before "
                f"{mixin.__name__}, so its build_model/build_hooks/test win and the trainer "
                f"would run without EMA; put the mixin first: class "
                f"{cls.__name__}({', '.join(order)})"
            )


logger = logging.getLogger(__name__)


# detectron2 main saves the inner trainer (optimizer) in DefaultTrainer.state_dict; v0.6 does not.
_SAVES_OPTIMIZER = "state_dict" in vars(DefaultTrainer)


def _takes_folder(build_evaluator) -> bool:
    """Whether a ``build_evaluator(cfg, dataset_name, ...)`` accepts a third argument."""
    params = list(inspect.signature(build_evaluator).parameters.values())
    return len(params) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)


class EMATrainerMixin:
    """Put before ``DefaultTrainer`` (or a subclass of it) in the bases to train with EMA:
    ``class Trainer(EMATrainerMixin, DefaultTrainer)``; the other order is refused when the
    class is defined (`TrainerError`), as it would train without EMA."""

    ema_settings: EMASettings

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_trainer_bases(cls, EMATrainerMixin)

    def __init__(self, cfg: Any, *args: Any, ema_settings: EMASettings | None = None,
                 **kwargs: Any) -> None:
        """``ema_settings``: the settings already read from ``cfg`` (``d2ema train`` reads them
        once, before any process starts); read here otherwise. Kept as ``self.ema_settings``
        and with the model, for ``build_hooks``, ``test`` and the selection."""
        self.ema_settings = ema_settings or config_settings.ema_settings(cfg)
        # build_model is a classmethod (cfg only); core errors get the keys beside them
        with settings_given(self.ema_settings), core_words_named(self.ema_settings.key):
            super().__init__(cfg, *args, **kwargs)  # type: ignore[call-arg]  # the trainer's

    @classmethod
    def build_model(cls, cfg: Any) -> nn.Module:
        model = super().build_model(cfg)
        build_model_ema(cfg, model)
        return model

    def build_hooks(self) -> list[HookBase]:
        ema = get_model_ema(self.model)
        old = self.checkpointer
        if ema is None:  # a resume must not drop a checkpoint's EMA unnoticed
            self.checkpointer = NoEMACheckpointer(
                old.model, old.save_dir, discard_ema=self.ema_settings.discard_on_resume,
                key=self.ema_settings.key,
                save_to_disk=old.save_to_disk, **old.checkpointables,
            )
            return super().build_hooks()
        self.checkpointer = EMACheckpointer(
            old.model, old.save_dir, ema=ema, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        ret = super().build_hooks()
        timer = next((i for i, h in enumerate(ret) if isinstance(h, hooks.IterationTimer)), -1)
        hook = EMAUpdateHook(ema, self.model, checkpointer=self.checkpointer,
                       checkpoint_period=self.cfg.SOLVER.CHECKPOINT_PERIOD)
        ret.insert(timer + 1, hook)
        return ret

    @classmethod
    def build_evaluator(cls, cfg: Any, dataset_name: str, output_folder: str | None = None) -> Any:
        """The trainer's own ``build_evaluator`` when a class after the mixin has one; else COCO
        for COCO-style datasets (see `d2ema.d2.evaluation.evaluator.build_evaluator`)."""
        parent = super().build_evaluator
        try:  # DefaultTrainer's raises NotImplementedError; a user's may not take output_folder
            if output_folder is None or not _takes_folder(parent):  # (v0.6's does not)
                return parent(cfg, dataset_name)
            return parent(cfg, dataset_name, output_folder)
        except NotImplementedError:
            return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_ema(cls, cfg: Any, model: nn.Module, ema: EMA | None, *, raw: bool,
                      evaluators: Any = None, prefix: str = EMA_PREFIX) -> dict[str, Any]:
        """detectron2's plain ``test`` for the raw weights (if ``raw``) and for ``ema``'s
        weights (``prefix`` keys), with PreciseBN for the EMA weights when the config asks."""
        plain_test = super(EMATrainerMixin, _adapting(cls)).test
        if evaluators is not None:
            evaluators = list(evaluators) if isinstance(evaluators, (list, tuple)) else [
                evaluators]

        def bn_stats(m) -> None:
            precise_bn(m, cls.build_train_loader(cfg), cfg.TEST.PRECISE_BN.NUM_ITER)

        def adapted_test(m):
            if evaluators is not None:  # each weights' own output folder
                for e in evaluators:
                    adapt_evaluator(e)
            return plain_test(cfg, m, evaluators)

        return evaluate_with_ema(
            adapted_test,
            model,
            ema,
            raw=raw,
            before_ema_test=bn_stats if cfg.TEST.PRECISE_BN.ENABLED else None,
            prefix=prefix,
        )

    @classmethod
    def test(cls, cfg: Any, model: nn.Module, evaluators: Any = None) -> dict[str, Any]:
        """Raw weights (unless ``EVAL_BOTH`` is off), the EMA (``ema/``) and each extra EMA
        (``ema_0.99/``, ``ema_sigma0.1/``)."""
        ema = get_model_ema(model)
        raw = ema is None or _settings(cfg, model).eval_both
        results = cls.test_with_ema(cfg, model, ema, raw=raw, evaluators=evaluators)
        for name, extra in get_extra_emas(model).items():
            results.update(cls.test_with_ema(cfg, model, extra, raw=False,
                                             evaluators=evaluators, prefix=f"{name}/"))
        return results

    @classmethod
    def test_eval_only(cls, cfg: Any, model: nn.Module,
                       evaluators: Any = None) -> dict[str, Any]:
        """``--eval-only``: the EMA weights with ``USE_EMA_WEIGHTS_FOR_EVAL_ONLY``, else the raw
        ones (both if ``EVAL_BOTH`` and the EMA is used)."""
        ema = get_model_ema(model)
        settings = _settings(cfg, model)
        if ema is None or not settings.use_ema_weights_for_eval_only:
            return cls.test_with_ema(cfg, model, None, raw=True, evaluators=evaluators)
        return cls.test_with_ema(
            cfg, model, ema, raw=settings.eval_both, evaluators=evaluators
        )

    def train(self) -> Any:
        """detectron2's ``train``; then, with ``MODEL_EMA.POSTHOC.SELECT``, the choice of the
        EMA length (`select_posthoc`)."""
        with core_words_named(self.ema_settings.key):
            ret = super().train()
            self.select_posthoc()
        return ret

    def select_posthoc(self) -> None:
        """With ``MODEL_EMA.POSTHOC.SELECT``: rebuild, evaluate and choose the EMA length, write
        ``OUTPUT_DIR/model_final_posthoc.pth`` (`d2ema.d2.evaluation.select`); the chosen
        EMA's test results join ``_last_eval_results`` under ``posthoc/``. Else nothing."""
        results = getattr(self, "_last_eval_results", None)
        chosen = select_after_training(self, results)
        if chosen is not results:
            self._last_eval_results = chosen

    def resume_or_load(self, resume: bool = True) -> None:
        resuming = resume and self.checkpointer.has_checkpoint()
        super().resume_or_load(resume=resume)
        checkpointer = self.checkpointer
        if not isinstance(checkpointer, EMACheckpointer) or checkpointer.ema_loaded:
            return
        if resuming:
            logger.warning(
                "Checkpoint %s has no EMA (key 'ema_state'); the EMA restarts from its weights.",
                getattr(checkpointer, "resumed_from", None) or checkpointer.get_checkpoint_file(),
            )
        elif self.cfg.MODEL.WEIGHTS:
            logger.info("The EMA starts from the weights loaded from %s.", self.cfg.MODEL.WEIGHTS)

    def state_dict(self) -> dict[str, Any]:
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if not _SAVES_OPTIMIZER and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])


def _settings(cfg: Any, model: nn.Module) -> EMASettings:
    """The settings ``model``'s EMAs were built with; read from ``cfg`` for another model."""
    return get_settings(model) or config_settings.ema_settings(cfg)


_ADAPTING: dict[type, type] = {}


def _adapting(cls: type) -> type:
    """``cls`` whose ``build_evaluator`` (the user's own, if any) returns
    `adapt_evaluator`'s evaluators: detectron2's ``test``
    builds
    them through ``cls``."""
    if cls in _ADAPTING.values():
        return cls
    if cls not in _ADAPTING:
        class Adapting(cls):
            @classmethod
            def build_evaluator(klass, cfg, dataset_name, *args, **kwargs):
                return adapt_evaluator(super().build_evaluator(cfg, dataset_name, *args,
                                                               **kwargs))

        Adapting.__name__, Adapting.__qualname__ = cls.__name__, cls.__qualname__
        _ADAPTING[cls] = Adapting
    return _ADAPTING[cls]


class EMATrainer(EMATrainerMixin, DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with EMA (see `EMATrainerMixin`): the model's EMA is built
    with the model, updated after every step, saved in every checkpoint and evaluated beside
    the raw weights.

    Args:
        cfg: a detectron2 config with the ``MODEL_EMA`` keys (`add_model_ema_configs`);
            ``MODEL_EMA.ENABLED True`` turns the EMA on, the other keys are in the
            configuration reference. Without it, this is ``DefaultTrainer``.
        ema_settings: the settings already read from ``cfg`` (`ema_settings(cfg)`), when the
            caller has them (``d2ema train`` reads them once, before any process starts);
            read from ``cfg`` otherwise.

    Example::

        cfg = get_cfg(); add_model_ema_configs(cfg); cfg.MODEL_EMA.ENABLED = True
        trainer = EMATrainer(cfg); trainer.resume_or_load(resume=False); trainer.train()
    """

    def __init__(self, cfg: Any, *, ema_settings: EMASettings | None = None) -> None:
        # detectron2's, given a signature the docs can show
        super().__init__(cfg, ema_settings=ema_settings)
