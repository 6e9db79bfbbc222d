"""``d2ema train --num-gpus N`` on a machine without GPU: N gloo processes through
:func:`d2ema.d2.engine.launch.launch` (the documented testing mode), and clear errors for counts
that
cannot work."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from d2ema.app.model_configs import tiny_detector_config
from d2ema.cli import main
from d2ema.d2.engine.train_net import _check_launch


@pytest.fixture(scope="module")
def yaml_config(tmp_path_factory):
    cfg = tiny_detector_config("retinanet", num_classes=5, image_size=64)
    cfg.DATASETS.TRAIN = ("shapes_train",)  # registered in each process by `d2ema train`
    cfg.DATASETS.TEST = ("shapes_val",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(cfg.dump())
    return path


def _error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode runs where there is no GPU")
def test_train_two_cpu_processes_sharded_ema(yaml_config, tmp_path, capfd):
    out = tmp_path / "out"
    handlers = {n: list(logging.getLogger(n).handlers) for n in ("detectron2", "fvcore")}
    rc = main(["train", "--config-file", str(yaml_config), "--num-gpus", "2", "--dist-url",
               "auto", "SOLVER.MAX_ITER", "2", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY",
               "0.5", "MODEL_EMA.SHARDED", "True", "OUTPUT_DIR", str(out)])
    for name, kept in handlers.items():
        for h in [h for h in logging.getLogger(name).handlers if h not in kept]:
            logging.getLogger(name).removeHandler(h)
    printed = capfd.readouterr().out
    assert rc == 0
    final = [line for line in printed.splitlines() if "final evaluation:" in line]
    assert len(final) == 1 and "ema/bbox/AP=" in final[0]  # main process only, raw and EMA
    checkpoint = torch.load(out / "model_final.pth", weights_only=False)
    floats = {n for n, t in checkpoint["model"].items() if t.is_floating_point()}
    assert floats <= set(checkpoint["ema_state"])  # the whole EMA, gathered from 2 ranks
    assert checkpoint["ema_meta"]["step"] == 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--num-gpus", str((os.cpu_count() or 1) + 1)], "CPU cores; use --num-gpus"),
        (["--num-gpus", "0"], "must be at least 1"),
        (["--num-machines", "2", "--machine-rank", "2"], "--machine-rank 2 must be in 0..1"),
        (["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"],
         "SOLVER.IMS_PER_BATCH = 3 does not split over 2 processes"),
    ],
)
def test_process_counts_that_cannot_work(yaml_config, capsys, argv, expected):
    if torch.cuda.is_available() and "CPU cores" in expected:
        pytest.skip("with GPUs the limit is their number")
    assert main(["train", "--config-file", str(yaml_config), *argv]) == 2
    assert expected in _error(capsys)


def test_more_gpus_than_the_machine_has(monkeypatch):
    import argparse

    from d2ema.errors import UsageError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = argparse.Namespace(num_gpus=4, num_machines=1, machine_rank=0, eval_only=False)
    with pytest.raises(UsageError, match="--num-gpus 4, but this machine has 2 CUDA devices"):
        _check_launch(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode runs where there is no GPU")
def test_two_machines_on_this_host_through_loopback(yaml_config, tmp_path):
    """``--num-machines 2 --machine-rank 0/1 --dist-url tcp://127.0.0.1:PORT``: two d2ema
    commands, one gloo process each, join as detectron2's launcher lets them."""
    import subprocess
    import sys
    from pathlib import Path

    from detectron2.engine.launch import _find_free_port

    url = f"tcp://127.0.0.1:{_find_free_port()}"
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "d2ema.cli", "train", "--config-file", str(yaml_config),
         "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url,
         "SOLVER.MAX_ITER", "1", "MODEL_EMA.ENABLED", "True", "DATASETS.TEST", "()",
         "OUTPUT_DIR", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    assert "World size: 2" in (out / "log.txt").read_text()
    assert torch.load(out / "model_final.pth", weights_only=False)["ema_meta"]["step"] == 1
