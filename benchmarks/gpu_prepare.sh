#!/usr/bin/env bash
# Run once where pip reaches the package index: fills .whl/ (git-ignored) with what
# benchmarks/gpu_check.sh needs on a GPU machine that reaches no network and whose Python
# (3.12, with torch) lacks detectron2 and the benchmark peers:
#   .whl/site/   pure-Python packages copied from this environment's site-packages, the
#                versions the tests here use: detectron2 v0.6 with the d2ema _C stub, fvcore,
#                iopath, yacs, omegaconf, antlr4, hydra, termcolor, ema_pytorch, torch_ema;
#   .whl/*.whl   pycocotools, the one compiled dependency, for CPython $GPU_PYTHON (3.12).
# About 15 MB. Then, from the device tool: run "bash benchmarks/gpu_check.sh" with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TARGET_PY=${GPU_PYTHON:-3.12}
SITE=$("$PY" -c "import detectron2, os; print(os.path.dirname(os.path.dirname(detectron2.__file__)))")
rm -rf .whl
mkdir -p .whl/site
for pkg in detectron2 fvcore iopath yacs omegaconf antlr4 hydra termcolor ema_pytorch torch_ema; do
    [ -d "$SITE/$pkg" ] || { echo "[gpu_prepare] $pkg is not installed in $SITE" >&2; exit 1; }
    cp -r "$SITE/$pkg" .whl/site/
done
find .whl/site -name __pycache__ -type d -prune -exec rm -rf {} +
platforms=()
for n in 2_28 2_27 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
    "pycocotools>=2.0.7"
echo "[gpu_prepare] .whl/ ready ($(du -sh .whl | cut -f1)): carry it with the worktree"
