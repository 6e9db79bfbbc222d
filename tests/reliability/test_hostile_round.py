"""What the 0.3.0 hostile round found (``benchmarks/hostile_round.py``): each is a test that
fails without its fix. Tracebacks where one line is promised (state names that are not strings,
a view whose shape is larger than its storage, a YAML integer past Python's digit limit, two
images with one id, a ``--dist-url`` torch cannot use), a saved config that wrote a file
outside the run, and a SIGTERM while ``d2ema`` exits that ended it with no word."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from _hostile import files_outside, finished_run, snapshot, tiny_yaml
from test_seams import _lazy, _refused, _refused_call, _with_ema

pytestmark = pytest.mark.usefixtures("restore_loggers")


@pytest.fixture
def run(tmp_path) -> Path:
    return finished_run(tmp_path)


def _first(data: dict) -> str:
    return next(k for k, v in data["model"].items() if v.is_floating_point())


BAD_STATES = {  # each was a traceback in export (AttributeError, a 4 TB allocation)
    "int_names": (lambda d: d.update(ema_state=dict(enumerate(d["ema_state"].values()))),
                  "names that are not strings"),
    "tuple_names": (lambda d: d.update(model={(i, 0): v for i, v in
                                              enumerate(d["model"].values())}),
                    "names that are not strings"),
    "view_past_storage": (lambda d: d["ema_state"].update(
        {_first(d): torch.zeros(1).expand(10**6, 10**6)}), "(1000000, 1000000) on 4 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_a_forged_state_is_one_line_in_every_command(run, tmp_path, case, tally, capsys):
    change, expected = BAD_STATES[case]
    path = _with_ema(run, change)
    out = tmp_path / "export.pth"
    _refused(tally, capsys, ["export", str(path), "-o", str(out)], expected, path.name)
    _refused(tally, capsys, ["train", "--config-file", str(run / "config.yaml"), "--eval-only",
                             "MODEL.WEIGHTS", str(path)], expected)
    assert not out.exists()


def test_a_yaml_integer_past_the_digit_limit_is_one_line(run, tally):
    from d2ema.d2.config.saved import read_saved_config

    (run / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 1" + "0" * 5000 + "\n")
    _refused_call(tally, lambda: read_saved_config(run / "config.yaml"), "config.yaml",
                  "plain YAML")


def test_a_saved_config_cannot_write_a_coco_json_outside(run, tmp_path, tally, capsys):
    """convert_to_coco_json is defined in detectron2.data (allowed) and writes where it is told."""
    victim = tmp_path / "OUTSIDE" / "written.json"
    before = snapshot(tmp_path / "OUTSIDE")
    _lazy(run, "  _target_: detectron2.data.datasets.coco.convert_to_coco_json\n"
          f"  dataset_name: shapes_val\n  output_file: {victim}\n  allow_cached: false\n")
    _refused(tally, capsys, ["posthoc", str(run), "--eval", "--sigma-rel", "0.07"],
             "convert_to_coco_json", "outside the allowed packages")
    assert not files_outside(tmp_path / "OUTSIDE", before)


def test_two_images_of_one_id_are_refused(tmp_path, tally):
    from d2ema.d2.data.coco_check import check_coco_file

    one = {"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [one, dict(one, file_name="b.jpg")],
                                "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    _refused_call(tally, lambda: check_coco_file("mine", path), "images[1]", "id 1")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "tcp://127.0.0.1", "tcp://$(touch x):1"])
def test_a_dist_url_torch_cannot_use_is_one_line(tmp_path, url, tally, capsys):
    cfg = tiny_yaml(tmp_path, tmp_path / "out")
    _refused(tally, capsys, ["train", "--config-file", str(cfg), "--num-machines", "2",
                             "--dist-url", url], "--dist-url", "tcp://HOST:PORT")


def test_sigterm_while_exiting_is_one_line_and_143(run, tmp_path, tally):
    """The command has finished and Python shuts down (seconds with torch loaded) when the
    signal comes: atexit sends it, so the test hits that window every time."""
    path = _with_ema(run, lambda d: None)
    out = tmp_path / "export.pth"
    code = ("import atexit, os, signal, sys; from d2ema.cli import main; "
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM)); sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code, "export", str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    tally["bad_inputs"] += 1
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last == "d2ema export: interrupted by SIGTERM while exiting", last
    assert "wrote" in done.stdout and out.exists()  # its output came first, and is whole
    assert torch.load(out, weights_only=True)["model"]
    tally["refused_cleanly"] += 1
