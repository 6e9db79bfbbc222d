"""d2ema as a library people install: the tests run against the installed wheel, which holds
every module of src/ and py.typed; one version everywhere; the wheel asks for nothing that would
replace torch or detectron2; an older torch is named in one line; the public API is annotated.

``make test`` builds the sdist and the wheel, installs the wheel (not editable) and runs the
suite with ``D2EMA_EXPECT_INSTALLED=1`` and ``D2EMA_WHEEL=dist/d2ema-*.whl``: then the checks of
the installed copy must hold. A developer's run from a source tree (``PYTHONPATH=src`` or an
editable install) skips only those, and builds its own wheel for the metadata checks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch
from torch import nn

import d2ema
from d2ema.cli import main
from d2ema.versions import TORCH_FLOOR, TorchVersionError

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "d2ema"
EXPECT_INSTALLED = os.environ.get("D2EMA_EXPECT_INSTALLED") == "1"


def installed_copy() -> bool:
    """Whether ``import d2ema`` gives the files of the installed distribution (a wheel
    install), not a source tree on PYTHONPATH or behind an editable install."""
    try:
        dist = importlib.metadata.distribution("d2ema")
    except importlib.metadata.PackageNotFoundError:
        return False
    init = Path(d2ema.__file__).resolve()
    return any(Path(str(dist.locate_file(f))).resolve() == init for f in dist.files or [])


def needs_installed_copy() -> None:
    if not installed_copy():
        assert not EXPECT_INSTALLED, (
            f"make test installed the wheel, yet d2ema comes from {d2ema.__file__}")
        pytest.skip("d2ema is imported from a source tree; make test runs this on the wheel")


def source_files() -> set[str]:
    return {p.relative_to(SRC.parent).as_posix() for p in SRC.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")}


def test_the_tests_import_the_installed_wheel():
    needs_installed_copy()
    here = Path(d2ema.__file__).resolve()
    assert SRC.resolve() not in here.parents, here
    dist = importlib.metadata.distribution("d2ema")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), direct_url


def test_every_source_file_is_in_the_installed_package():
    needs_installed_copy()
    dist = importlib.metadata.distribution("d2ema")
    installed = {f.as_posix() for f in dist.files or [] if f.parts[0] == "d2ema"}
    missing = source_files() - installed
    assert not missing, f"in src/ but not in the installed wheel: {sorted(missing)}"
    package = Path(d2ema.__file__).resolve().parent
    assert (package / "py.typed").is_file()
    for relative in source_files():
        installed_file = package.parent / relative
        assert installed_file.read_bytes() == (SRC.parent / relative).read_bytes(), relative


def test_version_is_the_same_everywhere(capsys):
    from d2ema._version import __version__

    assert d2ema.__version__ == __version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"d2ema {__version__}"
    script = Path(sys.executable).parent / "d2ema"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"d2ema {__version__}", out
    assert f"\n## {__version__}\n" in (ROOT / "CHANGELOG.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "d2ema._version.__version__" in pyproject
    if installed_copy():
        assert importlib.metadata.version("d2ema") == __version__


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel make test built, or one built here from the source tree."""
    if os.environ.get("D2EMA_WHEEL"):
        return Path(os.environ["D2EMA_WHEEL"]).resolve()
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (path,) = out.glob("d2ema-*.whl")
    return path


def test_wheel_metadata_files_and_version(wheel):
    from d2ema._version import __version__

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(metadata).decode())
    assert meta["Version"] == __version__ and meta["Name"] == "d2ema"
    required = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert required == [f"torch>={TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}"], required
    assert "Typing :: Typed" in (meta.get_all("Classifier") or [])
    assert "detectron2 v0.6" in meta.get_payload() and "detectron2 main" in meta.get_payload()
    assert any(n.endswith("LICENSE") for n in names)
    missing = source_files() - names
    assert not missing, f"in src/ but not in {wheel.name}: {sorted(missing)}"


def test_installing_the_wheel_replaces_nothing(wheel, tmp_path):
    """In this environment (torch and detectron2 installed), ``pip install <wheel>`` would
    install d2ema and nothing else; --no-index: a missing dependency would fail here."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
         "--report", str(report), str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert set(names) <= {"d2ema"}, names


def test_older_torch_is_named_in_one_line(monkeypatch):
    from d2ema import EMA

    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(TorchVersionError) as error:
        EMA(nn.Linear(2, 2))
    message = str(error.value)
    assert "\n" not in message and "torch >= 2.13" in message and "2.5.1" in message
    assert isinstance(error.value, d2ema.D2EMAError)


def test_importing_with_an_older_torch_works():
    code = ("import torch; torch.__version__ = '2.5.1'\n"
            "import d2ema, d2ema.posthoc, d2ema.distributed, d2ema.cli\n"
            "from d2ema import EMA, PostHocEMA, ShardedEMA\n"
            "try:\n    EMA(torch.nn.Linear(2, 2))\n"
            "except d2ema.D2EMAError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused: d2ema's EMA needs torch >= 2.13"), out.stdout


def test_torch_floor_is_the_one_pyproject_and_docs_state():
    floor = f"{TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}"
    assert f'dependencies = ["torch>={floor}"]' in (ROOT / "pyproject.toml").read_text()
    docs = (ROOT / "docs" / "install.md").read_text()
    assert f"torch >= {floor}" in docs
    assert re.search(rf"\| torch \| {re.escape(floor)}\.\d+ \|", docs)  # the tested row


PUBLIC = ["d2ema", "d2ema.schedules", "d2ema.posthoc", "d2ema.distributed", "d2ema.d2",
          "d2ema.lightning"]


# The public API: what README.md and docs/ teach. Everything else stays importable from its module
# (and, as before 0.3.0, from these packages) but is not in __all__ nor on docs/api.md.
API = {
    "d2ema.posthoc": {"PostHocEMA", "PostHocError", "Reconstruction", "Selection", "Target",
                      "load_tensors", "reconstruct"},
    "d2ema.distributed": {"ShardedEMA", "averaged_buffers", "full_state_dict"},
    "d2ema.d2": {"EMACheckpointer", "EMANotLoadedError", "EMATrainer", "EMATrainerMixin",
                 "TrainerError", "add_model_ema_configs", "get_model_ema",
                 "lazy_model_ema_defaults", "register_coco_dataset", "setup_run"},
}


def _imports_in_docs() -> set[tuple[str, str]]:
    """(module, name) of every ``from d2ema.X import A, B`` and ``d2ema.X.A`` in the docs."""
    found = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if page.name in ("api.md", "layout.md", "configuration.md"):
            continue
        text = page.read_text()
        for module, names in re.findall(r"from (d2ema[\w.]*) import (\([^)]*\)|[^\n#]*)", text):
            words = (re.sub(r"[()+\s]", "", n) for n in names.split(","))
            found |= {(module, w) for w in words if w}
        found |= set(re.findall(r"`(d2ema\.(?:posthoc|distributed|d2))\.([A-Za-z_]\w*)", text))
    return found


def test_public_api_is_what_the_docs_teach():
    pytest.importorskip("detectron2")
    for module_name, names in API.items():
        assert set(importlib.import_module(module_name).__all__) == names, module_name
    taught = {(m, n) for m, n in _imports_in_docs()
              if m in API and importlib.util.find_spec(f"{m}.{n}") is None}  # not a submodule
    assert ("d2ema.posthoc", "load_tensors") in taught and ("d2ema.d2", "setup_run") in taught
    assert {(m, n) for m, n in taught if n not in API[m]} == set()


def test_emahook_names():
    """d2ema.d2.EMAHook (0.2) is EMAUpdateHook, with a DeprecationWarning; d2ema.compat.EMAHook
    is D2Go's ``EMAHook(cfg, model)``."""
    pytest.importorskip("detectron2")
    import d2ema.d2
    from d2ema import compat
    from d2ema.d2.engine.hooks import EMAUpdateHook

    with pytest.warns(DeprecationWarning, match="now d2ema.d2.EMAUpdateHook"):
        assert d2ema.d2.EMAHook is EMAUpdateHook
    assert compat.EMAHook is not EMAUpdateHook
    assert list(inspect.signature(compat.EMAHook).parameters)[:2] == ["cfg", "model"]
    with pytest.raises(AttributeError):
        d2ema.d2.no_such_name  # noqa: B018


def _unannotated(fn, where: str) -> list[str]:
    sig = inspect.signature(fn)
    out = [f"{where}({p.name})" for p in sig.parameters.values()
           if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty and not where.endswith("__init__"):
        out.append(f"{where} -> ?")
    return out


def test_public_api_is_annotated():
    pytest.importorskip("detectron2")
    missing, seen = [], set()
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen or (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                missing += _unannotated(obj, f"{module_name}.{name}")
            elif inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    fn = getattr(value, "__func__", None) or getattr(value, "fget", value)
                    if inspect.isfunction(fn):
                        missing += _unannotated(fn, f"{module_name}.{name}.{attr}")
    assert not missing, missing
    assert len(seen) > 25  # the walk saw the API


def test_py_typed_is_declared_package_data():
    assert (SRC / "py.typed").is_file()
    assert re.search(r'd2ema = \["py.typed"\]', (ROOT / "pyproject.toml").read_text())


# What an import, an EMA and d2ema's own config merges leave behind: nothing process-wide.
_GLOBALS_SCRIPT = r'''
import gc
import torch
import torch.nn.modules.module as modules
import torch.optim.optimizer as optimizers
import yacs.config as yacs_config

def hooks():
    return {f"{m.__name__}.{n}": dict(getattr(m, n)) for m in (modules, optimizers)
            for n in dir(m) if n.startswith("_global_") and "hooks" in n}

def yacs_functions():
    return dict(vars(yacs_config))

before, yacs_before = hooks(), yacs_functions()
assert any("registration" in n for n in before) and any("optimizer" in n for n in before)
import d2ema, d2ema.d2, d2ema.compat, d2ema.posthoc, d2ema.distributed
from d2ema import EMA
assert hooks() == before, "import"

model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
ema = EMA(model)
grown = {n for n in before if len(hooks()[n]) > len(before[n])}
assert sorted(grown) == [f"torch.nn.modules.module._global_{k}_registration_hooks"
                         for k in ("buffer", "module", "parameter")], grown
second = EMA(model)
del ema
gc.collect()
assert {n for n in before if len(hooks()[n]) > len(before[n])} == grown, "one EMA still lives"
second.update(model)
model[1].running_mean = torch.zeros(3)  # a registration the live EMA must see
del second
gc.collect()
assert hooks() == before, "EMA collected"

# an EMA updated in the background (a CUDA model's CPU EMA) hooks optimizer steps
import d2ema.averaging.offload as offload
class AsyncCopy(offload._SyncCopy):
    asynchronous = True
offload._copier_for = lambda device: AsyncCopy()
ema = EMA(model, overlap=True)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
assert len(optimizers._global_optimizer_pre_hooks) == 1 + len(before[
    "torch.optim.optimizer._global_optimizer_pre_hooks"])
ema.update(model); optimizer.step(); ema.update(model); ema.synchronize()
del ema
gc.collect()
assert hooks() == before, "background EMA collected"

from detectron2.config import get_cfg
from d2ema.d2 import add_model_ema_configs
from d2ema.d2.config.yacs_numbers import integers_for_floats
cfg = get_cfg()
add_model_ema_configs(cfg)
with integers_for_floats():
    cfg.merge_from_list(["MODEL_EMA.TAU", "5"])
assert type(cfg.MODEL_EMA.TAU) is float and cfg.MODEL_EMA.TAU == 5.0
try:
    cfg.merge_from_list(["MODEL_EMA.TAU", "6"])  # plain yacs again
except ValueError as e:
    assert "Type mismatch" in str(e), e
else:
    raise AssertionError("yacs accepted an int for a float key outside d2ema's merges")
after = yacs_functions()
assert after.keys() == yacs_before.keys()
assert all(after[k] is yacs_before[k] for k in after), [k for k in after
                                                       if after[k] is not yacs_before[k]]
print("ok")
'''


def test_importing_and_using_d2ema_changes_nothing_process_wide():
    """``import d2ema, d2ema.d2`` registers no torch hook and leaves yacs' functions as they
    are; the module-registration hooks live as long as an EMA does, the optimizer-step hook as
    long as a background EMA does; integers for floats only inside d2ema's own merges."""
    pytest.importorskip("detectron2")
    out = subprocess.run([sys.executable, "-c", _GLOBALS_SCRIPT], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
