"""Several EMAs of one detectron2 model (MODEL_EMA.EXTRA_*), post-hoc snapshots during training
(MODEL_EMA.POSTHOC.*) and the warning about a decay that never forgets the initial weights:
against real detectron2 v0.6 on the CPU and the independent reference EMA of _d2_helpers."""

from __future__ import annotations

import json
import logging
import math
import textwrap

import pytest
import torch
from _d2_helpers import ReferenceEMA, Trainer, assert_matches_reference, make_cfg, register_tiny
from test_cli import LAZY_CONFIG
from test_ema_reference import gamma_for

from d2ema import EMA
from d2ema.cli import main
from d2ema.d2 import ConfigError, get_ema_family, get_extra_emas, get_model_ema
from d2ema.d2.config.settings import ema_settings
from d2ema.d2.engine.build import initial_share, initial_share_warning
from d2ema.posthoc import Target, reconstruct
from d2ema.posthoc.snapshots import read_index


@pytest.fixture(scope="module", autouse=True)
def tiny_data(tmp_path_factory):
    register_tiny(tmp_path_factory.mktemp("cache"))


def power(sigma_rel: float):
    g = gamma_for(sigma_rel)
    return lambda n: (1 - 1 / n) ** (g + 1)


def test_extra_emas_are_exact_evaluated_and_logged(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=3, evaluate=True, decay=0.8,
                   schedule="yolov5", tau=2.0, extra_decays=[0.5], extra_sigma_rels=[0.2])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    refs = {"ema_0.5": ReferenceEMA(trainer.model, lambda n: 0.5 * (1 - math.exp(-n / 2.0))),
            "ema_sigma0.2": ReferenceEMA(trainer.model, power(0.2))}
    trainer.register_hooks(list(refs.values()))
    trainer.train()
    extras = get_extra_emas(trainer.model)
    assert list(extras) == ["ema_0.5", "ema_sigma0.2"]
    for name, ref in refs.items():
        assert_matches_reference(extras[name], ref.ref)
    results = trainer._last_eval_results
    assert {"bbox", "ema/bbox", "ema_0.5/bbox", "ema_sigma0.2/bbox"} <= set(results)
    logged = trainer.storage.latest()  # EvalHook -> EventStorage -> TensorBoard curves
    assert {"bbox/AP", "ema/bbox/AP", "ema_0.5/bbox/AP", "ema_sigma0.2/bbox/AP"} <= set(logged)
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert set(ckpt["ema_extras"]) == {"ema_0.5", "ema_sigma0.2"}
    assert "ema_state" in ckpt and ckpt["ema_meta"]["step"] == 3  # primary where D2Go has it


def test_extras_resume_exactly_and_are_checked_before_loading(tmp_path):
    cfg = make_cfg("retinanet", tmp_path, max_iter=4, decay=0.8, schedule="yolov5",
                   tau=2.0, extra_decays=[0.6], extra_sigma_rels=[0.1])
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    Trainer(cfg).train()
    ckpt = torch.load(tmp_path / "model_0000001.pth", weights_only=True)  # after iteration 2
    resumed = Trainer(cfg)
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    extras = get_extra_emas(resumed.model)
    refs = {}
    for name, ema in extras.items():
        saved = ckpt["ema_extras"][name]
        assert ema.step == 2 and saved["ema_meta"]["step"] == 2
        for k, v in ema.tensors().items():  # bit-identical right after loading
            assert torch.equal(v, saved["ema_state"][k]), (name, k)
        decay = (lambda n: 0.6 * (1 - math.exp(-n / 2.0))) if name == "ema_0.6" else power(0.1)
        refs[name] = ReferenceEMA(resumed.model, decay, start_from={
            k: v.double() for k, v in saved["ema_state"].items()})
    resumed.register_hooks(list(refs.values()))
    resumed.train()
    for name, ref in refs.items():
        assert [s for s, _ in ref.history] == [3, 4]  # the schedules continue from step 3
        assert_matches_reference(extras[name], ref.ref)

    # an extra EMA that does not fit is refused before anything loads
    ckpt["ema_extras"]["ema_0.6"]["ema_state"].popitem()
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    fresh = Trainer(cfg)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(Exception, match=r"(?s)ema_extras\['ema_0\.6'\].*missing"):
        fresh.checkpointer.load(str(bad))
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())


def test_config_errors():
    def settings(**ema):
        cfg = make_cfg("retinanet", "/tmp/unused", **ema)
        return ema_settings(cfg)

    with pytest.raises(ConfigError, match="EXTRA_SIGMA_RELS instead"):
        settings(schedule="sigma_rel", extra_decays=[0.9])
    with pytest.raises(ConfigError, match=r"EXTRA_DECAYS = \[0\.9, 0\.9\]"):
        settings(extra_decays=[0.9, 0.9])
    with pytest.raises(ConfigError, match="EXTRA_SIGMA_RELS"):
        settings(extra_sigma_rels=[0.5])
    with pytest.raises(ConfigError, match=r"need MODEL_EMA\.ENABLED True"):
        settings(enabled=False, extra_decays=[0.9])
    cfg = make_cfg("retinanet", "/tmp/unused")
    cfg.MODEL_EMA.POSTHOC.ENABLED = True
    cfg.MODEL_EMA.POSTHOC.DTYPE = "int8"
    with pytest.raises(ConfigError, match=r"POSTHOC\.DTYPE"):
        ema_settings(cfg)
    cfg.MODEL_EMA.POSTHOC.DTYPE = "float16"
    cfg.SOLVER.MAX_ITER = 90_000
    assert ema_settings(cfg).posthoc.period_for(90_000) == 900


def posthoc_cfg(out, max_iter, period=2):
    cfg = make_cfg("retinanet", out, max_iter=max_iter, decay=0.8, schedule="yolov5", tau=2.0)
    cfg.MODEL_EMA.POSTHOC.ENABLED = True
    cfg.MODEL_EMA.POSTHOC.PERIOD = period
    return cfg


def test_posthoc_snapshots_during_training_and_exact_resume(tmp_path, caplog):
    cfg = posthoc_cfg(tmp_path / "full", 5)
    with caplog.at_level(logging.INFO, logger="d2ema"):
        full = Trainer(cfg)
        full.resume_or_load(resume=False)
        full.train()
    assert "MB per snapshot" in caplog.text
    entries = read_index(tmp_path / "full" / "ema_snapshots")
    assert [(e.step, e.sigma_rel) for e in entries] == [
        (s, r) for s in (2, 4, 5) for r in (0.05, 0.1)]  # every 2 and at the last iteration
    ckpt = torch.load(tmp_path / "full" / "model_final.pth", weights_only=True)
    assert set(ckpt["ema_posthoc"]) == {"sigma0.05", "sigma0.1"}
    family = get_ema_family(full.model)
    stored = next(reconstruct(tmp_path / "full" / "ema_snapshots", [Target("sigma_rel", 0.1)]))
    for name, value in family.posthoc.emas["sigma0.1"].tensors().items():
        torch.testing.assert_close(stored.tensors[name], value, rtol=1e-6, atol=1e-7)

    # the same run killed after its last snapshot, with the last checkpoint at iteration 3
    part = posthoc_cfg(tmp_path / "part", 5)
    part.SOLVER.CHECKPOINT_PERIOD = 3
    Trainer(part).train()
    folder = tmp_path / "part" / "ema_snapshots"
    kept = {e.file: (folder / e.file).read_bytes() for e in read_index(folder) if e.step <= 3}
    (tmp_path / "part" / "model_final.pth").unlink()
    (tmp_path / "part" / "last_checkpoint").write_text("model_0000002.pth")
    resumed = Trainer(part)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    again = read_index(folder)  # no duplicates, no gaps
    assert [(e.step, e.sigma_rel) for e in again] == [(e.step, e.sigma_rel) for e in entries]
    assert all((folder / f).read_bytes() == data for f, data in kept.items())
    last = {e.sigma_rel: e for e in again if e.step == 5}
    for name, ema in get_ema_family(resumed.model).posthoc.emas.items():
        data = torch.load(folder / last[ema.schedule.sigma_rel].file, weights_only=True)
        assert name == f"sigma{ema.schedule.sigma_rel:g}" and ema.step == 5
        for k, v in ema.tensors().items():  # the rewritten snapshots are the resumed EMAs
            assert torch.equal(data["tensors"][k], v), k


def test_checkpoint_waits_for_the_snapshots_before_it(tmp_path, monkeypatch):
    """A checkpoint at step S resumes the series at S, so every snapshot up to S is on disk
    (in the index) when the checkpoint is written, even when the background write is slow:
    a kill right after the save leaves no gap."""
    import time

    from d2ema.posthoc.snapshots import SnapshotWriter

    slow_save = SnapshotWriter._save

    def _save(self, jobs):
        time.sleep(2.0)
        slow_save(self, jobs)

    monkeypatch.setattr(SnapshotWriter, "_save", _save)
    cfg = posthoc_cfg(tmp_path / "run", 4)  # snapshots at steps 2 and 4, a checkpoint at 3
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    trainer = Trainer(cfg)
    folder = tmp_path / "run" / "ema_snapshots"
    seen, save = {}, trainer.checkpointer.save

    def recording_save(name, **kwargs):
        save(name, **kwargs)
        seen[name] = sorted({e.step for e in read_index(folder)})

    trainer.checkpointer.save = recording_save
    trainer.train()
    assert seen["model_0000002"] == [2]  # saved at step 3; the snapshot of step 2 was pending


@pytest.mark.usefixtures("restore_loggers")
def test_lazy_config_extras_and_posthoc(tmp_path, capsys):
    path = tmp_path / "tiny_lazy.py"
    path.write_text(textwrap.dedent(LAZY_CONFIG))
    out = tmp_path / "out"
    rc = main(["train", "--config-file", str(path), f"train.output_dir={out}",
               "train.max_iter=2", "train.model_ema.extra_decays=[0.9]",
               "train.model_ema.posthoc.enabled=True", "train.model_ema.posthoc.period=1"])
    assert rc == 0
    assert "ema_0.9/bbox" in capsys.readouterr().out
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert set(ckpt["ema_extras"]) == {"ema_0.9"} and "ema_posthoc" in ckpt
    assert [e.step for e in read_index(out / "ema_snapshots")] == [1, 1, 2, 2]
    assert main(["posthoc", str(out), "--sigma-rel", "0.1", "--eval"]) == 0  # a LazyConfig run
    rows = json.loads((out / "posthoc" / "results.json").read_text())["rows"]
    assert [r["target"] for r in rows] == ["sigma_rel 0.1", "raw weights"]
    assert main(["train", "--config-file", str(path), "train.model_ema.posthoc.perod=3"]) == 2
    assert "posthoc.perod" in capsys.readouterr().err


# ---------------------------------------------------------------- item 0: the warning
def test_initial_share_and_warning(tmp_path, caplog):
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, 0.999)
    assert initial_share(ema, 800) == pytest.approx(0.999**800)
    assert initial_share(EMA(model, 0.999, every=4, start=10), 810) == pytest.approx(0.999**800)
    assert initial_share(EMA(model, 0.999, schedule="yolov5", schedule_params={"tau": 100}),
                         800) < 1e-9
    assert initial_share(EMA(model, schedule="sigma_rel"), 800) == 0.0
    message = initial_share_warning(ema, 800, name="the EMA MODEL_EMA")
    assert "45%" in message and "SCHEDULE yolov5" in message and "at most 0.9943" in message
    assert initial_share_warning(ema, 20_000) is None

    cfg = make_cfg("retinanet", tmp_path, max_iter=2, decay=0.999)
    with caplog.at_level(logging.WARNING, logger="d2ema"):
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    assert "will still be 100% its starting weights" in caplog.text
    assert get_model_ema(trainer.model).step == 2
