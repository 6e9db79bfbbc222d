"""``d2ema export``: EMA weights as a plain detectron2 checkpoint: round trip, atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2ema.d2.checkpoint.export as export_module
from d2ema import EMA
from d2ema.app.model_configs import tiny_detector_config
from d2ema.cli import main
from d2ema.d2 import EMACheckpointer
from d2ema.d2.checkpoint.export import EXPORT_KEY, ExportError, ema_model_state, export_ema

SIZE = 64


def _cfg():
    cfg = tiny_detector_config("retinanet", num_classes=3, image_size=SIZE)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # always some detections to compare
    return cfg


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float()


def _batch(seed: int) -> list[dict]:
    inst = Instances((SIZE, SIZE))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 36.0], [30.0, 20.0, 60.0, 60.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    return [{"image": _image(seed + k), "instances": inst, "height": SIZE, "width": SIZE}
            for k in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint saved by EMACheckpointer after a few SGD steps (EMA != raw weights)."""
    torch.manual_seed(0)
    model = build_model(_cfg())
    ema = EMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    with EventStorage():
        for step in range(4):
            loss = sum(model(_batch(step)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(model)
    folder = tmp_path_factory.mktemp("ckpt")
    EMACheckpointer(model, str(folder), ema=ema).save("model_final")
    return model, ema, folder / "model_final.pth"


def _predict(model, image):
    model.eval()
    with torch.no_grad():
        out = model([{"image": image, "height": SIZE, "width": SIZE}])[0]["instances"]
    return out.pred_boxes.tensor, out.scores, out.pred_classes


def test_export_round_trip(trained, tmp_path):
    model, ema, checkpoint = trained
    out = tmp_path / "ema.pth"
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=True)
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    assert set(exported["model"]) == set(raw)
    assert exported[EXPORT_KEY]["step"] == 4
    ema_tensors = ema.tensors()
    for name, value in exported["model"].items():
        assert value.dtype == raw[name].dtype
        assert torch.equal(value, ema_tensors[name].to(raw[name].dtype)), name
    assert any(not torch.equal(exported["model"][n], raw[n]) for n in raw)

    fresh = build_model(_cfg())  # EMA disabled: a plain detectron2 model
    DetectionCheckpointer(fresh).load(str(out))
    image = _image(123)
    with ema.swapped(model):
        expected = _predict(model, image)
    got = _predict(fresh, image)
    raw_pred = _predict(model, image)
    assert expected[0].numel() > 0
    for a, b in zip(got, expected):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)
    assert not torch.allclose(raw_pred[1], expected[1])  # the EMA made a difference


def test_export_message(trained, tmp_path, capsys):
    _, _, checkpoint = trained
    out = tmp_path / "sub" / "ema.pth"  # the folder is created
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MODEL.WEIGHTS" in printed
    assert out.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_tensors_left_out_are_said_to_be_harmless_buffers():
    """The EMA tracks every buffer; a model's state_dict leaves out its non-persistent ones
    (detectron2's pixel_mean, pixel_std, anchors): the export says they do not matter."""
    from d2ema.d2.checkpoint.export import ExportSummary

    text = ExportSummary(Path("in.pth"), Path("out.pth"), 3, 0, 7, 10).describe()
    assert "7 EMA tensors without a model entry left out (buffers the model does not save" in text
    assert "harmless" in text


def test_cast_and_partial_names():
    model = {
        "a": torch.zeros(2, dtype=torch.float16),
        "b": torch.ones(3),
        "n": torch.tensor(5),
    }
    ema = {"a": torch.full((2,), 0.5), "module_only": torch.ones(1), "n": torch.tensor(7)}
    state, replaced, kept, ema_only = ema_model_state({"model": model, "ema_state": ema})
    assert state["a"].dtype == torch.float16 and torch.equal(state["a"], ema["a"].half())
    assert torch.equal(state["b"], model["b"])  # not tracked by the EMA: raw value
    assert state["n"].item() == 7
    assert "module_only" not in state
    assert (replaced, kept, ema_only) == (2, 1, 1)


def test_module_prefix_is_aligned():
    model = {"w": torch.zeros(2)}
    state, replaced, _, _ = ema_model_state(
        {"model": model, "ema_state": {"module.w": torch.ones(2)}}
    )
    assert replaced == 1 and torch.equal(state["w"], torch.ones(2))


def test_foreign_ema_is_refused():
    with pytest.raises(ExportError, match="does not belong"):
        ema_model_state({"model": {"w": torch.zeros(2)}, "ema_state": {"x": torch.ones(2)}})
    with pytest.raises(ExportError, match="shape"):
        ema_model_state({"model": {"w": torch.zeros(2)}, "ema_state": {"w": torch.ones(3)}})


def test_refuses_checkpoint_without_ema(tmp_path, capsys):
    src = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "iteration": 3}, src)
    out = tmp_path / "out.pth"
    assert main(["export", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no EMA" in err and "MODEL_EMA.ENABLED" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_atomic_write_on_injected_failure(trained, tmp_path, monkeypatch):
    _, _, checkpoint = trained
    out = tmp_path / "ema.pth"
    out.write_bytes(b"previous contents")

    def broken_save(obj, f):
        f.write(b"partial data")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export_module.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_ema(checkpoint, out)
    assert out.read_bytes() == b"previous contents"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["ema.pth"]  # no temporary file left


def test_unwritable_output(trained, tmp_path, capsys):
    _, _, checkpoint = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "ema.pth"  # its parent is a file: cannot be created
    assert main(["export", str(checkpoint), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_refuses_to_overwrite_its_input(trained, tmp_path, capsys):
    _, _, checkpoint = trained
    copy = tmp_path / "ckpt.pth"
    copy.write_bytes(checkpoint.read_bytes())
    assert main(["export", str(copy), "-o", str(copy)]) == 2
    assert "is the input checkpoint" in capsys.readouterr().err


def test_lazy_run_config_with_python_objects_exports_and_says_how(trained, tmp_path, capsys):
    """A LazyConfig run whose saved config.yaml holds Python objects: the weights are written,
    and the advice fits a LazyConfig user (the .py with train.init_checkpoint)."""
    _, _, checkpoint = trained
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  _target_: !!python/name:builtins.dict ''\ntrain:\n"
                      "  output_dir: out\n  model_ema: {enabled: true}\n")
    out = tmp_path / "ema.pth"
    assert main(["export", str(checkpoint), "-o", str(out), "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and not out.with_suffix(".yaml").exists()
    assert f"train.init_checkpoint={out.resolve()}" in printed


def test_unreadable_yacs_config_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    _, _, checkpoint = trained
    config = tmp_path / "config.yaml"
    config.write_text("MODEL: [unclosed\n")
    out = tmp_path / "ema.pth"
    assert main(["export", str(checkpoint), "-o", str(out), "--config", str(config)]) == 2
    assert "as plain YAML" in capsys.readouterr().err
    assert not out.exists()  # no half export
