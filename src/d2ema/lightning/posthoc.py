"""``PostHocEMA``: post-hoc EMA in Lightning: snapshots while training, the length chosen at
the end of ``fit()`` on a validation dataloader the user names.

The core `d2ema.PostHocEMA` keeps power EMAs (sigma_rel 0.05 and 0.10 by default) and
writes their snapshots every ``snapshot_every`` steps; their size and the free disk are stated
(and checked) when ``fit()`` starts. When training ends, `d2ema.PostHocEMA.select`
rebuilds a sweep of lengths (0.01 to 0.25 by default), each is swapped into the model and
scored on ``select_on`` (the mean of the ``monitor`` metric that ``validation_step`` logs, or of
the loss it returns, lower is better unless ``mode="max"``; or ``score_fn(module)``), and the
raw weights are scored too: when they beat every EMA length the model keeps them and the log
says "raw weights beat every EMA length". The chosen weights go to ``ema_best.pth``, a table
(``posthoc_selection.md``) and a plot (``posthoc_selection.png``, with matplotlib) to the
logger's folder, and each length's score to the loggers as ``posthoc/<length>``.

Example::

    ph = PostHocEMA(select_on=holdout_loader, monitor="val/loss", snapshot_every=200)
    trainer = pl.Trainer(max_steps=5000, callbacks=[ph])
    trainer.fit(module, train_loader, val_loader)
    print(ph.choice, ph.scores)       # e.g. 'sigma_rel 0.03', {'raw': -0.41, 'sigma_rel 0.01': ...}
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import d2ema
from d2ema.distributed import full_state_dict
from d2ema.lightning._engine import atomic_write_bytes, atomic_write_text
from d2ema.lightning.callback import EMA, _info
from d2ema.lightning.checkpoint import export_weights
from d2ema.lightning.errors import LightningEMAError
from d2ema.posthoc import PostHocError, load_tensors

__all__ = ["RAW", "PostHocEMA"]

logger = logging.getLogger(__name__)

RAW = "raw"


class PostHocEMA(EMA):
    """`EMA` whose length is chosen after training (see the module).

    Args:
        folder: where snapshots go (default: ``ema_snapshots`` in the logger's folder).
        sigma_rels: the power EMAs tracked; the first is the one validated during training.
        snapshot_every: snapshot period in optimizer steps (and at the last step).
        dtype: snapshot precision (``"float16"`` halves the disk use).
        select_on: the dataloader (or a function returning it) the length is chosen on; None:
            no choice, the first power EMA is the result.
        monitor: the metric ``validation_step`` logs that scores a length (None: the mean of
            what ``validation_step`` returns).
        mode: ``"min"`` or ``"max"``: which ``monitor`` values are better.
        score_fn: instead of ``monitor``: ``score_fn(module) -> float``, higher is better.
        select_sigma_rels: the sweep (default 0.01..0.25, where the snapshots can represent it).
        **kwargs: as for `EMA` (``module``, ``validate_both``,
            ``final``, ``every``, ``device``, ...).
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, *,
                 sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every: int = 1000,
                 dtype: str = "float32", select_on: Any = None, monitor: str | None = None,
                 mode: str = "min", score_fn: Callable[[pl.LightningModule], float] | None = None,
                 select_sigma_rels: Sequence[float] | None = None, **kwargs: Any):
        if kwargs.get("sharded"):
            raise LightningEMAError("PostHocEMA keeps whole power EMAs; sharded=True is for EMA")
        if mode not in ("min", "max"):
            raise LightningEMAError(f"mode={mode!r}: use 'min' or 'max'")
        super().__init__(schedule="sigma_rel", **kwargs)
        self.folder, self.sigma_rels_tracked = folder, tuple(sigma_rels)
        self.snapshot_every, self.dtype = snapshot_every, dtype
        self.select_on, self.monitor, self.mode, self.score_fn = select_on, monitor, mode, score_fn
        self.select_sigma_rels = select_sigma_rels
        self.posthoc: d2ema.PostHocEMA | None = None
        self.choice: str | None = None  # the label chosen: "sigma_rel 0.05", ..., or "raw"
        self.scores: dict[str, float] = {}
        self._chosen: dict[str, torch.Tensor] | None = None
        self.out_dir: Path | None = None  # the logger's folder: report, plot, ema_best.pth

    # ------------------------------------------------------------------ the engine
    def _make_engine(self, trainer: pl.Trainer, target: nn.Module) -> d2ema.EMA:
        if self.posthoc is not None:  # an earlier fit(): its last snapshot written
            self.posthoc.close()
        self.choice, self._chosen, self.scores = None, None, {}
        # trainer.log_dir is a collective under DDP: read it here, where every rank is
        self.out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        folder = Path(self.folder) if self.folder is not None else self.out_dir / "ema_snapshots"
        self.posthoc = ph = d2ema.PostHocEMA(
            target, folder, self.sigma_rels_tracked, snapshot_every=self.snapshot_every,
            dtype=self.dtype, enabled=trainer.is_global_zero, **self.ema_kwargs)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            with contextlib.suppress(Exception):
                est = trainer.estimated_stepping_batches
                total = int(est) if math.isfinite(est) else None
        if total and self.snapshot_every:
            _info(trainer, "%s", ph.writer.describe(self.snapshot_every, total))
            try:
                ph.writer.check_space(self.snapshot_every, total)
            except PostHocError as e:  # the core names the detectron2 keys: name ours
                raise LightningEMAError(
                    str(e).split("; set")[0] + "; set a longer snapshot_every=, "
                    "dtype='float16', or a folder= on a larger disk") from None
        return next(iter(ph.emas.values()))

    def _step_engine(self, target: nn.Module, step: int) -> None:
        assert self.posthoc is not None
        self.posthoc.update(target, step)

    def state_dict(self) -> dict[str, Any]:
        if self.posthoc is None:
            return dict(self._pending[0]) if self._pending else {}
        self.posthoc.writer.flush()  # as PostHocEMA.state_dict: no resume past a lost snapshot
        state = {"posthoc": {name: full_state_dict(ema)  # see EMA.state_dict
                             for name, ema in self.posthoc.emas.items()}}
        self._saving = next(iter(state["posthoc"].values()))  # the first EMA: D2Go's model_ema
        return state

    def _load_engine(self, state: Mapping[str, Any]) -> None:
        assert self.posthoc is not None
        if "posthoc" in state:
            self.posthoc.load_state_dict(state["posthoc"])
            return
        logger.warning("d2ema: the checkpoint holds one EMA, not a post-hoc series; every "
                       "tracked power EMA starts from it")
        for ema in self.posthoc.emas.values():
            ema.load_state_dict(state)

    # ------------------------------------------------------------------ the end of fit()
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.posthoc is None or self.posthoc.step == 0:
            return
        self.posthoc.snapshot()
        self.posthoc.writer.flush()
        if self.select_on is None:
            return
        choice: tuple | str | None = None
        if trainer.is_global_zero:
            try:
                choice = self._select(trainer, pl_module)
            except Exception as e:  # told to every rank, which would wait for rank 0 forever
                choice = f"{type(e).__name__}: {e}"
                if trainer.world_size == 1:
                    raise
        choice = trainer.strategy.broadcast(choice)
        if isinstance(choice, str):
            raise LightningEMAError(f"PostHocEMA: the selection failed on rank 0: {choice}")
        assert choice is not None
        self.choice, self._chosen, self.scores = choice

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.choice is None or self.final == "raw":
            super()._finish(trainer, pl_module)
        elif self.choice == RAW:
            _info(trainer, "fit() ended; raw weights beat every EMA length on select_on: the "
                  "model keeps them")
        else:
            assert self._chosen is not None
            load_tensors(self.target(pl_module), self._chosen)
            self._final_applied = True
            _info(trainer, "fit() ended; the model now holds the post-hoc EMA %s, chosen on "
                  "select_on (score %.6g)", self.choice, self.scores[self.choice])
        if self.posthoc is not None:
            self.posthoc.close()

    def _select(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple:
        assert self.posthoc is not None
        target = self.target(pl_module)
        loader = self.select_on() if callable(self.select_on) else self.select_on
        raw_score = self._score(trainer, pl_module, loader)
        scratch = d2ema.EMA(target, include_frozen=self.ema_kwargs.get("include_frozen", True),
                            include_buffers=self.ema_kwargs.get("include_buffers", True),
                            exclude=self.ema_kwargs.get("exclude", ()))

        def score(tensors: Mapping[str, torch.Tensor]) -> float:
            scratch.load_state_dict(tensors)
            with scratch.swapped(target):
                return self._score(trainer, pl_module, loader)

        # the raw weights are scored in place and weighed by the core's selection
        selection = self.posthoc.select(score, self.select_sigma_rels, raw_score=raw_score,
                                        raw_tensors=target.state_dict())
        label = RAW if selection.raw_won else selection.target.label
        scores = {RAW: raw_score, **{t.label: v for t, v in selection.scores.items()}}
        folder = self.out_dir
        assert folder is not None
        chosen = None if label == RAW else {k: v.cpu() for k, v in selection.tensors.items()}
        if chosen is not None:
            scratch.load_state_dict(chosen)
        with scratch.swapped(target) if chosen is not None else contextlib.nullcontext():
            export_weights(target, folder / "ema_best.pth")
        self._report(trainer, folder, scores, label, selection.step)
        return label, chosen, scores

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               loader: Iterable) -> float:
        """Higher is better: ``score_fn``, or the (negated for ``mode="min"``) mean of the
        ``monitor`` metric / returned value of ``validation_step`` over ``loader``."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            if self.score_fn is not None:
                with torch.no_grad():
                    return float(self.score_fn(pl_module))
            total, count = 0.0, 0
            logged: dict[str, Any] = {}

            def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
                logged[name] = value

            object.__setattr__(pl_module, "log", log)
            try:
                with torch.no_grad():
                    for i, batch in enumerate(loader):
                        logged.clear()
                        batch = trainer.strategy.batch_to_device(batch)
                        out = pl_module.validation_step(batch, i)
                        value = logged.get(self.monitor) if self.monitor else out
                        if value is None:
                            what = f"log {self.monitor!r}" if self.monitor else "return a value"
                            raise LightningEMAError(
                                f"PostHocEMA: validation_step did not {what} to score EMA "
                                "lengths with; set monitor= to a metric it logs, or give "
                                "score_fn=")
                        total += float(value.detach() if torch.is_tensor(value)
                                       else value)  # type: ignore[arg-type]
                        count += 1
            finally:
                object.__delattr__(pl_module, "log")
            if not count:
                raise LightningEMAError("PostHocEMA: select_on yielded no batch")
            mean = total / count
            return -mean if self.mode == "min" else mean
        finally:
            pl_module.train(was_training)

    def _report(self, trainer: pl.Trainer, folder: Path, scores: dict[str, float], label: str,
                step: int) -> None:
        sign = -1.0 if self.mode == "min" and self.score_fn is None else 1.0
        what = self.monitor or ("score_fn" if self.score_fn else "validation_step's value")
        lines = [f"# Post-hoc EMA: the length chosen at step {step}", "",
                 f"Scored on select_on by {what} ({'lower' if sign < 0 else 'higher'} is better).",
                 "", f"| weights | {what} | chosen |", "| --- | ---: | :---: |"]
        for name, s in scores.items():
            lines.append(f"| {name} | {sign * s:.6g} | {'**yes**' if name == label else ''} |")
        if label == RAW:
            lines += ["", "raw weights beat every EMA length"]
        atomic_write_text("\n".join(lines) + "\n", folder / "posthoc_selection.md")
        for lg in trainer.loggers:
            lg.log_metrics({f"posthoc/{n.replace(' ', '_')}": sign * s for n, s in scores.items()},
                           step=trainer.global_step)
        if label == RAW:
            logger.info("d2ema: raw weights beat every EMA length on select_on (%s %.6g)",
                        what, sign * scores[RAW])
        with contextlib.suppress(ImportError):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            sweep = [(float(n.split()[1]), sign * s) for n, s in scores.items()
                     if n.startswith("sigma_rel")]
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot([x for x, _ in sweep], [y for _, y in sweep], "o-", label="EMA (sigma_rel)")
            ax.axhline(sign * scores[RAW], color="gray", ls="--", label="raw weights")
            ax.set_xscale("log")
            ax.set_xlabel("sigma_rel")
            ax.set_ylabel(what)
            ax.set_title(f"chosen: {label}")
            ax.legend()
            buf = io.BytesIO()
            fig.tight_layout()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            atomic_write_bytes(buf.getvalue(), folder / "posthoc_selection.png")

