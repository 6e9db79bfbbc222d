"""The whole cost of a run, said at its start: one line with the size of a checkpoint (model,
each EMA, optimizer state), how many checkpoints are kept, the post-hoc snapshot series and the
total against the free disk, checked against the files a real run leaves.

The line counts tensor data; ``torch.save`` adds a record header per tensor and the pickled
dict of names and metadata (a few hundred bytes per tensor: well under 1 MB for this model's
~500 tensors in a ~280 MB checkpoint), so each figure must match within 1% + 1 MB.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from _loggers import loggers_restored

from d2ema.app.data import register_datasets
from d2ema.app.model_configs import tiny_detector_config
from d2ema.cli import main

pytestmark = pytest.mark.usefixtures("restore_loggers")


def _mb(text: str) -> float:
    value, unit = text.split()
    return float(value) * (1e3 if unit == "GB" else 1.0)


def _close(said_mb: float, actual_bytes: int) -> bool:
    return abs(said_mb * 1e6 - actual_bytes) <= 0.01 * actual_bytes + 1e6


def test_cost_line_matches_the_files_of_the_run(tmp_path):
    register_datasets(root=tmp_path / "data", sizes={"shapes_train": 8, "shapes_val": 2},
                      names=["shapes_train", "shapes_val"])
    cfg = tiny_detector_config("retinanet", num_classes=5, image_size=64)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("shapes_train",), ("shapes_val",)
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD = 2, 4, 2
    cfg.SEED, cfg.TEST.EVAL_PERIOD = 0, 0
    cfg.MODEL_EMA.ENABLED, cfg.MODEL_EMA.EXTRA_DECAYS = True, [0.9]
    cfg.MODEL_EMA.POSTHOC.ENABLED, cfg.MODEL_EMA.POSTHOC.PERIOD = True, 1
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.dump())
    out = tmp_path / "run"
    printed = io.StringIO()
    with loggers_restored(), contextlib.redirect_stdout(printed):
        assert main(["train", "--config-file", str(path), "OUTPUT_DIR", str(out)]) == 0
    [line] = [x for x in printed.getvalue().splitlines() if "disk use of this run:" in x]
    size = r"([\d.]+ [MG]B)"
    each = re.search(rf"each checkpoint {size} \(model {size}, EMA {size}, ema_0.9 {size}, "
                     rf"2 post-hoc EMAs {size}, optimizer state \(estimated: 1 per weight for "
                     rf"SGD\) {size}\)", line)
    kept = re.search(rf"; (\d+) checkpoints kept \(every 2 iterations: all of 2, and "
                     rf"model_final\) = {size}; post-hoc snapshots {size}; total {size}, of "
                     rf"{size} free", line)
    assert each and kept, line
    files = sorted(out.glob("model_*.pth"))
    assert [f.name for f in files] == ["model_0000001.pth", "model_0000003.pth",
                                       "model_final.pth"]
    assert int(kept.group(1)) == len(files)
    checkpoint = files[-1].stat().st_size
    assert _close(_mb(each.group(1)), checkpoint), (each.group(1), checkpoint)
    model, ema, extra, posthoc, optimizer = (_mb(each.group(i)) for i in range(2, 7))
    assert model == ema == extra == optimizer and posthoc == 2 * model  # float32, all trained
    assert _close(_mb(kept.group(2)), sum(f.stat().st_size for f in files))
    snapshots = sum(p.stat().st_size for p in (out / "ema_snapshots").rglob("*") if p.is_file())
    assert _close(_mb(kept.group(3)), snapshots), (kept.group(3), snapshots)
    assert _close(_mb(kept.group(4)), snapshots + sum(f.stat().st_size for f in files))
    assert _mb(kept.group(5)) > 0


def test_optimizer_state_estimated_before_the_first_step_and_measured_after():
    """AdamW keeps two float32 tensors per trainable weight: the estimate says so before the
    first step, and equals what it then holds (bar its scalar step counters)."""
    import torch

    from d2ema.d2.engine.build import _optimizer_bytes

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)  # frozen: no state
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    estimate, how = _optimizer_bytes(optimizer)
    assert how == "estimated: 2 per weight for AdamW" and estimate == 2 * 4 * (8 * 4 + 4 + 2)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    measured, how = _optimizer_bytes(optimizer)
    assert how == "measured" and measured == estimate + 3 * 4  # + a float32 step per tensor
    sgd, how = _optimizer_bytes(torch.optim.SGD(model.parameters(), lr=0.1))
    assert (sgd, how) == (0, "estimated: 0 per weight for SGD")  # no momentum: no state
