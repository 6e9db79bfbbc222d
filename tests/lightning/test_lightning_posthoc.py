"""Post-hoc EMA in Lightning: the length chosen at the end of fit() on a named dataloader is
the known best one; raw weights win where they are the answer; files and logged scores."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _tiny import Recorder, Tiny, data, trainer, weights
from lightning.pytorch.loggers import CSVLogger

import d2ema
from d2ema.lightning import PostHocEMA


class Reference(pl.Callback):
    """A power EMA of sigma_rel 0.07 tracked directly (the answer the sweep should find)."""

    def on_fit_start(self, trainer, pl_module):
        self.ema = d2ema.EMA(pl_module, schedule="sigma_rel", schedule_params={"sigma_rel": 0.07})

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step != self.ema.step:
            self.ema.update(pl_module, trainer.global_step)


def distance_to(target: dict):
    def score(module):  # higher is better: minus the distance of the weights to ``target``
        w = weights(module)
        return -sum((w[n].double() - t.double()).square().sum().item()
                    for n, t in target.items() if t.is_floating_point())
    return score


def _fit(tmp_path, score_fn, extra=()):
    ph = PostHocEMA(snapshot_every=2, select_on=data(seed=2), score_fn=score_fn,
                    select_sigma_rels=(0.03, 0.05, 0.07, 0.1, 0.15))
    t = trainer(tmp_path, max_epochs=3, callbacks=[ph, *extra], logger=CSVLogger(tmp_path))
    module = Tiny(lr=0.02)
    t.fit(module, data(), data(seed=1))
    return ph, module, t


_target_box: dict = {}


def _score_vs_reference(module):
    return distance_to(_target_box["ref"].ema.tensors())(module)


def test_selection_finds_the_known_best_length(tmp_path):
    """Scored by the distance to a sigma_rel 0.07 EMA tracked directly: 0.07 must win."""
    ref = Reference()
    _target_box["ref"] = ref
    ph, module, t = _fit(tmp_path, _score_vs_reference, [ref])
    assert ph.choice == "sigma_rel 0.07", ph.scores
    assert max(ph.scores, key=ph.scores.get) == "sigma_rel 0.07" and "raw" in ph.scores
    folder = t.log_dir  # the model holds the chosen (rebuilt) EMA, also written to a file
    best = torch.load(f"{folder}/ema_best.pth", weights_only=True)
    for name, value in weights(module).items():
        assert torch.equal(best[name], value), name
    text = Path(folder, "posthoc_selection.md").read_text()
    assert "| sigma_rel 0.07 |" in text and "**yes**" in text
    with open(f"{folder}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("posthoc/sigma_rel_0.07") for r in rows)
    assert any(r.get("posthoc/raw") for r in rows)


def test_raw_weights_that_beat_every_length_are_kept(tmp_path):
    """Scored by the distance to the run's last raw weights (from a first, identical run):
    the raw candidate is the answer, and the model keeps it bit for bit."""
    rec = Recorder()
    trainer(tmp_path / "first", max_epochs=3, callbacks=[rec]).fit(Tiny(lr=0.02), data())
    ph2, module2, t2 = _fit(tmp_path / "again", distance_to(rec.after_step[-1]))
    assert ph2.choice == "raw"
    for name, value in weights(module2).items():
        assert torch.equal(value, rec.after_step[-1][name]), name
    report = Path(t2.log_dir, "posthoc_selection.md").read_text()
    assert "raw weights beat every EMA length" in report


def test_snapshots_that_would_not_fit_the_disk_are_refused_at_the_start(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from d2ema.lightning import LightningEMAError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    ph = PostHocEMA(snapshot_every=1, select_on=data(seed=2))
    with pytest.raises(LightningEMAError, match="snapshot_every") as e:
        trainer(tmp_path, max_epochs=1, callbacks=[ph]).fit(Tiny(), data())
    assert "\n" not in str(e.value) and "MODEL_EMA" not in str(e.value)
