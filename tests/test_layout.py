"""The package's shape: the core imports no detectron2 (nor Lightning), imports point one way
(cli/app -> front ends d2 and lightning -> core) with no cycle, modules stay small, and every
user-facing error has one base class."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import d2ema

SRC = Path(d2ema.__file__).resolve().parent
PACKAGE = "d2ema"
# Top-level modules that belong to the layers above the core.
NOT_CORE = {"d2ema.cli", "d2ema.__main__", "d2ema.compat"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return ({"d2": "d2", "compat": "d2", "app": "app", "lightning": "lightning"}.get(rel[0], "core")
            if len(rel) > 1 else "core")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
CORE = sorted(m for m, p in MODULES.items() if layer_of(p) == "core" and m not in NOT_CORE)
# The core's ground floor (the EMA itself) and the folders one floor above it.
CORE_FOLDERS = ("d2ema.posthoc", "d2ema.distributed")


def layer(module: str) -> str:
    if module in ("d2ema.cli", "d2ema.__main__"):
        return "cli"
    if module == "d2ema.compat" or module.startswith(("d2ema.compat.", "d2ema.d2")):
        return "d2"  # D2Go's API; d2ema.compat.ema_state imports no detectron2 all the same
    if module.startswith("d2ema.app"):
        return "app"
    if module.startswith("d2ema.lightning"):
        return "lightning"
    return "core"


ALLOWED = {
    "core": {"core"},
    "d2": {"core", "d2"},
    "lightning": {"core", "lightning"},  # the Lightning front end: beside d2, never importing it
    "app": {"core", "d2", "lightning", "app"},
    "cli": {"core", "d2", "lightning", "app", "cli"},
}


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The d2ema modules an import statement loads (package __init__ included)."""
    is_package = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = [stem] + [f"{stem}.{a.name}" for a in node.names]
    out = []
    for name in names:
        if name.split(".")[0] != PACKAGE:
            continue
        while name and name not in MODULES:  # from d2ema.x import SomeClass -> d2ema.x
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return sorted(set(out))


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                # Python runs a module's parent packages before the module: not an edge.
                edges.update(
                    m for m in _resolve(module, node)
                    if m != module and not module.startswith(m + ".")
                )
        graph[module] = edges
    return graph


def test_core_list_is_the_folder():
    assert {"d2ema.ema", "d2ema.io.format", "d2ema.errors", "d2ema.averaging.state",
    "d2ema.posthoc.tracker",
            "d2ema.distributed.sharded"} <= set(CORE)
    assert not [m for m in CORE if layer(m) != "core"]


def _folder(module: str) -> str:
    return next((f for f in CORE_FOLDERS if module == f or module.startswith(f + ".")), "")


def test_core_folders_sit_one_floor_above_the_ema():
    """The EMA's own modules never import post-hoc or multi-process code, and those two folders
    do not import each other: each folder is one room a reader can open alone."""
    graph = import_graph()
    wrong = [
        f"{m} imports {t}"
        for m in CORE
        if m != PACKAGE  # the front door re-exports from every room
        for t in graph[m]
        if layer(t) == "core" and _folder(t) and _folder(t) != _folder(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_post_hoc_and_multi_process_code_live_in_their_folders():
    top = {m.rpartition(".")[2] for m, p in MODULES.items() if p.parent == SRC}
    stray = {n for n in top if any(w in n for w in ("posthoc", "snapshot", "reconstruct",
                                                     "shard", "distributed"))}
    assert not stray, stray
    import d2ema
    import d2ema.distributed

    assert d2ema.PostHocEMA.__module__ == "d2ema.posthoc.tracker"
    assert d2ema.ShardedEMA is d2ema.distributed.ShardedEMA


def test_core_modules_import_no_detectron2():
    """Each core module, imported alone in one fresh interpreter, loads no detectron2/fvcore
    (nor Lightning)."""
    code = (
        "import importlib, sys\n"
        f"mods = {CORE!r}\n"
        "bad = {}\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "    loaded = [n for n in sys.modules if n.split('.')[0] in\n"
        "              ('detectron2', 'fvcore', 'lightning', 'pytorch_lightning')]\n"
        "    if loaded: bad[m] = loaded[:3]; break\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_imports_point_one_way():
    upward = [
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in import_graph().items()
        for t in targets
        if layer(t) not in ALLOWED[layer(m)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = import_graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def _modules_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.py"))


def test_folders_hold_few_modules_side_by_side():
    """Sizes follow ideas, not line caps: a reader opens a folder and sees at most eight rooms
    (ten at the front door, four beside d2/'s folders)."""
    assert len(_modules_in(SRC)) <= 10, _modules_in(SRC)
    assert len(_modules_in(SRC / "d2")) <= 4, _modules_in(SRC / "d2")
    crowded = {str(d.relative_to(SRC)): len(_modules_in(d)) for d in SRC.rglob("*")
               if d.is_dir() and d != SRC and d.name != "__pycache__" and len(_modules_in(d)) > 8}
    assert not crowded, crowded


def test_every_user_facing_error_has_the_one_base_class():
    from d2ema.app.data import UnknownDatasetError
    from d2ema.app.demo import DemoError
    from d2ema.errors import ConfigError, D2EMAError, EMAStateError, ExportError, UsageError

    for cls in (ConfigError, EMAStateError, ExportError, UsageError, DemoError,
                UnknownDatasetError):
        assert issubclass(cls, D2EMAError), cls
    # and nothing else in the package defines an exception outside that tree
    loose = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id in ("Exception", "ValueError", "RuntimeError")
                for b in node.bases
            ) and not any(isinstance(b, ast.Name) and b.id == "D2EMAError" for b in node.bases):
                loose.append(f"{module}.{node.name}")
    assert loose == ["d2ema.errors.D2EMAError"], loose


def _documented_modules() -> set[str]:
    """The modules docs/layout.md names, as paths under src/d2ema (its first text block)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "layout.md").read_text()
    block = page.split("```text\n", 1)[1].split("```", 1)[0]
    stack: list[tuple[int, str]] = []
    named = set()
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.endswith((".py", "/")):
            continue
        depth = len(line) - len(line.lstrip())
        stack = [(d, n) for d, n in stack if d < depth]
        path = "".join(n for _, n in stack) + name
        if name.endswith("/"):
            stack.append((depth, name))
        elif path.startswith("src/d2ema/"):
            named.add(path.removeprefix("src/d2ema/"))
    return named


def test_layout_page_names_every_module_and_no_other():
    on_disk = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")}
    named = _documented_modules()
    assert not on_disk - named, f"missing from docs/layout.md: {sorted(on_disk - named)}"
    assert not named - on_disk, f"docs/layout.md names what is not there: {sorted(named - on_disk)}"


# Raise sites of builtin exceptions that stay builtin: (module path, exception, start of the
# message) -> why. Everything else a user can meet derives from D2EMAError (see errors.py).
BUILTIN_RAISES = {
    ("__init__.py", "AttributeError", "module 'd2ema' has no attribute"):
        "module __getattr__: Python's attribute protocol",
    ("d2/__init__.py", "AttributeError", "module 'd2ema.d2' has no attribute"):
        "module __getattr__: Python's attribute protocol",
    ("compat/__init__.py", "AttributeError", ""):
        "module __getattr__: dunder lookups (copy, pickle) answered as Python expects",
    ("compat/__init__.py", "AttributeError", "module 'd2ema.compat' has no attribute"):
        "module __getattr__: Python's attribute protocol",
    ("schedules.py", "NotImplementedError", ""): "abstract method of Schedule",
    ("ema.py", "RuntimeError", "EMA.update() called inside EMA.swapped()"):
        "a caller's bug (update inside the swap block), not an input to fix",
    ("ema.py", "RuntimeError", "EMA.swapped() is already active"): "a caller's bug (nested swap)",
    ("distributed/sharded.py", "RuntimeError", "EMA.swapped() is already active"):
        "a caller's bug (nested swap)",
    ("io/atomic.py", "OSError", ""): "errno-carrying OSError, as open() would raise; every "
        "caller turns OSError into its own D2EMAError naming the path",
    ("io/atomic.py", "FileExistsError", "no free temporary file name"):
        "internal invariant (random names exhausted)",
    ("posthoc/rebuild.py", "KeyError", "tensors"): "caught at once and re-raised as PostHocError",
    ("app/data/digits.py", "ValueError", "unknown digits split"):
        "internal invariant: splits come from the fixed DATASETS table",
    ("app/data/registry.py", "ValueError", "unknown dataset family"):
        "internal invariant: families come from the fixed DATASETS table",
    ("app/data/shapes.py", "ValueError", "unknown shape"): "internal invariant (CLASSES)",
    ("app/model_configs.py", "ValueError", "unknown architecture"):
        "a caller's bug: the commands pass one of ARCHITECTURES",
    ("app/speed/train_step.py", "ValueError", "unknown arch"): "argparse choices guard it",
    ("app/speed/update_speed.py", "ValueError", "unknown models"): "argparse choices guard it",
}


def _builtin_raises() -> dict[tuple[str, str, str], int]:
    """(module path, builtin exception, message) of every ``raise Builtin(...)`` in src/d2ema."""
    import builtins

    found: dict[tuple[str, str, str], int] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            call = node.exc
            func = call.func if isinstance(call, ast.Call) else call
            cls = getattr(builtins, func.id, None) if isinstance(func, ast.Name) else None
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                continue
            message = ""
            args = call.args if isinstance(call, ast.Call) else []
            text = next((a for a in args if isinstance(a, (ast.Constant, ast.JoinedStr))), None)
            if isinstance(text, ast.Constant) and isinstance(text.value, str):
                message = text.value
            elif isinstance(text, ast.JoinedStr):
                message = "".join(v.value for v in text.values if isinstance(v, ast.Constant))
            found[(path.relative_to(SRC).as_posix(), func.id, message)] = node.lineno
    return found


def test_every_raise_a_user_can_fix_is_a_d2ema_error():
    """A ``raise ValueError(...)`` (or any builtin exception) is allowed only where listed in
    BUILTIN_RAISES, with the reason; everything else raises a D2EMAError subclass."""
    found = _builtin_raises()
    assert len(found) >= 10  # the walk saw the raise sites
    unlisted = [f"{path}:{line} {exc}({message!r})" for (path, exc, message), line in found.items()
                if not any(path == p and exc == e and message.startswith(m)
                           for p, e, m in BUILTIN_RAISES)]
    assert not unlisted, ("raise a D2EMAError subclass (d2ema.errors), or list the site in "
                          f"BUILTIN_RAISES with the reason it stays builtin: {unlisted}")
    stale = [k for k in BUILTIN_RAISES if not any(
        path == k[0] and exc == k[1] and message.startswith(k[2]) for path, exc, message in found)]
    assert not stale, f"BUILTIN_RAISES lists sites that no longer exist: {stale}"
def test_core_speaks_its_own_words():
    """No detectron2 key in the core: its messages name its own parameters
    (``PostHocEMA(snapshot_every=...)``) and the detectron2 layer adds the key beside them."""
    speaking = [m for m in CORE if "MODEL_EMA" in MODULES[m].read_text(encoding="utf-8")]
    assert not speaking, f"core modules that name MODEL_EMA: {speaking}"


def test_one_module_asks_yacs_or_lazy():
    """"yacs config or LazyConfig?" is asked of a config in one place: d2/config/view.py."""
    asking = sorted(m for m, p in MODULES.items() if "hasattr(cfg" in p.read_text(encoding="utf-8"))
    assert asking == ["d2ema.d2.config.view"], asking


def test_docstrings_speak_markdown():
    """The API page renders docstrings as Markdown (mkdocstrings, Google style): a Sphinx role
    (``:class:`...```) would show as raw text there (tools/docstring_roles.py rewrites them)."""
    import re

    role = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`")
    left = [f"{p.relative_to(SRC)}:{i}" for p in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if role.search(line)]
    assert not left, left
