"""docs/walkthrough.md, run as written: its commands in order, on the files it shows.

The page holds the command-line path of a new user (train with ``--dataset`` on a ``_BASE_``
config, resume to more iterations, ``--eval-only``, ``export``, plain detectron2's evaluation of
the export, resume again, ``posthoc --eval --export-best``), for a YAML and a LazyConfig run.
This test reads each ``##`` section, writes the files its code blocks name in their first line
(``# configs/my_config.yaml``), runs its ``bash`` blocks' commands in order (``d2ema`` in this
process, ``python`` in a child process) and checks that every one exits 0 and that no
evaluation changes a run's ``config.yaml``. The data: COCO json with category ids 5, 9, 12.
"""

from __future__ import annotations

import hashlib
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from _doc_blocks import blocks, doc_block
from _user_project import BASE_RETINANET, D2_TRAIN_NET, apply_diff, write_coco_split
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2ema.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "walkthrough.md"
CATEGORIES = [{"id": 5, "name": "crate"}, {"id": 9, "name": "tile"}, {"id": 12, "name": "sign"}]
NAMES = ("my_train", "my_val")

pytestmark = pytest.mark.usefixtures("restore_loggers")


def sections() -> dict[str, list[tuple[str, str]]]:
    """``## title`` -> [("file", "# path\\ntext") | ("diff", text) | ("command", "d2ema ...")],
    in page order."""
    found: dict[str, list[tuple[str, str]]] = {}
    for part in re.split(r"^## ", PAGE.read_text(), flags=re.MULTILINE)[1:]:
        title, _, body = part.partition("\n")
        steps = found.setdefault(title.strip(), [])
        for lang, code in re.findall(r"```(\w*)\n(.*?)```", body, flags=re.DOTALL):
            first = code.split("\n", 1)[0]
            if lang in ("yaml", "python") and re.fullmatch(r"# [\w./-]+", first):
                steps.append(("file", code))
            elif lang == "diff":
                steps.append(("diff", code))
            elif lang == "bash":
                for line in code.replace("\\\n", " ").splitlines():
                    if line.strip():
                        steps.append(("command", line.strip()))
    return found


# every block of the page, named for tests/test_doc_blocks.py; walk() runs them in page order
WALKED = (
    doc_block("walk-train"), doc_block("walk-resume"), doc_block("walk-eval-only"),
    doc_block("walk-export"), doc_block("walk-plain-eval-script"), doc_block("walk-plain-eval"),
    doc_block("walk-resume-again"), doc_block("walk-posthoc"),
    doc_block("walk-lazy-config"), doc_block("walk-lazy-commands"),
    doc_block("walk-train-net-edits"), doc_block("walk-train-net-commands"),
)


def test_the_walk_covers_every_block_of_the_page():
    page = [b.text for b in blocks([PAGE]) if b.name or b.runnable]
    assert sorted(page) == sorted(WALKED)
    steps = [text for found in sections().values() for _, text in found]
    for text in WALKED:  # a file walk() writes, or commands it runs
        lines = [x.strip() for x in text.replace("\\\n", " ").splitlines() if x.strip()]
        assert text in steps or all(x in steps for x in lines), text


def _unregister() -> None:
    for name in NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The data the page assumes, and detectron2's Base-RetinaNet.yaml in configs/."""
    for split, count in (("train", 6), ("val", 2)):
        json_file, _ = write_coco_split(tmp_path / "data", split, count, seed=len(split),
                                        categories=CATEGORIES)
        json_file.rename(json_file.with_name(f"{split}.json"))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "Base-RetinaNet.yaml").write_text(BASE_RETINANET)
    monkeypatch.chdir(tmp_path)
    _unregister()
    yield tmp_path
    _unregister()


def _run_configs(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.glob("*/config.yaml")}


def _is_evaluation(argv: list[str]) -> bool:
    return ("plain_eval.py" in argv or "--eval-only" in argv
            or argv[:2] in (["d2ema", "export"], ["d2ema", "posthoc"]))


def write_files(root: Path) -> None:
    """The files the page shows (a config, a script), and train_net.py edited as it says."""
    for found in sections().values():
        for kind, text in found:
            if kind == "file":
                first, _, content = text.partition("\n")
                path = root / first[2:]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
            elif kind == "diff":
                (root / "train_net.py").write_text(apply_diff(D2_TRAIN_NET, text))


def run_python(argv: list[str], root: Path) -> int:
    """``python SCRIPT ARGS`` as a new process would run it (datasets registered afresh), in
    this process: a child would spend most of its time importing torch and detectron2."""
    _unregister()
    old = sys.argv
    sys.argv = argv[1:]
    try:
        runpy.run_path(str(root / argv[1]), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
        _unregister()
    return 0


def walk(title: str, root: Path) -> list[list[str]]:
    write_files(root)
    ran = []
    for kind, text in sections()[title]:
        if kind != "command":
            continue
        argv = shlex.split(text, comments=True)
        before = _run_configs(root)
        if argv[0] == "d2ema":
            rc = main(argv[1:])
        else:
            assert argv[0] == "python", text
            rc = run_python(argv, root)
        assert rc == 0, text
        if _is_evaluation(argv):
            after = _run_configs(root)
            assert {p: after.get(p) for p in before} == before, f"{text} changed a config.yaml"
        ran.append(argv)
    return ran


def test_yaml_walkthrough(project, capsys):
    ran = walk("With a model-zoo YAML config (`_BASE_`)", project)
    assert [a[1] if a[0] == "d2ema" else a[0] for a in ran] == [
        "train", "train", "train", "export", "python", "train", "posthoc"]
    out = project / "output"
    assert (out / "inference" / "coco_instances_results.json").is_file()
    assert (out / "inference_ema" / "coco_instances_results.json").is_file()
    assert [p.name for p in (out / "eval").iterdir()]  # the evaluation's own folder
    assert (project / "model_ema_output" / "config.yaml").is_file()  # plain d2's, not the run's
    assert (project / "best.pth").is_file()
    log = (out / "log.txt").read_text()
    assert "d2ema.d2.evaluation.evaluator INFO: Evaluating the EMA weights" in log


def test_lazy_walkthrough(project, capsys):
    ran = walk("With a LazyConfig", project)
    assert len(ran) == 6
    assert (project / "best_lazy.pth").is_file()
    assert "Python COCO evaluation" in (project / "output_lazy" / "log.txt").read_text()


def test_train_net_walkthrough(project, capsys):
    """detectron2's tools/train_net.py edited as the page says; its build_evaluator is the
    fast COCOEvaluator, which this install (no compiled ops) cannot run."""
    ran = walk("With your own train_net.py", project)
    assert [a[1] for a in ran] == ["train_net.py", "train_net.py", "train_net.py", "export",
                                   "plain_eval.py", "train_net.py", "posthoc"]
    out = project / "output_own"
    assert (out / "inference_ema" / "coco_instances_results.json").is_file()
    (folder,) = (out / "eval").iterdir()  # the evaluation's own folder
    assert (folder / "inference_ema" / "coco_instances_results.json").is_file()
    assert (project / "best_own.pth").is_file()
    assert "Evaluating the EMA weights" in (out / "log.txt").read_text()
