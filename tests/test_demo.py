"""``d2ema demo --quick`` end to end: table, plot, TensorBoard events, checkpoint (one run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from d2ema.app.demo import DemoError, DemoOptions, parse_decays, run_demo

CONSOLE_SCRIPT = Path(sys.executable).parent / "d2ema"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One ``d2ema demo --quick`` in a fresh cache and output folder (shared by the tests)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "D2EMA_CACHE": str(tmp_path_factory.mktemp("cache"))}
    cmd = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "d2ema.cli"]
    started = time.perf_counter()
    proc = subprocess.run([*cmd, "demo", "--quick", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - started
    return proc, out, seconds


def test_exits_zero_quietly(demo_run):
    proc, _, seconds = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Concise console: our progress lines, not detectron2's INFO log.
    assert "[d2ema demo] iter" in proc.stdout
    assert "d2.engine" not in proc.stdout and "Environment info" not in proc.stdout
    print(f"d2ema demo --quick took {seconds:.0f}s")


def test_table_has_raw_and_ema_rows(demo_run):
    proc, _, _ = demo_run
    number = r"\s+-?\d+\.\d"
    for label in ("raw", "EMA sigma_rel 0.05", "EMA 0.97"):  # the recommended power EMA too
        assert re.search(rf"^{re.escape(label)}{number}{number}{number}", proc.stdout, re.M), (
            label, proc.stdout[-2000:]
        )


def test_plot_is_a_png(demo_run):
    _, out, _ = demo_run
    plot = out / "ap_curves.png"
    data = plot.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    from matplotlib.image import imread

    assert imread(plot).shape[0] > 100


def test_tensorboard_and_results(demo_run):
    _, out, _ = demo_run
    events = list(out.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"bbox/AP", "ema_sigma0.05/bbox/AP", "ema_0.97/bbox/AP", "total_loss"} <= tags
    results = json.loads((out / "results.json").read_text())
    iters = sorted({r["iter"] for r in results["history"]})
    assert iters == [60, 120]
    assert {r["weights"] for r in results["history"]} == {"raw", "EMA sigma_rel 0.05", "EMA 0.97"}
    assert (out / "model_final.pth").is_file() and (out / "log.txt").stat().st_size > 0


def test_bad_options():
    with pytest.raises(DemoError, match="not in"):
        parse_decays("0.99,1.5")
    with pytest.raises(DemoError, match="not a number"):
        parse_decays("0.99,abc")
    assert parse_decays("0.99, 0.998,0.99") == (0.99, 0.998)
    with pytest.raises(DemoError, match="unknown dataset"):
        run_demo(DemoOptions(dataset="cifar"))
    with pytest.raises(DemoError, match="threads"):
        run_demo(DemoOptions(threads=0))
