"""Score other weights for a finished detectron2 run: what ``d2ema posthoc --eval`` evaluates.

`RunEvaluator` reads the run's config (``OUTPUT_DIR/config.yaml``, which detectron2's
``default_setup`` writes for YAML and LazyConfig runs alike), builds its model once, loads its
last checkpoint (so tensors that no EMA tracks keep their trained values) and evaluates any
weights given by name on the config's first test set, or on another registered dataset (yacs
configs), with the run's evaluator (`build_evaluator`, or
``dataloader.evaluator`` of a LazyConfig).

Example::

    run = RunEvaluator.load("output/run")
    print(run.evaluate(None)["bbox"]["AP"])              # the raw weights
    print(run.evaluate(reconstruction.tensors)["bbox"]["AP"])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from d2ema.d2.evaluation.report import primary_ap
from d2ema.errors import UsageError, one_line
from d2ema.posthoc import load_tensors

__all__ = ['RunEvaluator', 'primary_ap']


logger = logging.getLogger(__name__)


def _checkpoint(output_dir: Path) -> Path:
    from d2ema.io.confined import confined

    final = confined(output_dir, "model_final.pth", f"{output_dir}")
    if final.is_file():
        return final
    from d2ema.d2.checkpoint.resume import tagged_checkpoint

    tagged, _ = tagged_checkpoint(output_dir)  # OutsideFolderError: names a file elsewhere
    if tagged is not None:
        return tagged
    raise UsageError(f"no checkpoint in {output_dir} (model_final.pth or last_checkpoint); the "
                     "raw weights of the run are needed for the tensors no EMA tracks")


class RunEvaluator:
    """The model and test set of a finished run, ready to score weights given by name."""

    def __init__(self, cfg, lazy: bool, output_dir: Path, folder: Path):
        self.cfg, self.lazy, self.output_dir = cfg, lazy, output_dir
        self.checkpoint = _checkpoint(output_dir)
        self.model = self._build_model()
        from d2ema.d2.checkpoint.checkpointers import (
            AtomicCheckpointer,  # .pth weights_only, .pkl arrays only
        )

        AtomicCheckpointer(self.model).load(str(self.checkpoint))
        self.raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.eval()
        self.folder = folder
        self._tests: dict[str | None, Callable[[], dict]] = {}

    @classmethod
    def load(cls, output_dir: str | Path, config_file: str | Path | None = None,
             prepare: Callable[[Any], Any] | None = None,
             inference_dir: str | Path | None = None,
             datasets: Sequence[str] = ()) -> RunEvaluator:
        """The run in ``output_dir`` (its ``config.yaml`` unless ``config_file``), loaded as
        ``d2ema train`` loads it: the datasets it records are registered, and ``datasets``
        (``NAME=ANNOTATIONS.json:IMAGE_DIR``) too. ``prepare`` runs on the config next (e.g.
        generating the demo's datasets); a test set nobody registered is a DatasetError."""
        output_dir = Path(output_dir)
        path = Path(config_file) if config_file else output_dir / "config.yaml"
        if not path.is_file():
            raise UsageError(f"config {path} not found; --eval needs the run's config "
                             "(detectron2 writes OUTPUT_DIR/config.yaml), or pass --config-file")
        from d2ema.d2.config.saved import check_saved_config
        from d2ema.d2.data.datasets import check_datasets_known, register_config_datasets

        if not config_file:  # the run's own config.yaml: data, never code
            check_saved_config(path)
        from d2ema.d2.config.view import is_lazy
        from d2ema.d2.engine.train_net import load_config

        lazy = is_lazy(str(path))
        cpu = [] if torch.cuda.is_available() else (
            ["train.device=cpu"] if lazy else ["MODEL.DEVICE", "cpu"])
        # train's own loader: _BASE_ files, the run's --dataset entries, the EMA keys checked
        cfg = load_config(str(path), cpu, datasets)
        if not lazy and not cfg.DATASETS.TEST:
            raise UsageError(f"config {path} has no DATASETS.TEST to evaluate on")
        register_config_datasets(cfg)
        if prepare is not None:
            prepare(cfg)
        check_datasets_known(cfg, tests_only=True)
        return cls(cfg, lazy, output_dir, Path(inference_dir or output_dir / "posthoc"))

    def _build_model(self):
        try:
            if self.lazy:
                from detectron2.config import instantiate

                return instantiate(self.cfg.model).to(self.cfg.train.get("device", "cpu"))
            from detectron2.modeling import build_model

            return build_model(self.cfg)
        except KeyError as e:  # detectron2's registries: a model part registered in your code
            if "registry" not in str(e):
                raise
            raise UsageError(
                f"cannot build the run's model here: {one_line(str(e))}. A model registered by "
                "your own code is built by your own script: rebuild the EMAs there with "
                "d2ema.posthoc.reconstruct and d2ema.posthoc.load_tensors (docs/ema-length.md: "
                "'post-hoc EMA in your own script'), or leave out --eval for the table") from e

    def _tester(self, dataset: str | None) -> Callable[[], dict]:
        from detectron2.evaluation import inference_on_dataset

        if self.lazy:
            if dataset is not None:
                raise UsageError(f"cannot evaluate on {dataset!r}: a LazyConfig run is "
                                 "evaluated on its dataloader.test only")
            from detectron2.config import instantiate

            from d2ema.d2.evaluation.evaluator import adapt_evaluator

            loader = instantiate(self.cfg.dataloader.test)
            evaluator = adapt_evaluator(instantiate(self.cfg.dataloader.evaluator))
        else:
            from detectron2.data import build_detection_test_loader

            from d2ema.d2.evaluation.evaluator import build_evaluator

            name = dataset or self.cfg.DATASETS.TEST[0]
            loader = build_detection_test_loader(self.cfg, name)
            inference = self.folder / "inference" / (dataset or "")
            evaluator = build_evaluator(self.cfg, name, str(inference))
        return lambda: dict(inference_on_dataset(self.model, loader, evaluator) or {})

    def evaluate(self, tensors: Mapping[str, torch.Tensor] | None,
                 dataset: str | None = None) -> dict:
        """Results for the run's raw weights with ``tensors`` in place (None: raw only), on
        ``dataset`` (default: the config's first test set)."""
        if dataset not in self._tests:
            self._tests[dataset] = self._tester(dataset)
        self.model.load_state_dict(self.raw)
        if tensors is not None:
            load_tensors(self.model, tensors)
        return self._tests[dataset]()
