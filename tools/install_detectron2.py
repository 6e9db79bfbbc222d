"""Install detectron2 v0.6 into the running Python, with its C++ extension build turned off.

detectron2's latest release is on the package index only as the sdist ``pb1-detectron2==0.6``:
the official v0.6 Python sources without the C++ sources, whose ``setup.py`` still asks for
the extension and so cannot build as it is. This script:

1. leaves an importable detectron2 alone: a build with its compiled ops, or an earlier install
   by this script with the same stub;
2. downloads the sdist with pip in hash-checking mode (``requirements/detectron2.txt``) and
   checks its sha256 again itself, so a corrupted or substituted file stops the install
   before anything of it runs;
3. unpacks it, sets ``ext_modules=[]`` in ``setup.py``, adds ``detectron2/_C.py``
   (``tools/detectron2_C_stub.py``: a module whose compiled ops raise a clear error) and
   installs it with ``pip --no-deps --no-build-isolation``.

Set ``D2EMA_DETECTRON2_SDIST=/path/to/pb1-detectron2-0.6.tar.gz`` to install from a local file
(it is checked against the same hash).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT = ROOT / "requirements" / "detectron2.txt"
STUB = Path(__file__).resolve().parent / "detectron2_C_stub.py"
SDIST_NAME = "pb1-detectron2-0.6.tar.gz"


class InstallError(RuntimeError):
    pass


def pinned_sha256() -> str:
    match = re.search(r"--hash=sha256:([0-9a-f]{64})", REQUIREMENT.read_text())
    if not match:
        raise InstallError(f"{REQUIREMENT} has no --hash=sha256:... pin")
    return match.group(1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_detectron2() -> tuple[str, bool] | None:
    """Describe an importable detectron2 and whether it is current, or None.

    A detectron2 with compiled ops is always current; one with our stub is current when its stub
    is this repo's.
    """
    if importlib.util.find_spec("detectron2") is None:
        return None
    import detectron2

    try:
        from detectron2 import _C
    except ImportError:
        return f"detectron2 {detectron2.__version__} (no detectron2._C)", False
    if not getattr(_C, "D2EMA_STUB", False):
        return f"detectron2 {detectron2.__version__} with compiled ops", True
    current = Path(_C.__file__).read_text() == STUB.read_text()
    return f"detectron2 {detectron2.__version__} with the d2ema _C stub", current


def download(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        "--require-hashes",
        "-r",
        str(REQUIREMENT),
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise InstallError(
            f"pip could not download the detectron2 sdist pinned in {REQUIREMENT}:\n{tail}"
        )
    return dest / SDIST_NAME


def verify(sdist: Path, expected: str) -> None:
    if not sdist.is_file():
        raise InstallError(f"detectron2 sdist not found: {sdist}")
    actual = sha256_of(sdist)
    if actual != expected:
        raise InstallError(
            f"detectron2 sdist {sdist} has sha256 {actual}, but "
            f"{REQUIREMENT.relative_to(ROOT)} pins {expected}: the file is corrupted or "
            "substituted. Nothing was installed. Delete the file and run the command again to "
            "download a fresh copy."
        )


def unpack_without_extension(sdist: Path, workdir: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    (src,) = [p for p in workdir.iterdir() if p.is_dir()]
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    if text.count("ext_modules=get_extensions(),") != 1:
        raise InstallError(f"unexpected setup.py in {sdist.name}: cannot turn the extension off")
    setup_py.write_text(text.replace("ext_modules=get_extensions(),", "ext_modules=[],"))
    (src / "detectron2" / "_C.py").write_text(STUB.read_text())
    return src


def main() -> int:
    found = installed_detectron2()
    if found and found[1] and os.environ.get("D2EMA_DETECTRON2_SDIST") is None:
        print(f"[d2ema] {found[0]} is already importable; leaving it alone.")
        return 0
    expected = pinned_sha256()
    try:
        with tempfile.TemporaryDirectory(prefix="d2ema-detectron2-") as tmp:
            tmp_path = Path(tmp)
            local = os.environ.get("D2EMA_DETECTRON2_SDIST")
            sdist = Path(local) if local else download(tmp_path)
            verify(sdist, expected)
            src = unpack_without_extension(sdist, tmp_path / "src")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-deps",
                    "--no-build-isolation",
                    str(src),
                ],
                check=True,
            )
    except InstallError as e:
        print(f"[d2ema] ERROR: {e}", file=sys.stderr)
        return 1
    print(f"[d2ema] installed {installed_detectron2()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
