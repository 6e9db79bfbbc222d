"""``MODEL_EMA.POSTHOC.SELECT``: the run chooses its EMA length at the end of training.

After the last checkpoint is saved, `select_after_training` rebuilds each length of the
sweep (``POSTHOC.SELECT_SIGMA_RELS``, else ``d2ema posthoc``'s default) from the snapshots,
evaluates each on the selection set (``POSTHOC.SELECT_ON``, else ``DATASETS.TEST[0]``), keeps
the best (the first metric of the evaluator, bbox AP for detection; a tie goes to the length
closest to the primary EMA's). The raw weights are scored on the same set and are a candidate
too: when they beat every length, they are what the run hands back, and every output says
"raw weights beat every EMA length on SELECT_ON". Then it

* writes the chosen weights as ``OUTPUT_DIR/model_final_posthoc.pth`` with a plain detectron2
  config beside it (``model_final_posthoc.yaml``, as ``d2ema export`` writes);
* writes the table, ``results.json`` and ``ap_vs_length.png`` (the chosen length ringed) to
  ``OUTPUT_DIR/posthoc/``, and every length's metrics to ``metrics.json`` and TensorBoard, the
  tags naming the dataset scored (``posthoc/SELECT_ON/sigma0.05/bbox/AP``,
  ``posthoc/SELECT_ON/raw/bbox/AP``, ``posthoc/TEST/chosen/bbox/AP``);
* reports the chosen EMA on ``DATASETS.TEST[0]`` next to the raw weights and the primary EMA
  (``posthoc/bbox/AP`` in the results, ``metrics.json``, ``log.txt`` and the summary line).

When the test set also chooses, that AP is optimistic (the best of several noisy scores of one
set); the summary says so and a warning is logged once.

Under ``--num-gpus N`` the main process rebuilds each EMA and broadcasts it, and every process
takes part in each evaluation, as in detectron2's. Only the main process writes, and only into
``OUTPUT_DIR/posthoc/`` and ``model_final_posthoc.*``, atomically: a kill leaves checkpoints and
snapshots as they were, and ``--resume`` on the finished run runs the selection again (training
does not run again).

`EMATrainer` (and so ``d2ema train``) calls it when training ends.

Example::

    cfg.MODEL_EMA.POSTHOC.ENABLED = True
    cfg.MODEL_EMA.POSTHOC.SELECT = True
    cfg.MODEL_EMA.POSTHOC.SELECT_ON = "my_val"      # held out; DATASETS.TEST reports
    trainer = EMATrainer(cfg); trainer.resume_or_load(); trainer.train()   # then chooses
    print(trainer._last_eval_results["posthoc/bbox"]["AP"])
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from d2ema.averaging.state import unwrap_model
from d2ema.d2.config import settings as config_settings
from d2ema.d2.config.settings import EMASettings
from d2ema.d2.config.view import ConfigView
from d2ema.d2.evaluation import report
from d2ema.d2.evaluation.evaluator import precise_bn
from d2ema.d2.evaluation.report import primary_ap
from d2ema.d2.family import get_ema_family
from d2ema.errors import ConfigError, one_line
from d2ema.posthoc import (
    PostHocError,
    Target,
    check_fit,
    load_tensors,
    representable_range,
    select,
    solve,
    sweep_targets,
)
from d2ema.posthoc.select import RAW
from d2ema.schedules import SigmaRel, sigma_rel_to_gamma

__all__ = ['SELECTED', 'check_selection', 'select_after_training']


SELECTED = "model_final_posthoc.pth"


FOLDER = "posthoc"


_KEY = ConfigView(None, lazy=False).key("POSTHOC.")  # SELECT is for yacs configs


def check_selection(cfg, given: EMASettings | None = None) -> None:
    """Before training: refuse a SELECT the run could not carry out (no test set to report on,
    a LazyConfig, lengths the snapshots will not represent). The dataset ``SELECT_ON`` names is
    checked with the others (`check_datasets_known`).
    ``given``: the EMA settings already read from ``cfg``."""
    view = ConfigView.of(cfg)
    if view.lazy:
        if view.ema_value("POSTHOC.SELECT", False):
            raise ConfigError(f"{view.key('POSTHOC.SELECT')} is for yacs configs (d2ema train "
                              "--config-file X.yaml); for a LazyConfig run, choose after "
                              "training with: d2ema posthoc OUTPUT_DIR --eval --export-best OUT")
        return
    settings = (given or config_settings.ema_settings(cfg)).posthoc
    if settings is None or not settings.select:
        return
    if not cfg.DATASETS.TEST:
        raise ConfigError(f"{_KEY}SELECT reports the chosen EMA on DATASETS.TEST[0], but "
                          "DATASETS.TEST is empty; add a test set")
    if not settings.select_sigma_rels:
        return  # the default sweep leaves out what the snapshots cannot represent
    max_iter = int(cfg.SOLVER.MAX_ITER)
    period = settings.period_for(max_iter)
    times = sorted({*range(period, max_iter + 1, period), max_iter})
    gammas = [sigma_rel_to_gamma(s) for s in settings.sigma_rels]
    all_times = [t for _ in gammas for t in times]
    all_gammas = [g for g in gammas for _ in times]
    targets = [Target("sigma_rel", s) for s in settings.select_sigma_rels]
    span = representable_range(all_times, all_gammas, max_iter)
    for fit in solve(all_times, all_gammas, targets, max_iter):
        try:
            check_fit(fit, representable=span)
        except PostHocError as e:
            raise ConfigError(f"{_KEY}SELECT_SIGMA_RELS: {one_line(str(e))}") from None


# ----------------------------------------------------------------------------- collectives
def _from_main(obj: Any) -> Any:
    """The main process's ``obj``, on every process (a collective)."""
    from detectron2.utils import comm

    return comm.all_gather(obj)[0]


def _broadcast_weights(model) -> None:
    """Every process gets the main process's parameters and buffers (a collective)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if comm.get_world_size() == 1:
        return
    inner = unwrap_model(model)
    with torch.no_grad():
        for t in [*inner.parameters(), *inner.buffers()]:
            buf = t.data.contiguous()
            dist.broadcast(buf, src=0)
            if buf.data_ptr() != t.data.data_ptr():
                t.data.copy_(buf)


# ----------------------------------------------------------------------------- evaluation
def _evaluate(trainer, dataset: str, label: str) -> dict:
    """The model now in ``trainer`` on ``dataset``: results on the main process, ``{}`` on the
    others (``label`` names the weights, for the log)."""
    from detectron2.evaluation import inference_on_dataset, print_csv_format
    from detectron2.utils import comm

    cfg, cls, model = trainer.cfg, type(trainer), trainer.model
    if cfg.TEST.PRECISE_BN.ENABLED and label != RAW:
        precise_bn(model, cls.build_train_loader(cfg), cfg.TEST.PRECISE_BN.NUM_ITER)
    one = cfg.clone()
    one.defrost()
    one.DATASETS.TEST = (dataset,)
    with tempfile.TemporaryDirectory(prefix="d2ema-posthoc-") as scratch:
        evaluator = cls.build_evaluator(one, dataset, scratch)
        results = inference_on_dataset(model, cls.build_test_loader(one, dataset), evaluator)
    if comm.is_main_process():
        logging.getLogger(__name__).info("%s on %s:", label, dataset)
        print_csv_format(results)
    return dict(results or {})


def _task_results(results: Mapping[str, Any] | None, prefix: str, dataset: str) -> dict:
    """The ``prefix`` part (``""`` raw, ``"ema/"``) of the final results, for ``dataset``."""
    results = results or {}
    part = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
    if not prefix:
        part = {k: v for k, v in part.items() if "/" not in k}
    return dict(part.get(dataset, part)) if isinstance(part.get(dataset), Mapping) else part


def _ap(results: Mapping[str, Any]) -> float:
    try:
        return primary_ap(results)
    except Exception:
        return math.nan


def _prefer(settings, max_iter: int) -> float:
    """The primary EMA's sigma_rel (a decay's at the last step): ties go to the closest."""
    if isinstance(settings.schedule, SigmaRel):
        return float(settings.schedule.sigma_rel)
    return Target("decay", min(max(settings.decay, 1e-9), 1 - 1e-12)).sigma_rel_at(max_iter)


# ----------------------------------------------------------------------------- the selection
def select_after_training(trainer, results: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """With ``MODEL_EMA.POSTHOC.SELECT``: choose, write and report (module docstring) on every
    process; returns ``results`` plus the chosen EMA's test results under ``posthoc/``.
    Without it, ``results`` unchanged."""
    cfg = trainer.cfg
    settings = getattr(trainer, "ema_settings", None) or config_settings.ema_settings(cfg)
    if settings.posthoc is None or not settings.posthoc.select:
        return results
    family = get_ema_family(trainer.model)
    if family is None or family.posthoc is None:
        return results
    from detectron2.utils import comm

    main = comm.is_main_process()
    select_on = settings.posthoc.select_on or cfg.DATASETS.TEST[0]
    report_on = cfg.DATASETS.TEST[0]
    inner = unwrap_model(trainer.model)
    raw = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    folder = family.posthoc.folder
    try:
        outcome = _choose(trainer, folder, settings, select_on, main, raw)
        test = outcome.get("selection_results", {})
        if select_on != report_on:  # the chosen EMA, on the test set
            if main:
                inner.load_state_dict(raw)
                load_tensors(inner, outcome["tensors"])
            _broadcast_weights(trainer.model)
            test = _evaluate(trainer, report_on, f"chosen {outcome.get('label', 'EMA')}")
    finally:
        inner.load_state_dict(raw)
    if not main:
        return results
    return _write(trainer, results, {**outcome, "folder": folder}, test, select_on, report_on)


def _choose(trainer, folder, settings, select_on: str, main: bool,
            raw: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild, broadcast and evaluate every length (and the ``raw`` weights, a candidate
    too); on the main process the outcome."""
    scored: dict[str, dict] = {}
    outcome: dict[str, Any] = {}
    if not main:
        while True:
            kind, label = _from_main(None)
            if kind == "done":
                return outcome
            if kind == "error":
                raise PostHocError(f"post-hoc selection failed on the main process: {label}")
            _broadcast_weights(trainer.model)
            _evaluate(trainer, select_on, label)
    inner = unwrap_model(trainer.model)

    def score(rec) -> float:
        label = rec.fit.target.label
        load_tensors(inner, rec.tensors)
        _from_main(("next", label))
        _broadcast_weights(trainer.model)
        scored[label] = _evaluate(trainer, select_on, label)
        return _ap(scored[label])

    targets, named = sweep_targets(settings.posthoc.select_sigma_rels)
    max_iter = int(trainer.cfg.SOLVER.MAX_ITER)
    try:
        _from_main(("next", RAW))
        _broadcast_weights(trainer.model)
        scored[RAW] = _evaluate(trainer, select_on, RAW)
        sel = select(folder, score, targets, prefer=_prefer(settings, max_iter),
                     skip_unrepresentable=not named, raw_score=_ap(scored[RAW]),
                     raw_tensors=raw)
    except BaseException as e:
        _from_main(("error", one_line(str(e)) or type(e).__name__))
        raise
    _from_main(("done", sel.chosen))
    left_out = [t.label for t in targets if t not in {f.target for f in sel.fits}]
    return {"selection": sel, "scored": scored, "label": sel.chosen, "tensors": sel.tensors,
            "selection_results": scored[sel.chosen], "left_out": left_out}


def _write(trainer, results, outcome, test: dict, select_on: str, report_on: str):
    """Files, scalars and the summary line (main process; the lines go to the ``d2ema``
    logger: the console and ``log.txt`` under ``d2ema train``)."""
    from detectron2.evaluation.testing import flatten_results_dict

    from d2ema.d2.checkpoint.export import export_with_config

    cfg, sel, scored = trainer.cfg, outcome["selection"], outcome["scored"]
    out = Path(cfg.OUTPUT_DIR)
    optimistic = select_on == report_on
    rows = [{**report.fit_row(f), **report.result_metrics(scored[f.target.label])}
            for f in sel.fits]
    rows.append({"target": RAW, "kind": "raw", **report.result_metrics(scored[RAW])})
    chosen = next(r for r in rows if r["target"] == outcome["label"])
    test_ap = {"raw": _ap(_task_results(results, "", report_on)),
               "ema": _ap(_task_results(results, "ema/", report_on)), "chosen": _ap(test)}
    checkpoint = trainer.checkpointer.get_checkpoint_file()  # model_final.pth, saved by now
    export = export_with_config(checkpoint, out / SELECTED, ema=sel.tensors, info={
        "step": sel.step, "posthoc": outcome["label"], "select_on": select_on,
        "format": "d2ema post-hoc EMA export, v1"})
    lines = report.table(rows, evaluated=True)
    if outcome.get("left_out"):
        lines.insert(0, f"left out (the snapshots cannot represent them): "
                        f"{', '.join(outcome['left_out'])}")
    verdict = (f"raw weights beat every EMA length on {select_on}" if sel.raw_won
               else f"{outcome['label']} is the best on {select_on}")
    lines += [f"chosen: {verdict}", report.LEGEND]
    data = {"step": sel.step, "snapshots": str(outcome["folder"]), "verdict": verdict,
            "raw_won": sel.raw_won, "left_out": outcome.get("left_out", []),
            "select_on": select_on, "report_on": report_on, "optimistic": optimistic,
            "chosen": {**chosen, "test_AP": test_ap["chosen"]}, "test_AP": test_ap,
            "weights": str(out / SELECTED), "rows": rows}
    report.write_results(out / FOLDER, data, rows, chosen=chosen, lines=lines, title=(
        f"{out.name}: EMA length chosen on {select_on} (step {sel.step})"))
    scalars = flatten_results_dict({f"posthoc/{select_on}/{_tag(f.target)}": scored[f.target.label]
                                    for f in sel.fits})
    scalars.update(flatten_results_dict({f"posthoc/{select_on}/raw": scored[RAW],
                                         f"posthoc/{report_on}/chosen": test}))
    if not sel.raw_won:
        scalars["posthoc/chosen_sigma_rel"] = sel.sigma_rel
    _log_scalars(cfg, scalars)
    log = logging.getLogger(__name__)
    for line in [*lines, *export]:
        log.info(line)
    where = (f"{select_on}, the test set itself" if optimistic else f"{select_on} (held out)")
    choice = (f"raw weights beat every EMA length on {where}: AP {chosen['AP']:.2f} (the best "
              f"length, {sel.target.label}, {sel.score:.2f}), so the raw weights are kept"
              if sel.raw_won else f"chose {outcome['label']} on {where}: AP {chosen['AP']:.2f}")
    chosen_as = "chosen" if sel.raw_won else "chosen EMA"
    summary = (f"post-hoc EMA: {choice}; on "
               f"{report_on}: raw AP {test_ap['raw']:.2f}, EMA AP {test_ap['ema']:.2f}, "
               f"{chosen_as} AP {test_ap['chosen']:.2f}{' (optimistic)' if optimistic else ''}; "
               f"weights {out / SELECTED}, table and plot in {out / FOLDER}")
    if optimistic:
        log.warning(f"{report_on} both chose the EMA length and reports its AP, so that "
                f"AP is optimistic (the best of {len(rows)} scores of one set); set "
                f"{_KEY}SELECT_ON to a held-out dataset for an unbiased one")
    log.info(summary)
    merged = OrderedDict(results or {})
    merged.update((f"posthoc/{k}", v) for k, v in test.items())
    return merged


def _tag(target: Target) -> str:
    return f"sigma{target.value:g}" if target.kind == "sigma_rel" else f"decay{target.value:g}"


def _log_scalars(cfg, scalars: Mapping[str, float]) -> None:
    """``scalars`` at MAX_ITER, to ``metrics.json`` and TensorBoard (new writers:
    the training's are closed by now)."""
    from detectron2.utils.events import EventStorage, JSONWriter, TensorboardXWriter

    out = cfg.OUTPUT_DIR
    with EventStorage(int(cfg.SOLVER.MAX_ITER)) as storage:  # the final evaluation's
        storage.put_scalars(smoothing_hint=False, **{k: float(v) for k, v in scalars.items()})
        for writer in (JSONWriter(os.path.join(out, "metrics.json")), TensorboardXWriter(out)):
            writer.write()
            writer.close()
