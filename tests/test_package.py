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
    assert len(seen) > 40  # the walk saw the API


def test_py_typed_is_declared_package_data():
    assert (SRC / "py.typed").is_file()
    assert re.search(r'd2ema = \["py.typed"\]', (ROOT / "pyproject.toml").read_text())
