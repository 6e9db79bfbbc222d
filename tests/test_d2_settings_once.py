"""The EMA settings are read from the config once per command path and handed on (issue 22):
``d2ema train`` (checks before training, the trainer, its hook, every evaluation) and an
``EMATrainer`` run each call :func:`d2ema.d2.config.settings.ema_settings` once in the process.

Every caller in the training path calls it through the module attribute
(``config_settings.ema_settings(cfg)``), so a counting wrapper put on the module sees each call;
before the change, each evaluation, the hook setup, the output-folder and resume checks and the
selection check read and validated the whole config again (a dozen calls for this run).
"""

from __future__ import annotations

import pytest

pytest.importorskip("detectron2")

from _d2_helpers import Trainer, make_cfg, register_tiny

from d2ema.cli import main
from d2ema.d2.config import settings as config_settings
from d2ema.d2.family import get_settings

pytestmark = pytest.mark.usefixtures("restore_loggers")


@pytest.fixture
def calls(monkeypatch) -> list:
    """Each call of ``ema_settings`` in this process, as the settings it returned."""
    seen: list = []
    real = config_settings.ema_settings

    def counting(cfg):
        seen.append(real(cfg))
        return seen[-1]

    monkeypatch.setattr(config_settings, "ema_settings", counting)
    return seen


def _config(tmp_path, **ema):
    cfg = make_cfg("retinanet", tmp_path / "unused", max_iter=2, evaluate=True, decay=0.5, **ema)
    cfg.TEST.EVAL_PERIOD = 1  # an evaluation after each of the two steps, and the last
    return cfg


def test_d2ema_train_reads_the_settings_once(tmp_path, calls):
    cfg = _config(tmp_path, extra_decays=[0.9])
    cfg.MODEL_EMA.POSTHOC.ENABLED = True
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.dump())
    out = tmp_path / "out"
    assert main(["train", "--config-file", str(path), "OUTPUT_DIR", str(out)]) == 0
    assert (out / "inference_ema").is_dir()  # the EMA was evaluated
    assert len(calls) == 1, f"ema_settings called {len(calls)} times"
    assert calls[0].output_dir == str(out) and calls[0].max_iter == 2


def test_ematrainer_reads_the_settings_once(tmp_path, calls):
    register_tiny(tmp_path / "data")
    trainer = Trainer(_config(tmp_path))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(calls) == 1, f"ema_settings called {len(calls)} times"
    assert trainer.ema_settings is calls[0] is get_settings(trainer.model)
