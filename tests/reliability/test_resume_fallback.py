"""Resume when the tagged checkpoint is missing, truncated or unreadable: fall back to the
newest complete checkpoint with a warning (AtomicCheckpointer, the yacs EMATrainer, the
LazyConfig path of ``d2ema train``); when none is complete, or ``--eval-only`` gets a truncated
file, one line and exit status 2."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

import _kill_child

from d2ema.cli import main
from d2ema.d2 import get_model_ema
from d2ema.d2.checkpoint.checkpointers import AtomicCheckpointer
from d2ema.errors import CheckpointError, one_line

# default_setup() (d2ema train) adds console handlers bound to a test's output: drop them after
pytestmark = pytest.mark.usefixtures("restore_loggers")


def _truncate(path: Path, size: int = 300) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.fixture
def folder(tmp_path) -> Path:
    """model_0000000, model_0000001, model_final (iteration 1): what a 2-iteration run saves."""
    model = _kill_child.ReliabilityTinyNet()
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    for it, name in ((0, "model_0000000"), (1, "model_0000001"), (1, "model_final")):
        with torch.no_grad():
            model.head.bias.fill_(it)
        checkpointer.save(name, iteration=it)
    return tmp_path


def _resume(folder: Path, caplog) -> tuple[str, list[str]]:
    checkpointer = AtomicCheckpointer(_kill_child.ReliabilityTinyNet(), str(folder))
    with caplog.at_level(logging.WARNING):
        assert checkpointer.has_checkpoint()
        path = checkpointer.get_checkpoint_file()
        checkpointer.load(path)
    return Path(path).name, [r.getMessage() for r in caplog.records]


def test_saves_are_atomic(folder):
    assert (folder / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last_checkpoint", "model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "model_final.pth").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    ("damage", "why", "chosen"),
    [
        (lambda f: _truncate(f / "model_final.pth"), "is truncated or not a PyTorch checkpoint",
         "model_0000001.pth"),
        (lambda f: (f / "model_final.pth").write_bytes(b""), "is truncated", "model_0000001.pth"),
        (lambda f: torch.save([1, 2], f / "model_final.pth"), "not a checkpoint dict",
         "model_0000001.pth"),
        (lambda f: (f / "last_checkpoint").write_text(""), "last_checkpoint is empty",
         "model_final.pth"),
        (lambda f: (f / "last_checkpoint").write_text("gone.pth"), "names gone.pth, which does",
         "model_final.pth"),
        (lambda f: (f / "last_checkpoint").unlink(), "there is no last_checkpoint",
         "model_final.pth"),
    ],
    ids=["truncated", "empty file", "not a dict", "empty tag", "dangling tag", "no tag"],
)
def test_falls_back_to_newest_complete(folder, caplog, damage, why, chosen):
    os.utime(folder / "model_0000000.pth", (1, 1))  # an older file never wins
    torch.save({"model": {}, "d2ema_export": {}}, folder / "model_ema.pth")  # nor an export
    damage(folder)
    name, messages = _resume(folder, caplog)
    assert name == chosen
    assert any(why in m and f"resuming from {chosen} instead" in m for m in messages), messages


def test_complete_tag_is_followed_without_warning(folder, caplog):
    _truncate(folder / "model_0000000.pth")
    name, messages = _resume(folder, caplog)
    assert name == "model_final.pth" and not messages


def test_no_complete_checkpoint_is_one_line(folder, tally):
    for path in folder.glob("*.pth"):
        _truncate(path)
    checkpointer = AtomicCheckpointer(_kill_child.ReliabilityTinyNet(), str(folder))
    tally["bad_inputs"] += 1
    with pytest.raises(CheckpointError) as info:
        checkpointer.get_checkpoint_file()
    line = one_line(info.value)
    assert "cannot resume from" in line and "model_final.pth" in line and "--resume" in line
    tally["refused_cleanly"] += 1


def test_yacs_trainer_resumes_bit_exactly_from_fallback(tmp_path):
    out = str(tmp_path / "out")
    _kill_child.KillTrainer(_kill_child.config(out, 3)).train()
    expected = torch.load(tmp_path / "out" / "model_0000002.pth", weights_only=True)
    _truncate(tmp_path / "out" / "model_final.pth")
    trainer = _kill_child.KillTrainer(_kill_child.config(out, 3))
    trainer.resume_or_load(resume=True)
    assert trainer.checkpointer.resumed_from.endswith("model_0000002.pth")
    assert trainer.start_iter == expected["iteration"] + 1 == 3
    ema = get_model_ema(trainer.model)
    assert ema.step == expected["ema_meta"]["step"] and trainer.checkpointer.ema_loaded
    for name, value in expected["ema_state"].items():
        assert torch.equal(ema.tensors()[name], value), name
    for name, value in expected["model"].items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


LAZY = """
import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import LinearParamScheduler
from omegaconf import OmegaConf

from _kill_child import ReliabilityTinyNet, _batches
from d2ema.d2 import lazy_model_ema_defaults

model = L(ReliabilityTinyNet)()
dataloader = OmegaConf.create()
dataloader.train = L(_batches)(seed=3)
optimizer = L(torch.optim.SGD)(params=L(get_default_optimizer_params)(), lr=0.1, momentum=0.9)
constant = L(LinearParamScheduler)(start_value=1.0, end_value=1.0)
lr_multiplier = L(WarmupParamScheduler)(scheduler=constant, warmup_length=0.0, warmup_factor=1.0)
train = dict(output_dir="unused", init_checkpoint="", max_iter=3, device="cpu",
             checkpointer=dict(period=1), eval_period=0, log_period=100,
             model_ema={**lazy_model_ema_defaults(), "enabled": True, "decay": 0.8})
"""


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def test_lazy_resume_falls_back_and_eval_only_refuses(tmp_path, tally):
    config = tmp_path / "tiny_lazy.py"
    config.write_text(textwrap.dedent(LAZY))
    out = tmp_path / "out"
    base = ["train", "--config-file", str(config)]
    to_out = f"train.output_dir={out}"
    assert _run([*base, to_out])[0] == 0
    _truncate(out / "model_final.pth")
    rc, err = _run([*base, "--resume", to_out, "train.max_iter=4"])
    assert rc == 0, err
    log = (out / "log.txt").read_text()
    assert "resuming from model_0000002.pth instead" in log
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 3 and final["ema_meta"]["step"] == 4

    _truncate(out / "model_0000002.pth")
    tally["bad_inputs"] += 2
    rc, err = _run([*base, "--eval-only", to_out,
                    f"train.init_checkpoint={out / 'model_0000002.pth'}"])
    assert rc == 2 and err.count("\n") == 1 and "model_0000002.pth is truncated" in err, err
    for path in out.glob("*.pth"):
        _truncate(path)
    rc, err = _run([*base, "--resume", to_out])
    assert rc == 2 and err.count("\n") == 1 and "no other complete checkpoint" in err, err
    tally["refused_cleanly"] += 2


def test_yacs_eval_only_truncated_weights(tmp_path, tally):
    cfg = _kill_child.config(str(tmp_path / "out"), 1)
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    weights = tmp_path / "model_final.pth"
    torch.save({"model": _kill_child.ReliabilityTinyNet().state_dict()}, weights)
    _truncate(weights)
    tally["bad_inputs"] += 1
    rc, err = _run(["train", "--config-file", str(config), "--eval-only",
                    "MODEL.WEIGHTS", str(weights)])
    assert rc == 2 and err.count("\n") == 1, err
    assert "model_final.pth is truncated or not a PyTorch checkpoint" in err
    tally["refused_cleanly"] += 1
