"""Every bad input of issue 10, and every MODEL_EMA key with a wrong type, a value out of range
and a misspelt name, in yacs (in code and on the command line) and LazyConfig: each must be
refused with one D2EMAError (exit status 2 and one line on the command line) that names the
key or argument and the value, and must leave the model, the EMA and files as they were."""

from __future__ import annotations

import contextlib
import io
import math
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from d2ema import EMA, D2EMAError
from d2ema.errors import one_line

pytest.importorskip("detectron2")

from detectron2.config import get_cfg

from d2ema.cli import main
from d2ema.d2 import add_model_ema_configs, ema_settings
from d2ema.d2.config.settings import KEYS

NAN, INF = float("nan"), float("inf")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module, ema: EMA) -> tuple:
    """Everything a refused call must leave as it was, byte for byte."""
    return (
        {n: _bytes(t) for n, t in ema.tensors().items()},
        ema.step, ema.num_skipped, repr(ema.meta()),
        {n: _bytes(t) for n, t in model.state_dict().items()},
    )


def _refused(tally, run: Callable[[], object], *names: object) -> str:
    tally["bad_inputs"] += 1
    with pytest.raises(D2EMAError) as info:
        run()
    line = one_line(info.value)
    for name in names:
        assert str(name) in line, f"{name!r} not named in: {line}"
    tally["refused_cleanly"] += 1
    return line


# ----------------------------------------------------------------------------- EMA arguments
def _half(m):
    return m.half()


def _on_meta(m):
    return m.to("meta")


EMA_ARGUMENTS = [
    ({"decay": True}, "decay = True"),
    ({"decay": None}, "decay = None"),
    ({"decay": 1.5}, "decay = 1.5"),
    ({"decay": -0.1}, "decay = -0.1"),
    ({"decay": NAN}, "decay = nan"),
    ({"decay": "0.99"}, "decay = '0.99'"),
    ({"every": True}, "every = True"),
    ({"every": 0}, "every = 0"),
    ({"every": 1.5}, "every = 1.5"),
    ({"every": "2"}, "every = '2'"),
    ({"start": -1}, "start = -1"),
    ({"start": True}, "start = True"),
    ({"start": 0.5}, "start = 0.5"),
    ({"schedule": "cosine"}, "'cosine'"),
    ({"schedule": 5}, "schedule = 5"),
    ({"schedule": "yolov5", "schedule_params": [("tau", 5)]}, "schedule_params = [('tau', 5)]"),
    ({"schedule": "yolov5", "schedule_params": {"bogus": 1}}, "bogus"),
    ({"schedule": "power", "schedule_params": {"inv_gamma": INF}}, "inv_gamma"),
    ({"schedule": "power", "schedule_params": {"inv_gamma": 0.0}}, "inv_gamma"),
    ({"schedule": "power", "schedule_params": {"power": -1.0}}, "power must"),
    ({"schedule": "power", "schedule_params": {"min_decay": 2.0}}, "min_decay"),
    ({"schedule": "yolov5", "schedule_params": {"tau": 0}}, "tau"),
    ({"schedule": "yolov5", "schedule_params": {"tau": INF}}, "tau"),
    ({"schedule": "yolov5", "schedule_params": {"tau": "x"}}, "tau"),
    ({"schedule": "tf", "schedule_params": {"warmup_factor": 0.5}}, "warmup_factor"),
    ({"schedule": "sigma_rel", "schedule_params": {"sigma_rel": 0.5}}, "sigma_rel"),
    ({"schedule": "sigma_rel", "schedule_params": {"sigma_rel": 0.0}}, "sigma_rel"),
    ({"master_dtype": "float32"}, "master_dtype = 'float32'"),
    ({"master_dtype": torch.int32, "_model": _half}, "master_dtype = torch.int32"),
    ({"master_dtype": torch.bool}, "master_dtype = torch.bool"),
    ({"device": "meta"}, "device = 'meta'"),
    ({"device": "gpu0"}, "device = 'gpu0'"),
    ({"_model": _on_meta}, "meta device"),
    ({"exclude": ["("]}, "'('"),
    ({"exclude": [".*"]}, "'.*'"),
    ({"exclude": [""]}, "''"),
    ({"exclude": [5]}, "5"),
    ({"exclude": [r"weight$", r"bias$", "running", "num_batches"]}, "no tensors to track"),
    ({"include_frozen": "yes"}, "include_frozen = 'yes'"),
    ({"skip_nonfinite": 1}, "skip_nonfinite = 1"),
    ({"flat": None}, "flat = None"),
]


@pytest.mark.parametrize(("kwargs", "named"), EMA_ARGUMENTS, ids=[n for _, n in EMA_ARGUMENTS])
def test_ema_argument_refused(kwargs, named, tally):
    kwargs = dict(kwargs)
    model = kwargs.pop("_model", lambda m: m)(_model())
    _refused(tally, lambda: EMA(model, **kwargs), named)


@pytest.mark.parametrize("model", [{"w": torch.zeros(3)}, None, torch.zeros(3)],
                         ids=["dict", "None", "tensor"])
def test_non_module_model_refused(model, tally):
    _refused(tally, lambda: EMA(model), "model", "torch.nn.Module")


# ----------------------------------------------------------------------------- EMA operations
def _replace_head(m):
    m[2] = nn.Linear(4, 2)


def _append_layer(m):
    m.append(nn.Linear(2, 2))


def _delete_bn(m):
    m[1] = nn.Identity()


OPERATIONS = [
    ("update(step=-1)", lambda m, e: e.update(m, step=-1), ["step = -1"]),
    ("update(step=True)", lambda m, e: e.update(m, step=True), ["step = True"]),
    ("update(step=1.5)", lambda m, e: e.update(m, step=1.5), ["step = 1.5"]),
    ("submodule replaced", lambda m, e: (_replace_head(m), e.update(m)),
     ["submodules replaced", "2", "ema.rebind(model)"]),
    ("layer appended", lambda m, e: (_append_layer(m), e.update(m)),
     ["tensors added", "3.weight", "new EMA"]),
    ("layer removed", lambda m, e: (_delete_bn(m), e.update(m)), ["tensors removed", "1.weight"]),
    ("swap after replacement", lambda m, e: (_replace_head(m), e.swapped(m).__enter__()),
     ["submodules replaced"]),
]


@pytest.mark.parametrize(("label", "op", "named"), OPERATIONS, ids=[o[0] for o in OPERATIONS])
def test_ema_operation_refused_changes_nothing(label, op, named, tally):
    model = _model()
    ema = EMA(model, decay=0.5)
    model(torch.randn(8, 3))  # BN statistics move: an update would change the EMA
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = fingerprint(model, ema)
    _refused(tally, lambda: op(model, ema), *named)
    assert {n: _bytes(t) for n, t in ema.tensors().items()} == before[0]
    assert (ema.step, ema.num_skipped) == before[1:3]


def test_rebind_follows_a_replaced_submodule():
    model = _model()
    ema = EMA(model, decay=0.0)
    _replace_head(model)
    with pytest.raises(D2EMAError):
        ema.update(model)
    ema.rebind(model)
    ema.update(model)
    assert torch.equal(ema.tensors()["2.weight"], model[2].weight)


# ----------------------------------------------------------------------------- loads
def loadable_but_different(ema: EMA) -> dict:
    """A valid state that would change every tensor, the step and the skip count."""
    sd = ema.state_dict()
    return {
        "ema_state": {n: t + 1 for n, t in sd["ema_state"].items()},
        "ema_meta": {**sd["ema_meta"], "step": 1234, "num_skipped": 7},
    }


def _last_meta(s):
    name = list(s["ema_state"])[-2]
    t = s["ema_state"][name]
    s["ema_state"][name] = torch.empty(t.shape, dtype=t.dtype, device="meta")


def _sparse_late(s):
    s["ema_state"]["2.weight"] = s["ema_state"]["2.weight"].to_sparse()


def _set(where: str, key: str, value):
    def change(s):
        s[where][key] = value
    return change


def _scale(name: str, value: float):
    def change(s):
        s["ema_state"][name] = s["ema_state"][name] * value
    return change


LOADS = [
    ("meta tensor after others", _last_meta, ["meta device", "1.running_var"]),
    ("sparse tensor", _sparse_late, ["not dense", "2.weight"]),
    ("NaN tensor", _scale("0.weight", NAN), ["NaN or Inf", "0.weight"]),
    ("Inf tensor", _scale("1.running_mean", INF), ["NaN or Inf", "1.running_mean"]),
    ("schedule is a tensor", _set("ema_meta", "schedule", torch.ones(2)), ["schedule"]),
    ("schedule is an int", _set("ema_meta", "schedule", 5), ["schedule 5"]),
    ("schedule dict without name", _set("ema_meta", "schedule", {"decay": 0.5}), ["schedule"]),
    ("every negative", _set("ema_meta", "every", -3), ["every -3"]),
    ("every zero", _set("ema_meta", "every", 0), ["every 0"]),
    ("start negative", _set("ema_meta", "start", -1), ["start -1"]),
    ("format_version negative", _set("ema_meta", "format_version", -1), ["format_version -1"]),
    ("format_version newer", _set("ema_meta", "format_version", 99), ["format_version 99"]),
    ("format_version string", _set("ema_meta", "format_version", "1"), ["format_version '1'"]),
    ("step negative", _set("ema_meta", "step", -1), ["step -1"]),
    ("step string", _set("ema_meta", "step", "3"), ["step '3'"]),
    ("step bool", _set("ema_meta", "step", True), ["step True"]),
    ("num_skipped negative", _set("ema_meta", "num_skipped", -2), ["num_skipped -2"]),
    ("nonfinite_step string", _set("ema_meta", "nonfinite_step", "x"), ["nonfinite_step 'x'"]),
    ("master_dtype int", _set("ema_meta", "master_dtype", 5), ["master_dtype 5"]),
    ("shape mismatch", _set("ema_state", "0.weight", torch.zeros(5, 3)), ["0.weight", "(5, 3)"]),
    ("dtype kind mismatch", _set("ema_state", "0.weight", torch.zeros(4, 3, dtype=torch.int64)),
     ["0.weight", "torch.int64"]),
    ("unexpected name", _set("ema_state", "extra.weight", torch.zeros(2)), ["extra.weight"]),
    ("missing name", lambda s: s["ema_state"].pop("0.bias"), ["0.bias"]),
    ("entry not a tensor", _set("ema_state", "0.bias", [1.0, 2.0]), ["0.bias"]),
    ("meta not a dict", lambda s: s.__setitem__("ema_meta", [1]), ["ema_meta"]),
]


@pytest.mark.parametrize(("label", "corrupt", "named"), LOADS, ids=[c[0] for c in LOADS])
def test_refused_load_changes_nothing(label, corrupt, named, tally):
    model = _model()
    ema = EMA(model, decay=0.5)
    state = loadable_but_different(ema)
    corrupt(state)
    before = fingerprint(model, ema)
    _refused(tally, lambda: ema.load_state_dict(state), *named)
    assert fingerprint(model, ema) == before


# ----------------------------------------------------------------------------- configs
def _wrong_type(name: str):
    default = KEYS[name][0]
    if isinstance(default, bool):
        return "yes"
    if isinstance(default, int):
        return 1.5
    if isinstance(default, float):
        return "abc"
    return 5  # strings and EXCLUDE


OUT_OF_RANGE: dict[str, list] = {
    "DECAY": [1.5, -0.1, NAN],
    "DECAY_WARM_UP_FACTOR": [0.5, INF],
    "TAU": [0.0, -1.0, INF],
    "INV_GAMMA": [0.0, INF],
    "POWER": [0.0, -2.0],
    "MIN_DECAY": [1.5, -0.5],
    "SIGMA_REL": [0.5, 0.0],
    "UPDATE_EVERY": [0, -2],
    "START_ITER": [-1],
    "SCHEDULE": ["cosine"],
    "MASTER_DTYPE": ["int8", "float16"],
    "DEVICE": ["meta", "gpu0"],
    "EXCLUDE": [["("], [".*"], [""]],
}
CROSS_KEY = [  # values fine alone, contradictory together
    ({"DECAY_WARM_UP_FACTOR": 10.0, "SCHEDULE": "yolov5"}, "DECAY_WARM_UP_FACTOR"),
    ({"SCHEDULE": "power", "DECAY": 0.5, "MIN_DECAY": 0.9}, "MIN_DECAY"),
]
CONFIG_CASES = (
    [(name, _wrong_type(name)) for name in KEYS]
    + [(name, value) for name, values in OUT_OF_RANGE.items() for value in values]
)


def _show(value) -> str:
    """How the message shows the value (an EXCLUDE list: the bad pattern in it)."""
    if isinstance(value, list):
        return repr(value[0])
    return str(value) if isinstance(value, (int, float)) else repr(value)


def _set(node, name: str, value) -> None:
    """``node[name] = value`` for a KEYS name, nested ones (``POSTHOC.PERIOD``) included."""
    *parents, leaf = name.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def _yacs():
    cfg = get_cfg()
    add_model_ema_configs(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL_EMA.ENABLED = True
    return cfg


@pytest.mark.parametrize(("name", "value"), CONFIG_CASES)
def test_yacs_key_refused(name, value, tally):
    cfg = _yacs()
    _set(cfg.MODEL_EMA, name, value)
    _refused(tally, lambda: ema_settings(cfg), f"MODEL_EMA.{name}", _show(value))


@pytest.mark.parametrize(("values", "named"), CROSS_KEY)
def test_yacs_contradictory_keys_refused(values, named, tally):
    cfg = _yacs()
    for name, value in values.items():
        _set(cfg.MODEL_EMA, name, value)
    _refused(tally, lambda: ema_settings(cfg), f"MODEL_EMA.{named}")


def test_unknown_yacs_key_refused(tally):
    cfg = _yacs()
    cfg.MODEL_EMA.DECAYY = 0.9
    _refused(tally, lambda: ema_settings(cfg), "DECAYY", "DECAY")


def _cli(tally, argv: list[str], *named: str) -> str:
    tally["bad_inputs"] += 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    for name in named:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    tally["refused_cleanly"] += 1
    return lines[0]


@pytest.fixture(scope="module")
def yaml_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "ema.yaml"
    path.write_text("MODEL:\n  DEVICE: cpu\nMODEL_EMA:\n  ENABLED: True\n")
    return path


@pytest.fixture(scope="module")
def lazy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "ema_lazy.py"
    path.write_text(textwrap.dedent("""
        from d2ema.d2 import lazy_model_ema_defaults
        train = dict(device="cpu", output_dir="unused",
                     model_ema={**lazy_model_ema_defaults(), "enabled": True})
    """))
    return path


@pytest.mark.parametrize(("name", "value"), CONFIG_CASES)
def test_yacs_override_refused(name, value, yaml_file, tally):
    text = str(value) if not isinstance(value, list) else repr(value)
    _cli(tally, ["train", "--config-file", str(yaml_file), f"MODEL_EMA.{name}", text],
         f"MODEL_EMA.{name}")


@pytest.mark.parametrize(("name", "value"), CONFIG_CASES)
def test_lazy_override_refused(name, value, lazy_file, tally):
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)  # 'nan'/'inf' parse as strings in overrides: a wrong type, also refused
    _cli(tally, ["train", "--config-file", str(lazy_file),
                 f"train.model_ema.{name.lower()}={value!r}"], f"train.model_ema.{name.lower()}")


@pytest.mark.parametrize(("values", "named"), CROSS_KEY)
def test_lazy_contradictory_keys_refused(values, named, lazy_file, tally):
    overrides = [f"train.model_ema.{k.lower()}={v!r}" for k, v in values.items()]
    _cli(tally, ["train", "--config-file", str(lazy_file), *overrides],
         f"train.model_ema.{named.lower()}")


def test_unknown_names_refused(yaml_file, lazy_file, tally):
    _cli(tally, ["train", "--config-file", str(yaml_file), "MODEL_EMA.DECAYY", "0.9"],
         "MODEL_EMA.DECAYY")
    _cli(tally, ["train", "--config-file", str(lazy_file), "train.model_ema.decayy=0.9"],
         "decayy")


# ----------------------------------------------------------------------------- command line
def _launch_cases() -> list[tuple[list[str], str]]:
    return [(["--num-gpus", "0"], "--num-gpus 0"), (["--num-gpus", "-1"], "--num-gpus -1"),
            (["--num-machines", "0"], "--num-machines 0"),
            (["--machine-rank", "3"], "--machine-rank 3"),
            (["--num-gpus", "99"], "--num-gpus 99"),
            # issue 10: this message contradicted itself; a local --dist-url cannot work here
            (["--num-machines", "2"], "--dist-url")]


@pytest.mark.parametrize(("args", "named"), _launch_cases(),
                         ids=[" ".join(a) for a, _ in _launch_cases()])
def test_launch_arguments_refused(args, named, yaml_file, tally):
    _cli(tally, ["train", "--config-file", str(yaml_file), *args], " ".join(args), named)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = _model()
    ema = EMA(model, decay=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    torch.save({"model": model.state_dict(), **ema.state_dict(), "iteration": 0}, path)
    return path


def test_export_outputs_never_replaced(checkpoint, tmp_path, tally):
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    _cli(tally, ["export", str(checkpoint), "-o", str(fifo)], "FIFO", str(fifo))
    assert fifo.is_fifo()
    device = tmp_path / "null.pth"
    device.symlink_to("/dev/null")
    _cli(tally, ["export", str(checkpoint), "-o", str(device)], "character device")
    assert Path("/dev/null").is_char_device() and device.is_symlink()
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    _cli(tally, ["export", str(checkpoint), "-o", str(folder)], "folder")
    _cli(tally, ["export", str(checkpoint), "-o", str(checkpoint)], "is the input checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.pth", "folder.pth", "null.pth"]


def test_export_bad_checkpoints(checkpoint, tmp_path, tally):
    out = tmp_path / "out.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:500])
    _cli(tally, ["export", str(truncated), "-o", str(out)], str(truncated))
    listing = tmp_path / "list.pth"
    torch.save([1, 2], listing)
    _cli(tally, ["export", str(listing), "-o", str(out)], "list")
    fifo = tmp_path / "in.pth"
    os.mkfifo(fifo)
    _cli(tally, ["export", str(fifo), "-o", str(out)], "not a file")
    _cli(tally, ["export", str(tmp_path / "none.pth"), "-o", str(out)], "does not exist")
    assert not out.exists()
