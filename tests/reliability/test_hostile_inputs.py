"""A table of hostile inputs (issue 16), each refused with one D2EMAError before anything is
changed: every field of a post-hoc snapshot index, snapshot contents, a resume whose checkpoint
does not fit exactly, settings that would delete a series or drop an EMA, ``--dataset`` COCO
files, and training inputs (iterations, output and snapshot folders)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

import _kill_child
from _hostile import posthoc_series as _posthoc_series
from _hostile import snapshot, tiny_yaml

from d2ema.cli import main
from d2ema.d2 import add_model_ema_configs, ema_settings, get_model_ema
from d2ema.d2.data.datasets import parse_coco_dataset
from d2ema.errors import D2EMAError, one_line
from d2ema.posthoc import PostHocEMA, Target, plan, reconstruct
from d2ema.posthoc.snapshots import file_crc32, read_index

pytestmark = pytest.mark.usefixtures("restore_loggers")


def _refused(tally, run, *names) -> str:
    tally["bad_inputs"] += 1
    tally["hostile_checks"] += 1
    with pytest.raises(D2EMAError) as info:
        run()
    line = one_line(info.value)
    assert "\n" not in line
    for name in names:
        assert str(name) in line, f"{name!r} not in: {line}"
    tally["refused_cleanly"] += 1
    return line


# ----------------------------------------------------------------------------- index fields
@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("series") / "ema_snapshots"
    _posthoc_series(folder)
    return folder


def _copy(series: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run" / "ema_snapshots"
    folder.mkdir(parents=True)
    for f in series.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _edit(field: str, value):
    def apply(data):
        data["snapshots"][2][field] = value
    return apply


INDEX_CASES = {
    "sigma_rel_string": (_edit("sigma_rel", "0.05"), "sigma_rel = '0.05'"),
    "sigma_rel_negative": (_edit("sigma_rel", -0.05), "sigma_rel = -0.05"),
    "sigma_rel_zero": (_edit("sigma_rel", 0.0), "sigma_rel = 0.0"),
    "sigma_rel_nan": (_edit("sigma_rel", math.nan), "sigma_rel = nan"),
    "sigma_rel_huge": (_edit("sigma_rel", 5.0), "outside (0,"),
    "gamma_mismatch": (_edit("gamma", 1.0), "gamma = 1.0"),
    "t_string": (_edit("t", "2"), "t = '2'"),
    "t_bool": (_edit("t", True), "t = True"),
    "t_negative": (_edit("t", -2), "t = -2"),
    "t_absurd": (_edit("t", 10**15), "t = 1000000000000000"),
    "t_after_step": (_edit("t", 3), "after its step"),
    "step_float": (_edit("step", 2.0), "step = 2.0"),
    "bytes_negative": (_edit("bytes", -1), "bytes = -1"),
    "rounding_inf": (_edit("rounding", math.inf), "rounding = inf"),
    "dtype_unknown": (_edit("dtype", "int8"), "dtype = 'int8'"),
    "file_not_a_snapshot": (_edit("file", "config.yaml"), "file = 'config.yaml'"),
    "file_number": (_edit("file", 3), "file = 3"),
    # a forged entry at a later step naming a kept snapshot: a resume would delete that file
    "file_of_another_step": (_edit("file", "sigma0.05_step00000001.pth"),
                             "but its snapshot is named"),
    "field_missing": (lambda d: d["snapshots"][2].pop("gamma"), "has fields"),
    "field_extra": (lambda d: d["snapshots"][2].update(cmd="x"), "has fields"),
    "entry_not_object": (lambda d: d["snapshots"].__setitem__(2, [1, 2]), "has fields list"),
    "snapshots_not_list": (lambda d: d.__setitem__("snapshots", {"a": 1}), "no list of snap"),
    "duplicate": (lambda d: d["snapshots"].append(copy.deepcopy(d["snapshots"][0])), "twice"),
    "top_level_list": ("[1, 2]", "not a d2ema snapshot index"),
    "truncated": ('{"format": "d2ema post-hoc EMA snapshots", "snapshots": [{"file', "cannot"),
    "nested": ("[" * 200000 + "]" * 200000, "cannot read"),
    "not_utf8": (b"\xff\xfe{", "cannot read"),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_bad_index_refused_and_nothing_written(series, tmp_path, case, tally, capsys):
    folder = _copy(series, tmp_path)
    index = folder / "index.json"
    edit, expected = INDEX_CASES[case]
    if isinstance(edit, bytes):
        index.write_bytes(edit)
    elif isinstance(edit, str):
        index.write_text(edit)
    else:
        data = json.loads(index.read_text())
        edit(data)
        index.write_text(json.dumps(data))
    before = snapshot(tmp_path)
    _refused(tally, lambda: read_index(folder), expected)
    assert main(["posthoc", str(folder.parent), "--sigma-rel", "0.07"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    tracker = PostHocEMA(_kill_child.ReliabilityTinyNet(), folder, (0.05, 0.1),
                         background=False)
    with pytest.raises(D2EMAError):
        tracker.writer.sync(0)  # a new run on this folder deletes nothing
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- snapshot contents
def _rewrite(path: Path, change) -> None:
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)
    index = path.parent / "index.json"
    entries = json.loads(index.read_text())
    for e in entries["snapshots"]:
        if e["file"] == path.name:  # a forger who updates the index: the content is checked
            e["bytes"], e["crc32"] = path.stat().st_size, file_crc32(path)
    index.write_text(json.dumps(entries))


CONTENT_CASES = {
    "missing_tensor": (lambda d: d["tensors"].pop("conv.bias"), "lacks ['conv.bias']"),
    "wrong_shape": (lambda d: d["tensors"].__setitem__("conv.bias", torch.zeros(3)),
                    "conv.bias of shape (3,)"),
    "nan": (lambda d: d["tensors"]["head.weight"].__setitem__((0, 0), math.nan),
            "NaN or Inf in 'head.weight'"),
    "not_a_tensor": (lambda d: d["tensors"].__setitem__("conv.bias", [1.0]), "not a tensor"),
    "dtype_name": (lambda d: d["dtypes"].__setitem__("conv.bias", "load"), "lists dtypes"),
}


@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_bad_snapshot_content_refused(series, tmp_path, case, tally):
    folder = _copy(series, tmp_path)
    victim = sorted(e.file for e in read_index(folder) if e.step == 3)[0]
    change, expected = CONTENT_CASES[case]
    _rewrite(folder / victim, change)
    plan(folder, [Target("sigma_rel", 0.07)])  # the index is fine: only the content is not
    _refused(tally, lambda: list(reconstruct(folder, [Target("sigma_rel", 0.07)])), expected,
             victim)


def test_a_rebuild_of_another_shape_is_not_broadcast_into_the_model(tally):
    from d2ema.posthoc import load_tensors

    model = _kill_child.ReliabilityTinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _refused(tally, lambda: load_tensors(model, {"conv.bias": torch.zeros(1)}),
             "conv.bias has shape (1,)")  # copy_ would have filled all 8 with 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- settings
def test_changed_sigma_rels_never_delete_the_series(series, tmp_path, tally):
    folder = _copy(series, tmp_path)
    before = snapshot(folder)
    for resume_at in (0, 2):
        tracker = PostHocEMA(_kill_child.ReliabilityTinyNet(), folder, (0.2,), background=False)
        _refused(tally, lambda t=tracker, s=resume_at: t.writer.sync(s), "sigma_rel [0.05, 0.1]",
                 "PostHocEMA(sigma_rels=...)")  # the core's words; d2ema train adds the key
    assert snapshot(folder) == before


@pytest.mark.parametrize(("key", "values"), [
    ("EXTRA_SIGMA_RELS", [0.1, 0.10000001]),
    ("EXTRA_DECAYS", [0.9999, 0.99990001]),
    ("POSTHOC.SIGMA_RELS", [0.05, 0.050000001]),
])
def test_values_whose_ema_names_collide_are_refused(key, values, tally):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_model_ema_configs(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.POSTHOC.ENABLED = key.startswith("POSTHOC")
    node, _, last = ("MODEL_EMA." + key).rpartition(".")
    target = cfg
    for part in node.split("."):
        target = target[part]
    target[last] = values
    _refused(tally, lambda: ema_settings(cfg), f"MODEL_EMA.{key}", "print the same")


# ----------------------------------------------------------------------------- exact resume
def _fingerprint(trainer) -> tuple:
    ema = get_model_ema(trainer.model)
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in ema.tensors().items()}, ema.step,
            repr(trainer.optimizer.state_dict()))


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(a[i][k], b[i][k]) for i in (0, 1) for k in a[i]) and a[2:] == b[2:]


def _opt(c):
    return c["trainer"]["_trainer"]["optimizer"]  # where detectron2's DefaultTrainer keeps it


RESUME_CASES = {
    "iteration_string": (lambda c: c.__setitem__("iteration", "1"), "iteration is '1'"),
    "iteration_negative": (lambda c: c["trainer"].__setitem__("iteration", -7),
                           "trainer.iteration is -7"),
    "model_lacks_key": (lambda c: c["model"].pop("conv.bias"), "lacks 1 tensors (conv.bias)"),
    "model_wrong_shape": (lambda c: c["model"].__setitem__("head.bias", torch.zeros(5)),
                          "head.bias has shape (5,)"),
    "optimizer_wrong_shape": (
        lambda c: next(iter(_opt(c)["state"].values())).__setitem__(
            "momentum_buffer", torch.zeros(2, 2)), "momentum_buffer of parameter"),
    "optimizer_groups": (lambda c: _opt(c)["param_groups"].append(
        copy.deepcopy(_opt(c)["param_groups"][0])), "parameter groups"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    cfg = _kill_child.config(str(out), 2)
    cfg.MODEL_EMA.POSTHOC.ENABLED = False
    trainer = _kill_child.KillTrainer(cfg)
    trainer.train()
    return out


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_exact_or_refused_before_loading(trained, tmp_path, case, tally):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = torch.load(trained / "model_final.pth", weights_only=True)
    change, expected = RESUME_CASES[case]
    change(checkpoint)
    torch.save(checkpoint, out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    cfg = _kill_child.config(str(out), 4)
    cfg.MODEL_EMA.POSTHOC.ENABLED = False
    trainer = _kill_child.KillTrainer(cfg)
    before = _fingerprint(trainer)
    _refused(tally, lambda: trainer.resume_or_load(resume=True), "cannot resume", expected,
             "nothing was loaded")
    assert _same(before, _fingerprint(trainer))
    if case.startswith("iteration_string"):  # bad data: every reader refuses it
        with pytest.raises(D2EMAError, match=expected):
            trainer.checkpointer.load(str(out / "model_final.pth"), checkpointables=[])
        return
    trainer.checkpointer.load(str(out / "model_final.pth"), checkpointables=[])  # not a resume:
    # detectron2's lenient loading (fine-tuning from other weights) is left as it is


# ----------------------------------------------------------------------------- --dataset files
def _coco(images=None, annotations=None, categories=None, drop=()):
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}]
            if images is None else images,
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3],
                             "iscrowd": 0, "area": 9}] if annotations is None else annotations,
            "categories": [{"id": 1, "name": "box"}] if categories is None else categories}
    for key in drop:
        data.pop(key)
    return data


def _box(box):
    return _coco(annotations=[{"id": 7, "image_id": 1, "category_id": 1, "bbox": box}])


DATASET_CASES = {
    "invalid_json": ("{not json", "is not valid JSON"),
    "not_an_object": ([1, 2], "holds a list"),
    "no_images": (_coco(images=[]), "lists no images"),
    "no_annotations": (_coco(drop=("annotations",)), "has no list 'annotations'"),
    "box_strings": (_box(["1", "1", "3", "3"]), "annotations[0] (id 7) has bbox ['1'"),
    "box_negative": (_box([1, 1, -3, 3]), "with a negative value"),
    "box_nan": (_box([1, 1, math.nan, 3]), "has bbox [1, 1, nan, 3]"),
    "box_short": (_box([1, 1, 3]), "has bbox [1, 1, 3]"),
    "unknown_category": (_coco(annotations=[{"id": 7, "image_id": 1, "category_id": 9,
                                             "bbox": [1, 1, 3, 3]}]), "category_id 9"),
    "unknown_image": (_coco(annotations=[{"id": 7, "image_id": 4, "category_id": 1,
                                          "bbox": [1, 1, 3, 3]}]), "image_id 4"),
    "file_absolute": (_coco(images=[{"id": 1, "file_name": "/etc/passwd"}]), "'/etc/passwd'"),
    "file_dotdot": (_coco(images=[{"id": 1, "file_name": "../secret.png"}]), "'../secret.png'"),
    "image_id_string": (_coco(images=[{"id": "1", "file_name": "a.png"}]), "no integer id"),
    "category_no_name": (_coco(categories=[{"id": 1}]), "categories[0]"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_json_refused_before_training(case, tmp_path, tally, capsys):
    content, expected = DATASET_CASES[case]
    ann = tmp_path / f"{case}.json"
    ann.write_text(content if isinstance(content, str) else json.dumps(content))
    spec = f"hostile_{case}={ann}:{tmp_path}"
    _refused(tally, lambda: parse_coco_dataset(spec), f"{case}.json", expected)
    if case == "box_negative":  # the command line: one line, before any training
        out = tmp_path / "out"
        assert main(["train", "--config-file", str(tiny_yaml(tmp_path, out)),
                     "--dataset", spec]) == 2
        assert expected in capsys.readouterr().err
        assert not out.exists()


def test_a_good_dataset_json_passes(tmp_path):
    ann = tmp_path / "good.json"
    ann.write_text(json.dumps(_coco()))
    assert parse_coco_dataset(f"good={ann}:{tmp_path}").name == "good"


# ----------------------------------------------------------------------------- training inputs
def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


TRAINING_CASES = {
    "max_iter_zero": (lambda t: ["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER = 0"),
    "max_iter_negative": (lambda t: ["SOLVER.MAX_ITER", "-5"], "SOLVER.MAX_ITER = -5"),
    "output_is_a_file": (lambda t: ["OUTPUT_DIR", str(_file(t / "f"))], "is a file"),
    "output_inside_a_file": (lambda t: ["OUTPUT_DIR", str(_file(t / "f") / "x")],
                             "which is a file"),
    "posthoc_dir_is_a_file": (lambda t: ["MODEL_EMA.POSTHOC.ENABLED", "True",
                                         "MODEL_EMA.POSTHOC.DIR", _file(t / "out" / "s").name],
                              "MODEL_EMA.POSTHOC.DIR"),
    "posthoc_dir_dotdot": (lambda t: ["MODEL_EMA.POSTHOC.ENABLED", "True",
                                      "MODEL_EMA.POSTHOC.DIR", "../elsewhere"],
                           "must be a folder inside OUTPUT_DIR"),
    "posthoc_dir_absolute": (lambda t: ["MODEL_EMA.POSTHOC.ENABLED", "True",
                                        "MODEL_EMA.POSTHOC.DIR", str(t / "abs")],
                             "must be a folder inside OUTPUT_DIR"),
}


@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_bad_training_inputs_refused_before_start(case, tmp_path, tally, capsys):
    (tmp_path / "out").mkdir()
    opts, expected = TRAINING_CASES[case]
    before = snapshot(tmp_path)
    argv = ["train", "--config-file", str(tiny_yaml(tmp_path, tmp_path / "out")),
            *opts(tmp_path)]
    before = snapshot(tmp_path)
    tally["bad_inputs"] += 1
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert snapshot(tmp_path) == before
    tally["refused_cleanly"] += 1


def test_read_only_output_dir_refused(tmp_path, monkeypatch, capsys, tally):
    """As root every folder is writable, so the permission answer is what the test sets."""
    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **kw: False if Path(p) == out else real(p, m))
    tally["bad_inputs"] += 1
    assert main(["train", "--config-file", str(tiny_yaml(tmp_path, out))]) == 2
    assert "cannot write" not in (err := capsys.readouterr().err) and "read-only" in err, err
    tally["refused_cleanly"] += 1


def test_refused_load_leaves_the_checkpointer_as_it_was(tmp_path, monkeypatch):
    """detectron2 main's ``DetectionCheckpointer.load`` sets ``_parsed_url_during_load`` and
    resets it only after a load that succeeded, asserting it is None first: a load d2ema refuses
    must leave it None, or the next load on that checkpointer fails. main's behaviour is
    simulated here, so that the suite on v0.6 checks it too."""
    from detectron2.checkpoint import DetectionCheckpointer

    from d2ema.d2.checkpoint.checkpointers import AtomicCheckpointer
    from d2ema.errors import CheckpointError

    def load_as_main_does(self, path, *args, **kwargs):
        assert getattr(self, "_parsed_url_during_load", None) is None
        self._parsed_url_during_load = path
        raise CheckpointError(f"{path}: refused")

    monkeypatch.setattr(DetectionCheckpointer, "load", load_as_main_does)
    checkpointer = AtomicCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    for _ in range(2):  # the second load finds the checkpointer as the first did
        with pytest.raises(CheckpointError, match="refused"):
            checkpointer.load("model_0000001.pth")
    assert checkpointer._parsed_url_during_load is None
