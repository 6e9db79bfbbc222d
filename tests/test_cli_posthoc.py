"""``d2ema posthoc OUTPUT_DIR``: the table, --eval (AP of every rebuilt EMA and the raw weights,
results.json, the PNG), --export-best, and one clear error line for each broken input."""

from __future__ import annotations

import json

import pytest
import torch
from _loggers import loggers_restored
from test_cli import _error_line, tiny_yaml  # noqa: F401  (a fixture)

from d2ema.cli import main
from d2ema.posthoc.snapshots import read_index

pytestmark = pytest.mark.usefixtures("restore_loggers")


@pytest.fixture(scope="module")
def run_dir(tiny_yaml, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("run")
    with loggers_restored():
        rc = main(["train", "--config-file", str(tiny_yaml), "OUTPUT_DIR", str(out),
                   "SOLVER.MAX_ITER", "6", "MODEL_EMA.POSTHOC.ENABLED", "True",
                   "MODEL_EMA.POSTHOC.PERIOD", "1"])
    assert rc == 0
    return out


def test_table_without_eval(run_dir, capsys):
    assert main(["posthoc", str(run_dir), "--sigma-rel", "0.07,0.1", "--decay", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "12 snapshots of power EMAs sigma_rel 0.05, 0.1" in out and "at step 6" in out
    lines = [line for line in out.splitlines() if line.startswith(("sigma_rel", "decay"))]
    assert [line.split()[:2] for line in lines] == [
        ["sigma_rel", "0.07"], ["sigma_rel", "0.1"], ["decay", "0.4"]]
    assert lines[1].split()[3] == "0.00%"  # a stored width is matched exactly


def test_eval_and_export_best(run_dir, tmp_path, capsys):
    best = tmp_path / "best.pth"
    assert main(["posthoc", str(run_dir), "--sigma-rel", "0.05,0.12", "--step", "5", "--eval",
                 "--export-best", str(best)]) == 0
    out = capsys.readouterr().out
    data = json.loads((run_dir / "posthoc" / "results.json").read_text())
    rows = {r["target"]: r for r in data["rows"]}
    assert data["step"] == 5 and set(rows) == {"sigma_rel 0.05", "sigma_rel 0.12", "raw weights"}
    assert all(0.0 <= r["AP"] <= 100.0 for r in rows.values())
    assert (run_dir / "posthoc" / "ap_vs_length.png").stat().st_size > 1000
    winner = max((r for r in data["rows"] if r["kind"] != "raw"), key=lambda r: r["AP"])
    assert f"best: {winner['target']}" in out
    exported = torch.load(best, weights_only=True)
    final = torch.load(run_dir / "model_final.pth", weights_only=True)
    assert set(exported["model"]) == set(final["model"])
    assert exported["d2ema_export"]["posthoc"] == winner["target"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_snapshots", "no post-hoc EMA snapshots"),
        ("missing", "is missing"),
        ("truncated", "is truncated"),
        ("outside", "outside what the snapshots can represent"),
        ("decay_init", "of the initial weights"),
        ("step", "no snapshot at step 99"),
        ("bad_number", "--sigma-rel: 'x' is not a number"),
        ("export_without_eval", "--export-best needs --eval"),
    ],
)
def test_clear_errors(run_dir, tmp_path, capsys, breakage, message):
    broken = tmp_path / "run"
    broken.mkdir()
    args = ["posthoc", str(broken)]
    if breakage != "no_snapshots":
        (broken / "ema_snapshots").mkdir()
        for f in (run_dir / "ema_snapshots").iterdir():
            (broken / "ema_snapshots" / f.name).hardlink_to(f)  # links leading out: refused
        victim = broken / "ema_snapshots" / read_index(run_dir / "ema_snapshots")[3].file
        if breakage == "missing":
            victim.unlink()
        if breakage == "truncated":
            data = victim.read_bytes()[:100]
            victim.unlink()
            victim.write_bytes(data)
    args += {"outside": ["--sigma-rel", "0.004"], "decay_init": ["--decay", "0.99"],
             "step": ["--step", "99"], "bad_number": ["--sigma-rel", "x"],
             "export_without_eval": ["--export-best", "x.pth"]}.get(breakage, [])
    assert main(args) == 2
    assert message in _error_line(capsys)
